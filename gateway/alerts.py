"""Built-in alert notifier: watches the gateway's health and tells a group robot once per incident,
then once more when it clears.

Conditions (thresholds from `[alerts]`): a channel connecting/reconnecting/refused for longer than
`channel_down_after`; more than `error_ratio` of the replies of the last 5 minutes were errors
(with at least `MIN_REPLIES` replies, so one failure out of two is not an incident); `model_failures`
model calls failed in a row; a channel's monthly API budget spent (or its quota refused by the
platform). An incident is posted once (de-duplicated), a flapping one at most once
per `min_interval`, and a "resolved" follows when it clears. Where to post is the sinks' business
(`handlers/robots.py` signs for DingTalk and Feishu); the core knows no platform.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .budget import BudgetState, BudgetStatus
from .channel import ChannelState, ChannelStatus
from .config import DEFAULT_NAME, AlertsConfig
from .stats import Stats

log = logging.getLogger(__name__)

ERROR_WINDOW_MINUTES = 5
MIN_REPLIES = 10
RETRY_AFTER = 30.0  # a post that failed is retried no sooner than this
POST_TIMEOUT = 10.0
MAX_TICK = 5.0  # re-check at least this often (channel-down needs time to pass, not events)
MIN_TICK = 0.1
DOWN_STATES = (ChannelState.CONNECTING, ChannelState.RECONNECTING, ChannelState.REFUSED)


@dataclass(frozen=True, slots=True)
class Alert:
    key: str  # "channel_down:<platform>/<bot>" | "error_ratio" | "model_failing"
    title: str
    detail: str
    firing: bool  # False: the "resolved" notification
    since: float
    host: str

    def text(self) -> str:
        state = "FIRING" if self.firing else "RESOLVED"
        return f"[botgate alert] {state}: {self.title}\n{self.detail}\nhost: {self.host}"


class AlertSink(Protocol):
    name: str

    async def post(self, alert: Alert) -> None:
        """Deliver one notification; raise on failure (it is retried later)."""


@dataclass(slots=True)
class Incident:
    key: str
    title: str
    detail: str
    since: float
    notified: bool = False  # a FIRING notification went out
    cleared_at: float | None = None  # the condition ended; a RESOLVED is still owed
    retry_at: float = 0.0


def shown(status: ChannelStatus) -> str:
    """The channel as an alert names it: its platform, with the bot's name when it is a listed one."""
    return status.platform if status.bot == DEFAULT_NAME else status.key


def quota_detail(budget: BudgetStatus) -> str:
    """What a spent API budget means, for an alert and the status page."""
    why = (
        f"the platform refused a call: {budget.refused}"
        if budget.refused
        else f"{budget.used:,} of the monthly_api_budget of {budget.budget:,} calls used"
    )
    return f"{why}; no cards, replies take the cheapest path until the quota renews ({budget.month} ends)"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


class Monitor:
    def __init__(
        self,
        stats: Stats,
        channels: Callable[[], Iterable[ChannelStatus]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stats = stats
        self._channels = channels
        self._clock = clock
        self._host = socket.gethostname()
        self._incidents: dict[str, Incident] = {}
        self._down_since: dict[str, float] = {}
        self._last_fired: dict[str, float] = {}
        self._lock = asyncio.Lock()  # one check at a time, or two could post the same alert

    @property
    def incidents(self) -> list[Incident]:
        """Conditions true right now (for the status page)."""
        return [i for i in self._incidents.values() if i.cleared_at is None]

    def conditions(self, cfg: AlertsConfig, now: float) -> dict[str, tuple[str, str]]:
        """key -> (title, detail) for every alert condition that holds now."""
        out: dict[str, tuple[str, str]] = {}
        down = set()
        for status in self._channels():
            if status.state not in DOWN_STATES:
                continue
            key = status.key  # each bot on its own: one down, another up are two conditions
            down.add(key)
            since = self._down_since.setdefault(key, now)
            if now - since >= cfg.channel_down_after:
                error = status.last_error or "none"
                out[f"channel_down:{key}"] = (
                    f"{shown(status)} channel down",
                    f"{shown(status)} has been {status.state.value} for {_duration(now - since)} "
                    f"(last error: {error})",
                )
        for key in set(self._down_since) - down:
            del self._down_since[key]
        for status in self._channels():
            budget = status.budget
            if budget is not None and budget.state is BudgetState.SPENT:
                out[f"api_quota:{status.key}"] = (f"{shown(status)} API quota spent", quota_detail(budget))
        ratio, replies = self._stats.error_ratio(ERROR_WINDOW_MINUTES)
        if ratio is not None and replies >= MIN_REPLIES and ratio > cfg.error_ratio:
            out["error_ratio"] = (
                "reply error ratio",
                f"{ratio:.1%} of {replies} replies in the last {ERROR_WINDOW_MINUTES} minutes were "
                f"errors (threshold {cfg.error_ratio:.1%})",
            )
        streak = self._stats.model_failure_streak
        if cfg.model_failures > 0 and streak >= cfg.model_failures:
            out["model_failing"] = (
                "model failing",
                f"{streak} model calls failed in a row (last reason: {self._stats.last_model_error})",
            )
        return out

    async def check(self, cfg: AlertsConfig, sinks: Sequence[AlertSink]) -> list[Alert]:
        """Evaluate once; post what is due. Returns the notifications that went out."""
        async with self._lock:
            return await self._check(cfg, sinks)

    async def _check(self, cfg: AlertsConfig, sinks: Sequence[AlertSink]) -> list[Alert]:
        now = self._clock()
        current = self.conditions(cfg, now)
        for key, (title, detail) in current.items():
            incident = self._incidents.get(key)
            if incident is None:
                self._incidents[key] = Incident(key, title, detail, now)
            else:
                incident.detail, incident.cleared_at = detail, None  # back before its resolve
        for key, incident in self._incidents.items():
            if key not in current and incident.cleared_at is None:
                incident.cleared_at = now
        sent: list[Alert] = []
        if not sinks:
            self._forget_cleared(lambda i: True)
            return sent
        for incident in list(self._incidents.values()):
            alert = self._due(incident, cfg, now)
            if alert is None:
                continue
            if await self._post(sinks, alert):
                sent.append(alert)
                if alert.firing:
                    incident.notified = True
                    self._last_fired[incident.key] = now
                else:
                    del self._incidents[incident.key]
            else:
                incident.retry_at = now + RETRY_AFTER
        self._forget_cleared(lambda i: not i.notified)
        return sent

    def _due(self, incident: Incident, cfg: AlertsConfig, now: float) -> Alert | None:
        if now < incident.retry_at:
            return None
        if incident.cleared_at is not None:
            if not incident.notified:
                return None
            took = _duration(incident.cleared_at - incident.since)
            detail = f"cleared after {took}; was: {incident.detail}"
            return Alert(incident.key, incident.title, detail, False, incident.since, self._host)
        if (
            incident.notified
            or now - self._last_fired.get(incident.key, -math.inf) < cfg.min_interval
        ):
            return None
        return Alert(
            incident.key, incident.title, incident.detail, True, incident.since, self._host
        )

    def _forget_cleared(self, which: Callable[[Incident], bool]) -> None:
        for key in [k for k, i in self._incidents.items() if i.cleared_at is not None and which(i)]:
            del self._incidents[key]

    async def _post(self, sinks: Sequence[AlertSink], alert: Alert) -> bool:
        """True when at least one sink took it."""
        delivered = False
        for sink in sinks:
            try:
                async with asyncio.timeout(POST_TIMEOUT):
                    await sink.post(alert)
                delivered = True
                log.info(
                    "alert posted",
                    extra={"alert": alert.key, "firing": alert.firing, "sink": sink.name},
                )
            except Exception as e:  # one sink failing must not stop the others
                log.warning(
                    "alert post failed: %s",
                    e or type(e).__name__,
                    extra={"alert": alert.key, "sink": sink.name},
                )
        return delivered

    async def run(
        self,
        config: Callable[[], AlertsConfig],
        sinks: Callable[[AlertsConfig], Sequence[AlertSink]],
    ) -> None:
        """Check on every stats change (at most every MIN_TICK: under load the stats change with
        every message) and at least every few seconds, until cancelled."""
        changed = asyncio.Event()
        self._stats.add_listener(changed)
        loop = asyncio.get_running_loop()
        try:
            while True:
                cfg = config()
                changed.clear()
                checked_at = loop.time()
                try:
                    await self.check(cfg, sinks(cfg))
                except Exception:  # the loop's edge: a bug in one check must not end alerting
                    log.exception("alert check failed")
                tick = min(MAX_TICK, max(MIN_TICK, cfg.channel_down_after / 4))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(tick):
                        await changed.wait()
                await asyncio.sleep(max(0.0, checked_at + MIN_TICK - loop.time()))
        finally:
            self._stats.remove_listener(changed)
