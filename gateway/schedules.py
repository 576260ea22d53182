"""Scheduled posts (`[[schedules]]`, docs/api.md "Scheduled posts"): at every due time of a schedule's
cron expression, in its time zone, its `text` (as is) or its agent's answer to its `prompt` is
queued in the outbox (`gateway.outbox`) for its conversation or user.

Exactly once per due time, however many instances share the store: the instance that wins
`Store.claim("schedule:<name>:<due>")` runs it (the others skip it), and the outbox's idempotency key
(the same string, once the outbox scopes the due time by the origin `schedule:<name>`) keeps a
second run of that due time from posting twice. What each run came to
(the `RunRecord`) is kept in the store, so every instance's status page shows it.

After downtime, missed due times are not replayed in a flood: at start, a schedule runs its last
due time before now once, if it has not run it (and `catch_up` is on); never older ones. A schedule
the store has no record of (brand new) never runs for the past. A reload (the `schedules` section
applies live) wakes the loop: added schedules count from now, removed ones stop.

Due times come from cronsim (Debian cron semantics: the day-of-month / day-of-week OR rule, a
time skipped by a DST change runs when the clocks resume, a repeated one runs once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import orjson
from aiohttp import web
from cronsim import CronSim

from .backends import Backend, BackendRequest, Completion
from .config import DEFAULT_SYSTEM_PROMPT, Config, ScheduleConfig
from .draft import Draft
from .errors import ModelError, StoreError
from .i18n import N_, Locale, locale_for, translator
from .images_out import displayed
from .metrics import Metrics
from .outbox import Outbox, SendRefused, SendRequest
from .reasoning import shown
from .reload import LiveConfig
from .sanitize import safe_markdown
from .store import QUEUED, Store
from .tasks import stop_task

log = logging.getLogger(__name__)

MAX_SLEEP = 60.0  # the loop looks at the clock at least this often (a clock step, a stuck sleep)
STORE_RETRY = 5.0  # a due time the store could not decide on (claim failed) is tried again after this
LATE = 60.0  # a run this much past its due time was missed (the process was stopped or stalled)
CLAIM_TTL = 2 * 86400.0  # how long a due time's claim is kept: far beyond any clock skew or late run
RECORD_TTL = 400 * 86400.0  # a schedule's run record: longer than a yearly schedule's period
REPORT_TIMEOUT = 2.0  # the status page does not wait longer for a schedule's last result
RECORD_PREFIX = "schedule:"  # in the store's cache: "schedule:<name>" -> the `RunRecord`

# A run's result as the status page words it (`RunRecord.state`, or its outbox entry's).
RESULTS = (N_("queued"), N_("sent"), N_("failed"), N_("never run"), N_("unknown"))
NO_ANSWER = "the model returned an empty answer"


# -- due times (pure) -------------------------------------------------------------------------------
def next_due(schedule: ScheduleConfig, after: float) -> float | None:
    """The first due time strictly after `after` (epoch seconds), or None if it never comes."""
    start = datetime.fromtimestamp(after, ZoneInfo(schedule.timezone))
    with contextlib.suppress(StopIteration):
        return next(CronSim(schedule.cron, start)).timestamp()
    return None


def last_due(schedule: ScheduleConfig, at: float) -> float | None:
    """The latest due time at or before `at` (epoch seconds), or None."""
    # cronsim's reverse iteration starts strictly before its start: one second on (due times are
    # whole minutes) makes it "at or before".
    start = datetime.fromtimestamp(int(at) + 1, ZoneInfo(schedule.timezone))
    with contextlib.suppress(StopIteration):
        return next(CronSim(schedule.cron, start, reverse=True)).timestamp()
    return None


def due_iso(due: float) -> str:
    """A due time as the keys name it: the instant in UTC (the two 01:30s of a fall-back night differ)."""
    return datetime.fromtimestamp(due, UTC).isoformat()


def due_key(schedule: ScheduleConfig, due: float) -> str:
    """The claim of one due time, the same on every instance; also its outbox idempotency key (the
    outbox scopes a key by the origin, `schedule:<name>`, so the key given to it is `due_iso`)."""
    return f"schedule:{schedule.name}:{due_iso(due)}"


def local_time(schedule: ScheduleConfig, ts: float | None) -> str:
    """`ts` as the schedule's wall clock reads it ("2026-03-02 09:00"), "" for None."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, ZoneInfo(schedule.timezone)).strftime("%Y-%m-%d %H:%M")


# -- what a schedule's runs came to (kept in the store) -----------------------------------------------
@dataclass(frozen=True, slots=True)
class RunRecord:
    """A schedule as the store remembers it: since when it is known (no run before that counts as
    missed) and its last run: the due time, when it ran, and its outcome (`queued` with the outbox
    entry's id, or `failed` with the reason)."""

    since: float
    due: float | None = None
    ran_at: float | None = None
    state: str = ""  # "" (never run) | "queued" | "failed"
    entry: str = ""  # the outbox entry's id (queued)
    reason: str = ""  # why it failed

    def encode(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def decode(cls, raw: str) -> RunRecord:
        return cls(**orjson.loads(raw))


async def read_record(store: Store, name: str) -> RunRecord | None:
    raw = await store.cache_get(RECORD_PREFIX + name)
    if raw is None:
        return None
    try:
        return RunRecord.decode(raw)
    except (orjson.JSONDecodeError, TypeError) as e:
        log.warning("unreadable schedule record, starting afresh: %s", e, extra={"schedule": name})
        return None


async def write_record(store: Store, name: str, record: RunRecord) -> None:
    await store.cache_put(RECORD_PREFIX + name, record.encode(), RECORD_TTL)


# -- time, injectable (tests drive it) -------------------------------------------------------------
class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch."""

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        """Return after `seconds`, or as soon as `wake` is set."""


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await wake.wait()


# -- the prompt's answer ---------------------------------------------------------------------------
Clients = Callable[[], tuple[Backend, dict[str, Backend]]]  # (the default agent's, the listed agents')


def schedule_locale(cfg: Config, schedule: ScheduleConfig) -> Locale:
    """The language of the bot the schedule posts through (as its notices are worded)."""
    bot = next((b for b in cfg.bots if b.platform == schedule.platform and b.name == schedule.bot), None)
    own = getattr(bot.settings, "locale", "") if bot else ""
    domain = getattr(bot.settings, "domain", "") if bot else ""
    return locale_for(cfg.chat.locale, own, schedule.platform, domain)


async def ask_agent(cfg: Config, schedule: ScheduleConfig, model: Backend, agents: dict[str, Backend]) -> str:
    """The answer of the agent routed for the schedule's bot and conversation to its prompt, as it
    is posted: sanitized like any answer, thinking as `[model] reasoning` says (`fold` has no panel
    outside a card: stripped). Raises `ModelError` (an empty answer too)."""
    name = cfg.agent_for(schedule.platform, schedule.bot, schedule.conversation)
    client = agents.get(name, model)
    settings = cfg.agent(name).model if name in agents else cfg.model
    locale = schedule_locale(cfg, schedule)
    system = settings.system_prompt
    if system == DEFAULT_SYSTEM_PROMPT:
        system = translator(locale)(DEFAULT_SYSTEM_PROMPT)
    request = BackendRequest(
        [{"role": "system", "content": system}, {"role": "user", "content": schedule.prompt}],
        schedule.prompt,
        user=f"schedule:{schedule.name}",
        platform=schedule.platform,
        conversation_id=schedule.conversation,
        context=f"schedule:{schedule.name}",
        shared=bool(schedule.conversation),
        locale=locale,
    )
    draft = Draft()
    async with aclosing(client.stream(request, Completion())) as deltas:
        async for delta in deltas:
            draft.add(delta)
    draft.end()
    hosts = cfg.content.image_hosts

    def safe(text: str) -> str:
        return displayed(safe_markdown(text, hosts), hosts, locale, schedule.platform)

    answer = safe(draft.answer.strip())
    if not answer:
        raise ModelError(NO_ANSWER, reason="empty")
    return shown(safe(draft.reasoning), answer) if settings.reasoning == "show" else answer


# -- the loop --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Pending:
    schedule: ScheduleConfig  # as configured when `due` was computed (a changed entry starts afresh)
    due: float | None  # its next due time (None: never again)


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str  # "queued" | "failed"
    entry: str = ""
    reason: str = ""


class Scheduler:
    """Runs the `[[schedules]]` in force (`LiveConfig.config`, re-read every round). Due times in
    one round run one after the other (a prompt's model call included): a schedule is rarely due
    at the same minute as many others, and a late one is caught by `_due`."""

    def __init__(
        self,
        live: LiveConfig,
        store: Store,
        outbox: Outbox,
        clients: Clients,
        metrics: Metrics,
        clock: Clock | None = None,
    ) -> None:
        self._live = live
        self._store = store
        self._outbox = outbox
        self._clients = clients
        self._metrics = metrics
        self.clock = clock or SystemClock()
        self._pending: dict[str, Pending] = {}  # by schedule name
        # The schedules configured at start and not yet taken up (the store may not answer at
        # first): only these may catch up a run missed while the process was stopped.
        self._at_start: set[str] | None = None

    async def run(self) -> None:
        """Until cancelled (a `cleanup_ctx` task): one round per due time, reload or `MAX_SLEEP`."""
        wake = asyncio.Event()
        self._live.add_listener(wake)
        try:
            while True:
                wake.clear()
                try:
                    wait = await self.round()
                except Exception:  # the loop's edge: a bug in one round must not end the schedules
                    log.exception("schedule round failed")
                    wait = STORE_RETRY
                await self.clock.sleep(wait, wake)
        finally:
            self._live.remove_listener(wake)

    async def round(self) -> float:
        """Run what is due now; the seconds until the next look."""
        cfg, now = self._live.config, self.clock.now()
        schedules = {s.name: s for s in cfg.schedules}
        if self._at_start is None:
            self._at_start = set(schedules)
        for name in self._pending.keys() - schedules.keys():
            del self._pending[name]
            log.info("schedule removed", extra={"schedule": name})
        waits = [MAX_SLEEP]
        for schedule in schedules.values():
            pending = self._pending.get(schedule.name)
            if pending is None or pending.schedule != schedule:
                pending = await self._adopt(cfg, schedule, now)
            elif pending.due is not None and pending.due <= now:
                pending = await self._due(cfg, schedule, pending.due, now)
            if pending is None:  # the store did not answer: the same step again soon
                waits.append(STORE_RETRY)
                continue
            self._pending[schedule.name] = pending
            if pending.due is not None:
                waits.append(pending.due - now)
        return max(0.0, min(waits))

    async def _adopt(self, cfg: Config, schedule: ScheduleConfig, now: float) -> Pending | None:
        """A schedule this process takes up (at start, or added or changed by a reload): recorded as
        known from now when the store has no record of it; at start, its last missed due time run
        once (`catch_up`). None: the store did not answer."""
        assert self._at_start is not None
        try:
            record = await read_record(self._store, schedule.name)
            if record is None:
                await write_record(self._store, schedule.name, RunRecord(since=now))
        except StoreError as e:
            log.warning("schedule not started: store unavailable: %s", e, extra={"schedule": schedule.name})
            return None
        if record is not None and schedule.catch_up and schedule.name in self._at_start:
            missed = last_due(schedule, now)
            done = record.due if record.due is not None else record.since
            if missed is not None and missed > done:
                log.info(
                    "schedule missed a run while stopped: running the last one once",
                    extra={"schedule": schedule.name, "due": local_time(schedule, missed)},
                )
                if not await self._fire(cfg, schedule, missed):
                    return None
        self._at_start.discard(schedule.name)
        return Pending(schedule, next_due(schedule, now))

    async def _due(self, cfg: Config, schedule: ScheduleConfig, due: float, now: float) -> Pending | None:
        """`due` has come: run it (or, if the loop woke late, the latest due time that passed: never
        a backlog). None: the store did not answer (the due time stays pending)."""
        latest = last_due(schedule, now) or due
        if now - latest > LATE and not schedule.catch_up:
            log.warning(
                "schedule run missed (the process was stalled) and catch_up is off: skipped",
                extra={"schedule": schedule.name, "due": local_time(schedule, latest)},
            )
        elif not await self._fire(cfg, schedule, latest):
            return None
        return Pending(schedule, next_due(schedule, now))

    async def _fire(self, cfg: Config, schedule: ScheduleConfig, due: float) -> bool:
        """Run `due` if this instance wins its claim, and record what it came to. False: the store
        did not answer the claim (nothing ran)."""
        try:
            if not await self._store.claim(due_key(schedule, due), CLAIM_TTL):
                return True  # another instance (or an earlier run of this one) has it
        except StoreError as e:
            log.warning("schedule run postponed: store unavailable: %s", e, extra={"schedule": schedule.name})
            return False
        ran_at = self.clock.now()
        outcome = await self._execute(cfg, schedule, due)
        self._metrics.schedule_runs.labels(schedule.name, outcome.state).inc()
        try:
            known = await read_record(self._store, schedule.name)
            since = known.since if known else due
            record = RunRecord(since, due, ran_at, outcome.state, outcome.entry, outcome.reason)
            await write_record(self._store, schedule.name, record)
        except StoreError as e:
            log.warning("schedule run not recorded: %s", e, extra={"schedule": schedule.name})
        return True

    async def _execute(self, cfg: Config, schedule: ScheduleConfig, due: float) -> Outcome:
        """The post queued, or why not."""
        fields = {"schedule": schedule.name, "due": local_time(schedule, due)}

        def failed(why: str) -> Outcome:
            log.warning("schedule run failed: %s", why, extra=fields)
            return Outcome("failed", reason=why)

        text, markdown = schedule.text, False
        if schedule.prompt:
            model, agents = self._clients()
            try:
                text, markdown = await ask_agent(cfg, schedule, model, agents), True
            except ModelError as e:
                return failed(NO_ANSWER if e.reason == "empty" else f"model: {e.reason.replace('_', ' ')}")
            except Exception as e:  # a bug in a backend: recorded, the loop goes on
                log.exception("schedule prompt failed", extra=fields)
                return failed(f"internal error: {type(e).__name__}")
        to_kind, to = schedule.target
        request = SendRequest(
            schedule.platform, schedule.bot, to_kind, to, text, markdown, f"schedule:{schedule.name}", due_iso(due)
        )
        try:
            entry, _ = await self._outbox.enqueue(request)
        except SendRefused as e:
            return failed(f"refused: {e}")
        except StoreError as e:
            return failed(f"store unavailable: {e}")
        log.info("schedule run queued", extra={**fields, "outbox_id": entry.id})
        return Outcome(QUEUED, entry=entry.id)

    # -- what the status page and /api/schedules show ------------------------------------------------
    async def report(self) -> list[dict[str, Any]]:
        """Every configured schedule: its target, cron and zone, next run, and last run with its
        result (the outbox entry's state now, for a queued one). From the store: the same on every
        instance, whichever ran it."""
        cfg, now = self._live.config, self.clock.now()
        return [await self._row(s, now) for s in cfg.schedules]

    async def _row(self, schedule: ScheduleConfig, now: float) -> dict[str, Any]:
        to_kind, to = schedule.target
        nxt = next_due(schedule, now)
        row: dict[str, Any] = {
            "name": schedule.name,
            "platform": schedule.platform,
            "bot": schedule.bot,
            "target_kind": to_kind,
            "target": to,
            "cron": schedule.cron,
            "timezone": schedule.timezone,
            "posts": "prompt" if schedule.prompt else "text",
            "catch_up": schedule.catch_up,
            "next_run": nxt,
            "next_run_local": local_time(schedule, nxt),
        }
        try:
            async with asyncio.timeout(REPORT_TIMEOUT):
                record = await read_record(self._store, schedule.name)
                entry = await self._outbox.get(record.entry) if record and record.entry else None
        except (StoreError, TimeoutError) as e:
            why = f"store unavailable ({e})" if str(e) else "the store did not answer"
            return row | _last(None, schedule) | {"state": "unknown", "reason": why, "result": f"unknown: {why}"}
        last = _last(record, schedule)
        if entry is not None:  # what became of the post
            last |= {"state": entry.state, "reason": entry.reason if entry.done else last["reason"]}
        last["result"] = _result(last["state"], last["entry"], last["reason"])
        return row | last


def _last(record: RunRecord | None, schedule: ScheduleConfig) -> dict[str, Any]:
    due = record.due if record else None
    return {
        "last_run": due,
        "last_run_local": local_time(schedule, due),
        "ran_at": record.ran_at if record else None,
        "state": record.state if record and record.state else "never run",
        "entry": record.entry if record else "",
        "reason": record.reason if record else "",
    }


def _result(state: str, entry: str, reason: str) -> str:
    if state == QUEUED:
        return f"queued {entry}"
    if state == "failed":
        return f"failed: {reason}"
    return state  # "sent", "never run"


# -- wiring ----------------------------------------------------------------------------------------
async def schedules_ctx(app: web.Application) -> AsyncIterator[None]:
    """`cleanup_ctx` (after the outbox's courier): the scheduler under `app[SCHEDULER]`, its loop
    running while the app does. `app[SCHEDULE_CLOCK]`, if set, is its clock (tests)."""
    from .keys import LIVE, METRICS, OUTBOX, RESPONDER, SCHEDULE_CLOCK, SCHEDULER, STORE  # late: keys imports this

    responder = app[RESPONDER]

    def clients() -> tuple[Backend, dict[str, Backend]]:
        return responder.model, dict(responder.agents)  # the clients in force (reloads replace them)

    scheduler = Scheduler(app[LIVE], app[STORE], app[OUTBOX], clients, app[METRICS], app.get(SCHEDULE_CLOCK))
    app[SCHEDULER] = scheduler
    task = asyncio.create_task(scheduler.run(), name="schedules")
    yield
    await stop_task(task)

