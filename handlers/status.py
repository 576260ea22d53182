"""The status page (`/`), its live feed (`/status/events`, server-sent events) and the snapshot
behind both and behind `GET /api/status`.

The page is rendered on the server (works without JavaScript); the feed re-renders the same
`status_body.html` on every change (at most every `MIN_GAP` s) and at least every `REFRESH` s, and
`static/status.js` swaps it in. One template, so the live view can never disagree with a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
import jinja2
import orjson
from aiohttp import web
from jinja2.runtime import Context

from gateway import __version__, usage
from gateway.alerts import quota_detail
from gateway.budget import BudgetState
from gateway.channel import ChannelStatus
from gateway.config import Config, masked
from gateway.errors import StoreError
from gateway.i18n import DEFAULT_LOCALE, N_, Locale, Translator, translator
from gateway.keyage import MAX_AGE_DAYS, today, too_old
from gateway.keys import ALERTS, CHANNELS, DISPATCHER, KEY_AGES, LIVE, METRICS, RESPONDER, SCHEDULER, STARTED_AT, STORE
from gateway.logs import redacted
from gateway.stats import Percentiles

from .auth import SESSION_EXPIRES, still_logged_in
from .pages import locale_of
from .robots import configured_sinks
from .routes import unconfigured_platforms

log = logging.getLogger(__name__)

REFRESH = 5.0  # seconds between pushes when nothing changes (ages and uptime move on)
MIN_GAP = 0.5  # seconds between pushes under traffic
PING_TIMEOUT = 2.0
CHART_W, CHART_H = 600, 120
# The states a channel row shows, for the catalog (the page translates them with `translate`).
STATES = (
    N_("disabled"),
    N_("connecting"),
    N_("connected"),
    N_("reconnecting"),
    N_("refused"),
    N_("standby"),
    N_("stopped"),
    N_("not configured"),
)


def _latency(p: Percentiles) -> dict[str, Any]:
    return {"count": p.count, "p50": p.p50, "p95": p.p95, "p99": p.p99}


async def _store_health(app: web.Application) -> dict[str, Any]:
    store = app[STORE]
    try:
        async with asyncio.timeout(PING_TIMEOUT):
            await store.ping()
    except (StoreError, TimeoutError) as e:
        return {"backend": store.backend, "healthy": False, "error": str(e) or "ping timed out"}
    return {"backend": store.backend, "healthy": True, "error": ""}


USAGE_TOP = 5  # rows per table in the status page's usage panel


async def _usage_today(app: web.Application, cfg: Config) -> dict[str, Any] | None:
    """Today's top users, groups and bots by tokens (None while the store cannot tell)."""
    day = usage.today(usage.zone(cfg)).isoformat()
    try:
        async with asyncio.timeout(PING_TIMEOUT):
            figures = await usage.report(app[STORE], day, USAGE_TOP)
    except (StoreError, TimeoutError):
        return None
    return {"day": day, "timezone": cfg.quotas.timezone, **figures}


async def schedules(app: web.Application) -> list[dict[str, Any]]:
    """Every schedule with its next run and last result (`Scheduler.report`; also /api/schedules)."""
    scheduler = app.get(SCHEDULER)
    return [] if scheduler is None else await scheduler.report()  # None: not started (yet)


def _budget(request: web.Request, s: ChannelStatus) -> dict[str, Any] | None:
    """The channel's monthly API budget, once there is anything to say about it (a budget set, a
    call counted or a refusal); with the billable calls an answered message cost on average."""
    b = s.budget
    if b is None or not (b.budget or b.used or b.state is not BudgetState.OK):
        return None
    registry = request.app[METRICS].registry
    answers = registry.get_sample_value("botgate_platform_api_calls_per_answer_count", {"platform": s.platform})
    calls = registry.get_sample_value("botgate_platform_api_calls_per_answer_sum", {"platform": s.platform})
    return {
        "month": b.month,
        "used": b.used,
        "budget": b.budget,
        "ratio": b.ratio,
        "state": b.state.value,
        "refused": b.refused,
        "detail": quota_detail(b) if b.state is BudgetState.SPENT else "",
        "per_answer": calls / answers if answers and calls is not None else None,
    }


def bot_agents(cfg: Config, platform: str, bot: str) -> tuple[str, list[dict[str, str]]]:
    """The agent that answers a bot's conversations (its own, or a `[[routes]]` entry naming no
    conversation), and the conversations routes send to another agent."""
    agent = cfg.agent_for(platform, bot, "")
    routed: dict[str, str] = {}
    for r in cfg.routes:
        if r.conversation and r.conversation not in routed and r.matches(platform, bot, r.conversation):
            routed[r.conversation] = cfg.agent_for(platform, bot, r.conversation)  # first match wins
    return agent, [{"conversation": c, "agent": a} for c, a in routed.items() if a != agent]


def _channels(request: web.Request, now: float) -> list[dict[str, Any]]:
    out = []
    cfg = request.app[LIVE].config
    for channel in request.app[CHANNELS].values():
        s = channel.status()
        agent, routed = bot_agents(cfg, s.platform, s.bot)
        out.append(
            {
                "platform": s.platform,
                "bot": s.bot,
                "name": s.platform if s.bot == "default" else s.key,
                "agent": agent,
                "routed": routed,
                "state": s.state.value,
                "ready": s.ready,
                "transports": list(s.transports),
                "connected_since": s.connected_since,
                "reconnects": s.reconnects,
                "last_event_age": None
                if s.last_event_at is None
                else max(0.0, now - s.last_event_at),
                "last_error": s.last_error,
                "detail": s.detail,
                "budget": _budget(request, s),
            }
        )
    for platform, detail in unconfigured_platforms(request).items():
        if not any(c.status().platform == platform for c in request.app[CHANNELS].values()):
            out.append(
                {
                    "platform": platform,
                    "bot": "default",
                    "name": platform,
                    "agent": "",
                    "routed": [],
                    "state": "not configured",
                    "ready": False,
                    "transports": [],
                    "connected_since": None,
                    "reconnects": 0,
                    "last_event_age": None,
                    "last_error": "",
                    "detail": detail,
                    "budget": None,
                }
            )
    return out


def _key_age(app: web.Application, cfg: Config) -> dict[str, Any]:
    """The configured secrets first seen more than `MAX_AGE_DAYS` ago: their config key, a few
    digits of the fingerprint to tell them apart, and their age (never the key itself)."""
    on = today()
    old = too_old(app[KEY_AGES].ages(cfg), on)
    return {
        "max_age_days": MAX_AGE_DAYS,
        "old": [
            {"name": k.name, "hint": k.hint, "first_seen": str(k.first_seen), "age_days": k.days(on)} for k in old
        ],
    }


async def snapshot(request: web.Request) -> dict[str, Any]:
    """Everything the status page shows, as JSON-able data (also `GET /api/status`)."""
    app = request.app
    now = time.time()
    live = app[LIVE]
    cfg = live.config
    stats = app[METRICS].stats
    dispatcher = app[DISPATCHER]
    model = app[RESPONDER].model
    ratio_5m, replies_5m = stats.error_ratio(5)
    ratio_60m, replies_60m = stats.error_ratio(60)
    monitor = app.get(ALERTS)
    # No credential in anything shown: tickets or keys in error texts, passwords in URLs.
    return redacted({
        "version": __version__,
        "now": now,
        "started_at": app[STARTED_AT],
        "uptime": now - app[STARTED_AT],
        "channels": _channels(request, now),
        "traffic": {
            "received_total": stats.received_total,
            "replies_total": stats.replies_total,
            "failed_total": stats.failed_total,
            "per_minute": {
                "received": stats.received.series(now),
                "replied": stats.replied.series(now),
                "failed": stats.failed.series(now),
            },
            "queue_depth": dispatcher.depth,
            "max_queue": dispatcher.cfg.max_queue,
            "inflight": dispatcher.inflight,
            "max_concurrency": dispatcher.cfg.max_concurrency,
            "spilled": dispatcher.spilled,  # held in memory while the store refuses messages
            "spill_max": dispatcher.cfg.spill_max,
            "accepting": dispatcher.accepting,
        },
        "latency": {
            "overhead": _latency(stats.overhead.percentiles(now)),
            "model": _latency(stats.model_time.percentiles(now)),
        },
        "errors": {
            "ratio_5m": ratio_5m,
            "replies_5m": replies_5m,
            "ratio_60m": ratio_60m,
            "replies_60m": replies_60m,
        },
        "model": {
            "name": model.name,
            "configured": model.name != "echo",
            "provider": cfg.model.provider,
            "calls": stats.model_calls,
            "failures": stats.model_failures,
            "failure_streak": stats.model_failure_streak,
            "last_error": stats.last_model_error,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "cache_enabled": cfg.cache.enabled,
            "cache_hits": stats.cache_hits,
            "cache_misses": stats.cache_misses,
            "cache_hit_rate": stats.cache_hit_rate,
        },
        "store": await _store_health(app),
        "usage": await _usage_today(app, cfg),
        "schedules": await schedules(app),
        "key_age": _key_age(app, cfg),
        "admin": {
            "password_set": bool(cfg.admin.password),
            "ephemeral_secret": bool(cfg.admin.password and not cfg.admin.jwt_secret),
            "metrics_protected": bool(cfg.admin.metrics_token),
        },
        "alerts": {
            "sinks": configured_sinks(cfg.alerts),
            "active": [
                {
                    "key": i.key,
                    "title": i.title,
                    "detail": i.detail,
                    "since": i.since,
                    "notified": i.notified,
                }
                for i in (monitor.incidents if monitor else [])
            ],
        },
        "config": {
            "source": cfg.source,
            "reloaded_at": live.reloaded_at,
            "needs_restart": list(live.needs_restart),
            "settings": masked(cfg),
        },
    }, cfg.secrets())  # fmt: skip


# -- presentation ---------------------------------------------------------------------------------
def chart(per_minute: dict[str, list[int]]) -> dict[str, Any]:
    """Polyline points for the last hour's per-minute series, scaled to the chart box."""
    peak = max(1, *per_minute["received"], *per_minute["replied"])
    step = CHART_W / (len(per_minute["received"]) - 1)

    def points(series: list[int]) -> str:
        return " ".join(
            f"{i * step:.1f},{CHART_H - v * (CHART_H - 4) / peak:.1f}" for i, v in enumerate(series)
        )

    return {
        "w": CHART_W,
        "h": CHART_H,
        "peak": peak,
        "received": points(per_minute["received"]),
        "replied": points(per_minute["replied"]),
        "failed": points(per_minute["failed"]),
    }


def fmt_age(seconds: float | None, t: Translator | None = None) -> str:
    """At most two units ("1 min 1 s"); `t` words them (default: English)."""
    if seconds is None:
        return "—"
    t = t or translator(Locale.EN)
    s = int(seconds)
    if s < 60:
        return t(N_("{s} s"), s=s)
    if s < 3600:
        return t(N_("{m} min {s} s"), m=s // 60, s=s % 60)
    if s < 86400:
        return t(N_("{h} h {m} min"), h=s // 3600, m=s % 3600 // 60)
    return t(N_("{d} d {h} h"), d=s // 86400, h=s % 86400 // 3600)


@jinja2.pass_context
def _age(context: Context, seconds: float | None) -> str:
    return fmt_age(seconds, translator(context.get("locale")))


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:,.0f} ms"


def fmt_pct(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio * 100:.2f} %"


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_num(n: int | float) -> str:
    return f"{n:,}"


def context(snap: dict[str, Any], locale: Locale = DEFAULT_LOCALE) -> dict[str, Any]:
    return {"s": snap, "chart": chart(snap["traffic"]["per_minute"]), "locale": locale}


# -- HTTP -----------------------------------------------------------------------------------------
class StatusFeed:
    """Pushes the re-rendered page body to every open `/status/events` stream."""

    def __init__(self) -> None:
        self._wakeups: set[asyncio.Event] = set()
        self._closing = False

    async def page(self, request: web.Request) -> web.Response:
        return aiohttp_jinja2.render_template(
            "status.html", request, context(await snapshot(request), locale_of(request))
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        headers = {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        }
        if request.method == "HEAD":  # nothing would ever be sent: do not hold the connection
            return web.Response(headers=headers)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        stats = request.app[METRICS].stats
        live = request.app[LIVE]
        wakeup = asyncio.Event()
        self._wakeups.add(wakeup)
        stats.add_listener(wakeup)
        live.add_listener(wakeup)
        # The stream ends with the login, so an expired session stops seeing the page; the
        # browser reconnects, gets 401, and status.js sends it to the login page.
        ends = request.get(SESSION_EXPIRES, math.inf)
        locale = locale_of(request)  # the page's: the browser asks for both alike
        try:
            await response.write(b"retry: 2000\n\n")
            while not self._closing and time.time() < ends and still_logged_in(request):
                wakeup.clear()
                snap = await snapshot(request)
                html = aiohttp_jinja2.render_string("status_body.html", request, context(snap, locale))
                data = orjson.dumps({"at": snap["now"], "html": html})
                await response.write(b"event: status\ndata: " + data + b"\n\n")
                await asyncio.sleep(MIN_GAP)  # coalesce bursts: one render per MIN_GAP at most
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(REFRESH, max(0.0, ends - time.time()))):
                        await wakeup.wait()
        except ConnectionError:
            pass  # the browser went away
        except Exception:  # headers are out: a JSON 500 is impossible now, so log and end it
            log.exception("status feed failed")
        finally:
            stats.remove_listener(wakeup)
            live.remove_listener(wakeup)
            self._wakeups.discard(wakeup)
        return response

    async def close(self, app: web.Application) -> None:
        """on_shutdown: end the streams so a graceful stop does not wait for them."""
        self._closing = True
        for wakeup in self._wakeups:
            wakeup.set()


def setup(app: web.Application) -> None:
    env = aiohttp_jinja2.get_env(app)
    env.filters.update(age=_age, ms=fmt_ms, pct=fmt_pct, time=fmt_time, num=fmt_num)
    feed = StatusFeed()
    app.on_shutdown.append(feed.close)
    app.router.add_get("/", feed.page)
    app.router.add_get("/status/events", feed.events)
