"""Proactive messages: the outbox between "accepted" (the send API's 202, a schedule's run, an alert
for a conversation) and "delivered", and the courier that delivers it (docs/api.md).

`Outbox.enqueue` checks a `SendRequest` against the bot it names (`SendRefused` names the field) and
writes it to the store's outbox in one atomic step with its idempotency key: from then on it
survives kill -9, and the next process (or, on a shared store, any instance) delivers it.

The courier (`Outbox.run`) takes queued entries oldest first. Entries for one target (a group, a
user) go out one at a time, in the order accepted; different targets at once, up to
`CONCURRENCY`. On a shared store each attempt runs under a lease on the entry, and the entry is
re-read under it, so two instances never send the same message. An attempt's outcome:
- delivered: `sent`;
- the platform throttled it (`Throttled`): attempted again after the wait it asked for;
- a failure that repeating cannot make worse (`PlatformError.retryable`: the message was not
  taken, or the platform de-duplicates it): attempted again with capped backoff, until
  `[api] retry_for` seconds after it was accepted, then `failed`;
- anything else (a refusal, or a send whose outcome is unknown and that the platform does not
  de-duplicate): `failed` at once with the platform's reason, never sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol, runtime_checkable

from .capability import supports
from .channel import Channel
from .config import ApiConfig
from .errors import PlatformError, StoreError, Throttled
from .metrics import Metrics
from .store import FAILED, QUEUED, SENT, OutboxEntry, Store, lease_store

log = logging.getLogger(__name__)

TARGET_KINDS = ("conversation", "user")
CONCURRENCY = 8  # targets delivered to at once
BATCH = 200  # queued entries read per look
LEASE_TTL = 60.0  # an attempt takes at most an API call's time; a dead holder's entry is free after this
RESCAN_SHARED = 5.0  # on a shared store, look for entries other instances queued this often
RESCAN_LOCAL = 60.0  # otherwise only as a backstop: every enqueue and attempt wakes the courier
STORE_RETRY = 5.0  # after the store failed
ELSEWHERE_RETRY = 1.0  # an entry another instance holds the lease of: looked at again after this
BACKOFF_FIRST, BACKOFF_CAP = 2.0, 300.0
MAX_IDEMPOTENCY_KEY = 200


@dataclass(frozen=True, slots=True)
class SendRequest:
    """A message to push into a conversation (group) or to a user, on behalf of `origin`."""

    platform: str
    bot: str
    to_kind: str  # "conversation" | "user"
    to: str
    text: str
    markdown: bool
    origin: str  # "token:<name>", "schedule:<name>", "alertmanager": for the log, never a secret
    idempotency_key: str = ""  # scoped by origin before it is stored


class SendRefused(ValueError):
    """A request the outbox does not take; `field` names what is wrong (the API's 400)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


@runtime_checkable
class Pusher(Protocol):
    """What a channel that can send proactively offers (a platform adapter)."""

    def push_limit(self, markdown: bool) -> int:
        """The most UTF-8 bytes one proactive message may carry on this platform."""

    async def push(self, entry: OutboxEntry) -> None:
        """Deliver `entry` (its target, text, markdown flag; `entry.id` as an idempotency key where
        the platform has one). Raises `PlatformError` (`Throttled` for a rate limit)."""


def _target(entry: OutboxEntry) -> str:
    return f"{entry.platform}/{entry.bot}/{entry.to_kind}/{entry.to}"


class Outbox:
    def __init__(
        self,
        store: Store,
        channels: Mapping[str, Channel],
        metrics: Metrics,
        config: Callable[[], ApiConfig],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._channels = channels  # "<platform>/<bot>" -> channel; pushers among them
        self._metrics = metrics
        self._config = config
        self._clock = clock
        self._owner = uuid.uuid4().hex
        self._wake = asyncio.Event()
        self._busy: dict[str, asyncio.Task[None]] = {}  # target -> its attempt in flight
        # entry id -> when to look again (another instance has it, or the store failed its attempt)
        self._elsewhere: dict[str, float] = {}
        # An attempt's outcome the store did not take (entry id -> it): written again, never sent again.
        self._unrecorded: dict[str, OutboxEntry] = {}
        self._changed = asyncio.Event()  # replaced on every recorded outcome (tests, `settled`)

    # -- accepting -------------------------------------------------------------------------------
    def pusher(self, platform: str, bot: str) -> Pusher | None:
        channel = self._channels.get(f"{platform}/{bot}")
        return channel if supports(channel, Pusher) else None

    def check(self, request: SendRequest) -> None:
        """Raise `SendRefused` naming the first field the outbox cannot take."""
        platforms = sorted({key.split("/", 1)[0] for key, c in self._channels.items() if supports(c, Pusher)})
        if request.platform not in platforms:
            known = ", ".join(platforms) or "none is configured"
            raise SendRefused("platform", f"no bot of platform {request.platform!r} is configured ({known})")
        pusher = self.pusher(request.platform, request.bot)
        if pusher is None:
            bots = sorted(
                key.split("/", 1)[1]
                for key, c in self._channels.items()
                if key.startswith(f"{request.platform}/") and supports(c, Pusher)
            )
            raise SendRefused("bot", f"no {request.platform} bot named {request.bot!r} (bots: {', '.join(bots)})")
        if request.to_kind not in TARGET_KINDS:
            raise SendRefused("to_kind", f"must be one of {', '.join(TARGET_KINDS)}")
        if not request.to.strip():
            raise SendRefused(request.to_kind, "must not be empty")
        field = "markdown" if request.markdown else "text"
        if not request.text.strip():
            raise SendRefused(field, "must not be empty")
        size, limit = len(request.text.encode()), pusher.push_limit(request.markdown)
        if size > limit:
            raise SendRefused(field, f"is {size:,} bytes; a {request.platform} message takes at most {limit:,}")
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise SendRefused("idempotency_key", f"must be at most {MAX_IDEMPOTENCY_KEY} characters")

    async def enqueue(self, request: SendRequest) -> tuple[OutboxEntry, bool]:
        """Check and durably queue `request`: (its entry, True), or (the entry an earlier request
        with the same idempotency key made, False). Raises `SendRefused`, `StoreError`."""
        self.check(request)
        key = f"{request.origin}:{request.idempotency_key}" if request.idempotency_key else ""
        entry = OutboxEntry(
            id=uuid.uuid4().hex,
            platform=request.platform,
            bot=request.bot,
            to_kind=request.to_kind,
            to=request.to,
            text=request.text,
            markdown=request.markdown,
            origin=request.origin,
            created_at=self._clock(),
            idempotency_key=key,
        )
        stored = await self._store.outbox_add(entry, self._config().keep_for)
        fresh = stored.id == entry.id
        if fresh:
            self._metrics.outbox.labels(request.platform, "queued").inc()
            self._wake.set()
        return stored, fresh

    async def get(self, entry_id: str) -> OutboxEntry | None:
        return await self._store.outbox_get(entry_id)

    async def settled(self, entry_id: str) -> OutboxEntry:
        """Until the entry is sent or failed (by this process; bound it yourself)."""
        while True:
            changed = self._changed
            entry = await self._store.outbox_get(entry_id)
            if entry is None or entry.done:
                if entry is None:
                    raise KeyError(entry_id)
                return entry
            await changed.wait()

    # -- delivering ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Deliver until cancelled (a `cleanup_ctx` task)."""
        rescan = RESCAN_SHARED if self._store.shared else RESCAN_LOCAL
        try:
            while True:
                self._wake.clear()
                try:
                    wait = self._start_due(await self._store.outbox_queued(BATCH), rescan)
                except StoreError as e:
                    log.warning("could not read the outbox: %s", e)
                    wait = STORE_RETRY
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
        finally:
            tasks = list(self._busy.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start_due(self, queued: list[OutboxEntry], rescan: float) -> float:
        """Start an attempt for the oldest entry of every idle target that is due; the seconds
        until the next entry falls due (at most `rescan`)."""
        now, wait = self._clock(), rescan
        queued_ids = {entry.id for entry in queued}
        self._elsewhere = {i: t for i, t in self._elsewhere.items() if i in queued_ids}
        self._unrecorded = {i: e for i, e in self._unrecorded.items() if i in queued_ids}
        seen: set[str] = set()
        for entry in queued:
            target = _target(entry)
            if target in seen:  # a target's entries go out in order: only its oldest is next
                continue
            seen.add(target)
            if target in self._busy:
                continue
            due = max(entry.next_at, self._elsewhere.get(entry.id, 0.0))
            if due > now:
                wait = min(wait, due - now)
                continue
            if len(self._busy) >= CONCURRENCY:
                break  # an attempt ending wakes the courier
            task = asyncio.create_task(self._attempt(entry), name=f"outbox:{entry.id}")
            self._busy[target] = task
            task.add_done_callback(partial(self._finished, target))
        return max(wait, 0.0)

    def _finished(self, target: str, _: asyncio.Task[None]) -> None:
        self._busy.pop(target, None)
        self._wake.set()

    async def _attempt(self, entry: OutboxEntry) -> None:
        leases = lease_store(self._store)
        lease = f"outbox:{entry.id}"
        try:
            if leases is not None:
                if not await leases.acquire_lease(lease, self._owner, LEASE_TTL):
                    self._elsewhere[entry.id] = self._clock() + ELSEWHERE_RETRY  # another instance is at it
                    return
                self._elsewhere.pop(entry.id, None)
                current = await self._store.outbox_get(entry.id)
                if current is None or current.done or current.attempts != entry.attempts:
                    return  # delivered or tried meanwhile: the next look sees its new state
                entry = current
            done = self._unrecorded.get(entry.id) or await self._deliver(entry)
            try:
                await self._store.outbox_update(done, self._config().keep_for)
            except StoreError:
                self._unrecorded[entry.id] = done  # sent (or refused) already: only the record is owed
                raise
            self._unrecorded.pop(entry.id, None)
            self._record(done)
        except StoreError as e:
            # Not looked at again at once: the store refusing writes while reads work (a full disk,
            # Redis at maxmemory) would otherwise spin this entry's attempts.
            self._elsewhere[entry.id] = self._clock() + STORE_RETRY
            log.warning("outbox entry not updated: %s", e, extra={"outbox_id": entry.id})
        finally:
            if leases is not None:
                with contextlib.suppress(StoreError):
                    await leases.release_lease(lease, self._owner)

    async def _deliver(self, entry: OutboxEntry) -> OutboxEntry:
        """One attempt; the entry as it stands after it."""
        pusher = self.pusher(entry.platform, entry.bot)
        attempts = entry.attempts + 1
        if pusher is None:
            return self._fail(entry, attempts, f"{entry.platform} bot {entry.bot!r} is no longer configured")
        try:
            await pusher.push(entry)
        except Throttled as e:
            return self._retry(entry, attempts, str(e), e.retry_after)
        except PlatformError as e:
            if not e.retryable:
                return self._fail(entry, attempts, str(e))
            delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (attempts - 1)) * (0.5 + random.random() / 2)
            return self._retry(entry, attempts, str(e), delay)
        except Exception as e:  # a bug in a pusher: recorded, never retried blindly
            log.exception("outbox delivery failed", extra={"outbox_id": entry.id})
            return self._fail(entry, attempts, f"internal error: {type(e).__name__}")
        return replace(entry, state=SENT, attempts=attempts, reason="", done_at=self._clock())

    def _retry(self, entry: OutboxEntry, attempts: int, why: str, delay: float) -> OutboxEntry:
        now = self._clock()
        if now + delay > entry.created_at + self._config().retry_for:
            return self._fail(entry, attempts, f"not delivered within retry_for ({why})")
        log.info(
            "outbox delivery will be retried: %s",
            why,
            extra={
                "outbox_id": entry.id,
                "platform": entry.platform,
                "attempt": attempts,
                "retry_in_s": round(delay, 1),
            },
        )
        return replace(entry, state=QUEUED, attempts=attempts, reason=why, next_at=now + delay)

    def _fail(self, entry: OutboxEntry, attempts: int, why: str) -> OutboxEntry:
        return replace(entry, state=FAILED, attempts=attempts, reason=why, done_at=self._clock())

    def _record(self, entry: OutboxEntry) -> None:
        if entry.done:
            self._metrics.outbox.labels(entry.platform, entry.state).inc()
            log.log(
                logging.INFO if entry.state == SENT else logging.WARNING,
                "outbox message %s",
                entry.state,
                extra={
                    "outbox_id": entry.id,
                    "platform": entry.platform,
                    "bot": entry.bot,
                    "origin": entry.origin,
                    "attempts": entry.attempts,
                    "reason": entry.reason,
                },
            )
        self._changed.set()
        self._changed = asyncio.Event()
