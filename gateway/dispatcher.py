"""The async dispatcher: bounded, ordered per conversation, concurrent across conversations,
deduplicated, back-pressured.

`submit()` is what every adapter calls. It returns only after the message is safely accepted
(dedup key claimed and message in the inbox, one atomic store step), so the adapter may ACK the
platform right then; the answer is produced later by a worker. One worker task exists per
conversation that has queued messages (so order is strict and idle conversations cost nothing); a
semaphore bounds how many messages are being answered at once.

While the store refuses messages, `submit()` holds them in memory (`Spill`, bounded by
`spill_max`) and answers `SPILLED`, which the platform is not acknowledged for; a background task
moves them into the inbox once the store takes writes, each conversation oldest first, and a later
message of a conversation with held messages goes in only behind them (docs/state.md).

Several instances may share one store (Redis). A worker answers only while holding the store's
lease on its conversation, and under it answers every still-pending message of that conversation up
to its own, oldest first, whichever instance accepted them. So consecutive messages landing on
different instances keep their order and context, and one answered elsewhere is not answered again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable
from contextlib import suppress
from typing import Protocol

from .admission import Admission
from .backoff import Backoff
from .config import DispatcherConfig
from .errors import StoreError
from .i18n import N_, translator
from .lease import Leases
from .messages import InboundMessage
from .metrics import Metrics, Outcome
from .spill import Spill
from .stopping import NOT_YOURS, NOTHING_TO_STOP, Answers, Stopped, is_stop
from .store import Store, lease_store
from .tasks import stop_task

log = logging.getLogger(__name__)

BUSY_NOTICE = N_("The assistant is busy right now. Please send your message again in a minute.")
APOLOGY = N_("Sorry, something went wrong while answering. Please try again. (ref {request_id})")
TIMEOUT_NOTICE = N_("Sorry, that took too long to answer. Please try again. (ref {request_id})")


class Responder(Protocol):
    async def handle(self, message: InboundMessage, ready_at: float) -> None:
        """Answer one message (model call, reply delivery).

        `ready_at` (wall clock) is when the message became its conversation's next to answer: its
        arrival, or later if it waited behind an earlier message of the same conversation or was
        resumed at start. Gateway overhead is measured from there, so another message's model
        time never counts as overhead.
        """

    async def notice(self, message: InboundMessage, text: str, outcome: Outcome) -> None:
        """Send a short notice (counted as `outcome`); must not raise."""


class Dispatcher:
    def __init__(
        self,
        cfg: DispatcherConfig,
        store: Store,
        metrics: Metrics,
        responder: Responder,
        instance_id: str = "",
        answers: Answers | None = None,
    ) -> None:
        self.cfg = cfg
        # Names the lease holder; unique even for two processes with one pid in two containers.
        self.instance_id = instance_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._store = store
        self._leases = Leases(lease_store(store), self.instance_id, cfg.lease_ttl)
        self._metrics = metrics
        self._responder = responder
        # The answers being written here: a /stop is taken at intake, not queued behind its answer.
        self._answers = answers
        self._queues: dict[str, deque[InboundMessage]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        # Per busy conversation, the message whose turn it is. It leaves its queue once it has a
        # slot, so what is queued or being answered here is in `_queues` or in `_heads`.
        self._heads: dict[str, InboundMessage] = {}
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(cfg.max_concurrency)
        self._depth = 0
        self._queued_by: Counter[str] = Counter()  # sender (user_key) -> its messages in `_queues`
        self._inflight = 0
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._started_at = time.time()
        # Messages the store refused, until it takes them (gateway/spill.py); `_unspill` moves them.
        self._spill = Spill(cfg.spill_max)
        self._unspiller: asyncio.Task[None] | None = None
        self._store_back = asyncio.Event()  # an admit just worked: the unspiller retries at once
        self._moving = asyncio.Lock()  # one mover of held messages at a time keeps their order

    # -- intake ------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._depth

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def conversations(self) -> int:
        """Conversations with messages queued or being answered here (idle ones cost nothing)."""
        return len(self._workers)

    @property
    def accepting(self) -> bool:
        return not self._closing

    async def submit(self, message: InboundMessage) -> Admission:
        if self._closing:
            return Admission.CLOSED
        if self._answers is not None and is_stop(message.text) and not message.attachments:
            return await self._stop(message)
        if self._spill.holds_conversation(message.conversation_key):
            # Its conversation's held messages go into the inbox first, or it would overtake them
            # (a redelivery of one of them then meets its dedup key there: ACKed as a duplicate).
            error = await self._move(message.conversation_key)
            if error is not None and self._spill.holds(message):  # a redelivery: nothing new
                self._metrics.dedup_dropped.labels(message.platform).inc()
                return Admission.SPILLED
            if error is not None:
                return self._hold(message, str(error))
        full = self._depth >= self.cfg.max_queue or self._over_share(message.user_key)
        try:
            # A full queue only claims the id: the sender is told to send again, so a platform
            # redelivery of this message must not bring a second notice.
            if full:
                fresh = await self._store.claim(message.dedup_key, self.cfg.dedup_ttl)
            else:
                fresh = await self._store.admit(message, self.cfg.dedup_ttl)
        except StoreError as e:
            if full:
                log.error("store unavailable, message not accepted: %s", e, extra=_fields(message))
                return Admission.UNAVAILABLE
            return self._hold(message, str(e))
        if self._spill:
            self._store_back.set()  # the store takes writes again: held messages go first
        if not fresh:
            self._metrics.dedup_dropped.labels(message.platform).inc()
            log.info("duplicate dropped", extra=_fields(message))
            return Admission.DUPLICATE
        if full:
            why = "queue full" if self._depth >= self.cfg.max_queue else "sender over its fair share"
            log.warning(f"{why}, sender told to retry", extra=_fields(message))
            self._spawn(self._notify(message, BUSY_NOTICE, Outcome.BUSY))
            return Admission.BUSY
        self._metrics.message_received(
            message.platform, message.transport, message.conversation_kind.value
        )
        self._enqueue(message)
        return Admission.ACCEPTED

    async def _stop(self, message: InboundMessage) -> Admission:
        """/stop, at intake (gateway/stopping.py): ends the answer being written in its
        conversation, which then shows the one text for both; else a short notice. Deduplicated
        like any message, never queued nor kept in the inbox."""
        assert self._answers is not None
        try:
            if not await self._store.claim(message.dedup_key, self.cfg.dedup_ttl):
                self._metrics.dedup_dropped.labels(message.platform).inc()
                return Admission.DUPLICATE
        except StoreError as e:  # stopping needs no store: a redelivery may bring a second notice
            log.warning("store unavailable, /stop taken without dedup: %s", e, extra=_fields(message))
        self._metrics.message_received(message.platform, message.transport, message.conversation_kind.value)
        outcome = self._answers.stop(message)
        if outcome is not Stopped.STOPPED:
            notice = NOTHING_TO_STOP if outcome is Stopped.NOTHING else NOT_YOURS
            self._spawn(self._notify(message, notice, Outcome.NOTICE))
        return Admission.ACCEPTED

    async def resume(self, older_than: float = 0.0) -> int:
        """Queue inbox entries nobody here is answering: at start, everything a previous process
        left; later (shared store), entries older than `older_than` seconds, left by an instance
        that died. The lease and the pending check under it make a second copy harmless."""
        cutoff = time.time() - older_than if older_than else math.inf  # at start: everything
        pending = await self._store.inbox_pending()
        here = {m.request_id for queue in self._queues.values() for m in queue}
        here.update(m.request_id for m in self._heads.values())
        orphans = [m for m in pending if m.request_id not in here and m.created_at <= cutoff]
        for message in orphans:
            self._enqueue(message)
        if orphans:
            log.info("resumed unanswered messages", extra={"count": len(orphans)})
        return len(orphans)

    def _enqueue(self, message: InboundMessage) -> None:
        key = message.conversation_key
        self._queues.setdefault(key, deque()).append(message)
        self._depth += 1
        self._queued_by[message.user_key] += 1
        self._metrics.queue_depth.set(self._depth)
        self._idle.clear()
        if key not in self._workers:
            task = asyncio.create_task(self._work(key), name=f"conversation:{key}")
            self._workers[key] = task

    # -- while the store refuses messages ------------------------------------------------------
    @property
    def spilled(self) -> int:
        """Messages held in memory because the store refused them (gateway/spill.py)."""
        return len(self._spill)

    def _hold(self, message: InboundMessage, why: str) -> Admission:
        """The store cannot take `message` now: hold it in memory, answered once the store takes
        it; or, when the spill is full (or `spill_max = 0`), refuse it."""
        if not self._spill.limit:
            log.error("store unavailable, message not accepted: %s", why, extra=_fields(message))
            return Admission.UNAVAILABLE
        if self._spill.full:
            self._metrics.spill.labels("refused").inc()
            log.error(
                "store unavailable and the spill is full, sender told to retry: %s", why,
                extra={**_fields(message), "spilled": len(self._spill)},
            )
            self._spawn(self._notify(message, BUSY_NOTICE, Outcome.BUSY))
            return Admission.BUSY
        self._spill.add(message)
        self._metrics.spill.labels("spilled").inc()
        self._metrics.spill_depth.set(len(self._spill))
        self._idle.clear()
        log.warning(
            "store unavailable, message held in memory until it is back: %s", why,
            extra={**_fields(message), "spilled": len(self._spill)},
        )
        if self._unspiller is None:
            self._unspiller = asyncio.create_task(self._unspill(), name="unspill")
        return Admission.SPILLED

    async def _unspill(self) -> None:
        """Move held messages into the inbox once the store takes them, conversation by
        conversation, retrying with backoff (at once after any other admit worked)."""
        backoff = Backoff(first=0.05, cap=1.0)
        try:
            while self._spill:
                self._store_back.clear()
                error = await self._move(self._spill.first_conversation())
                if error is None:
                    backoff = Backoff(first=0.05, cap=1.0)
                    continue
                if backoff.attempt == 0:
                    log.warning("store still unavailable, held messages wait: %s", error,
                                extra={"spilled": len(self._spill)})
                with suppress(TimeoutError):
                    async with asyncio.timeout(backoff.next()):
                        await self._store_back.wait()
        finally:
            self._unspiller = None
            if not self._workers and not self._spill:
                self._idle.set()

    async def _move(self, key: str) -> StoreError | None:
        """Move conversation `key`'s held messages into the inbox, oldest first; each then queues
        like a message just accepted. Stops at the first the store refuses (returns its error).
        One mover at a time: the unspiller, or a submit whose conversation has messages held."""
        async with self._moving:
            while self._spill.holds_conversation(key):
                message = self._spill.head(key)
                fresh: bool | None
                try:
                    fresh = await self._store.admit(message, self.cfg.dedup_ttl)
                except StoreError as e:
                    return e
                except Exception:  # a store bug must not hold every later message forever
                    log.exception("held message could not be admitted", extra=_fields(message))
                    fresh = None
                self._spill.pop(key)
                self._metrics.spill_depth.set(len(self._spill))
                if not self._spill:
                    self._store_back.set()  # a sleeping unspiller has nothing left: it ends
                if fresh is None:
                    self._metrics.spill.labels("refused").inc()
                    self._spawn(self._notify(message, APOLOGY, Outcome.ERROR))
                elif not fresh:  # admitted elsewhere: another instance, or an admit whose reply was lost
                    self._metrics.dedup_dropped.labels(message.platform).inc()
                    log.info("held message already in the inbox, dropped", extra=_fields(message))
                else:
                    self._metrics.spill.labels("recovered").inc()
                    self._metrics.message_received(
                        message.platform, message.transport, message.conversation_kind.value
                    )
                    log.info("held message accepted into the inbox", extra=_fields(message))
                    self._enqueue(message)
        return None

    # -- workers -----------------------------------------------------------------------------
    async def _work(self, key: str) -> None:
        queue = self._queues[key]
        ready_at = self._started_at  # messages resumed from the inbox are ready from now
        try:
            while queue:
                ready_at = await self._answer_head(key, queue, ready_at)
        finally:
            del self._workers[key]
            if not queue:
                del self._queues[key]
            if not self._workers and not self._spill:
                self._idle.set()

    async def _answer_head(self, key: str, queue: deque[InboundMessage], ready_at: float) -> float:
        """Answer the conversation's next message: under its lease, with every message still
        pending before it. Returns when the last of them was done: the next one is ready then."""
        head = queue[0]
        self._heads[key] = head
        try:
            async with self._leases.hold(key) as pending:
                for message in self._due(head, pending):
                    await self._answer_in_slot(message, head, queue, ready_at)
                    ready_at = time.time()
                if queue and queue[0] is head:  # answered elsewhere, skipped
                    self._dequeue(queue)
        finally:
            del self._heads[key]
        return ready_at

    async def _answer_in_slot(
        self, message: InboundMessage, head: InboundMessage, queue: deque[InboundMessage], ready_at: float
    ) -> None:
        async with self._slots:
            if message is head:  # it stops waiting only once it has a slot
                self._dequeue(queue)
            self._inflight += 1
            self._metrics.inflight.set(self._inflight)
            try:
                await self._answer(message, max(message.created_at, ready_at))
            finally:
                self._inflight -= 1
                self._metrics.inflight.set(self._inflight)
        await self._settle(message)

    def _dequeue(self, queue: deque[InboundMessage]) -> None:
        sender = queue.popleft().user_key
        self._depth -= 1
        self._queued_by[sender] -= 1
        if self._queued_by[sender] <= 0:
            del self._queued_by[sender]
        self._metrics.queue_depth.set(self._depth)

    def _over_share(self, sender: str) -> bool:
        """Fair share: once the queue is half full, the sender with the most queued messages (ties
        included) is the one told "busy", not whoever comes next. So one sender filling the queue
        stops at half of it and everyone else still gets in; a sender with nothing queued is only
        refused when the queue is really full."""
        if self._depth * 2 < self.cfg.max_queue:
            return False
        mine = self._queued_by.get(sender, 0)
        return mine > 0 and mine >= max(self._queued_by.values())

    @staticmethod
    def _due(message: InboundMessage, pending: list[InboundMessage] | None) -> list[InboundMessage]:
        """What to answer under the lease: the conversation's `pending` messages (read with the
        lease) up to `message`. With an unshared store (`pending` None) every pending message is
        queued here already, in order."""
        if pending is None:
            return [message]
        ids = [m.request_id for m in pending]
        if message.request_id not in ids:
            log.info("already answered, skipped", extra=_fields(message))
            return []
        return pending[: ids.index(message.request_id) + 1]

    async def _answer(self, message: InboundMessage, ready_at: float) -> None:
        """Run the responder under the deadline; any failure becomes a notice, never silence."""
        try:
            async with asyncio.timeout(self.cfg.deadline) as deadline:
                await self._responder.handle(message, ready_at)
        except Exception as e:
            # A TimeoutError from inside the responder is a plain failure, not our deadline.
            if isinstance(e, TimeoutError) and deadline.expired():
                log.error("deadline exceeded", extra=_fields(message))
                await self._notify(message, TIMEOUT_NOTICE, Outcome.TIMEOUT)
            else:
                log.exception("answer failed", extra=_fields(message))
                await self._notify(message, APOLOGY, Outcome.ERROR)

    async def _notify(self, message: InboundMessage, notice: str, outcome: Outcome) -> None:
        """`notice` (a msgid with at most a `{request_id}`) worded in the message's language.
        `Responder.notice` must not raise; if it does anyway, the worker still lives on."""
        try:
            text = translator(message.locale)(notice, request_id=message.request_id)
            await self._responder.notice(message, text, outcome)
        except Exception:
            log.exception("notice failed", extra=_fields(message))

    async def _settle(self, message: InboundMessage) -> None:
        """The message got its answer (or a notice): it leaves the inbox.

        While the store is unavailable this keeps trying (the conversation waits, still under its
        lease): given up, the entry would stay and be answered a second time by the next start or
        by another instance adopting it. Once shutdown has begun it does give up: the process is
        going away and cannot wait for the store."""
        backoff = Backoff(first=0.05, cap=1.0)
        while True:
            try:
                await self._store.inbox_done(message)
                if backoff.attempt:
                    log.info("message marked answered after the store came back", extra=_fields(message))
                return
            except StoreError as e:
                if self._closing:
                    log.error("message answered but left in the inbox: %s", e, extra=_fields(message))
                    return
                if backoff.attempt == 0:
                    log.error("could not mark message answered, retrying: %s", e, extra=_fields(message))
            except Exception as e:  # a store bug must not kill the conversation's worker either
                log.error("could not mark message answered: %s", e, extra=_fields(message))
                return
            await asyncio.sleep(backoff.next())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # -- shutdown ----------------------------------------------------------------------------
    def stop_intake(self) -> None:
        self._closing = True

    async def drain(self, timeout: float) -> bool:
        """Stop intake and wait up to `timeout` for queued and in-flight messages.

        Whatever is still running after that is cancelled; it stays in the inbox and is resumed
        by the next start. Messages held in memory (the store refused them) get into the inbox
        meanwhile if the store takes them; those it never took are lost, and logged.
        Returns True when everything finished.
        """
        self.stop_intake()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
                if self._side_tasks:
                    await asyncio.gather(*self._side_tasks, return_exceptions=True)
            await stop_task(self._unspiller)  # nothing left to move once idle
            return True
        except TimeoutError:
            log.warning(
                "drain timeout, unfinished messages stay in the inbox",
                extra={"queued": self._depth, "inflight": self._inflight},
            )
            if self._spill:
                self._metrics.spill.labels("lost").inc(len(self._spill))
                log.error(
                    "messages held in memory are lost: the store did not take them before shutdown",
                    extra={"count": len(self._spill), "request_ids": [m.request_id for m in self._spill]},
                )
            unspiller = [self._unspiller] if self._unspiller is not None else []
            tasks = [*self._workers.values(), *self._side_tasks, *unspiller]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return False

    async def wait_idle(self) -> None:
        await self._idle.wait()


def _fields(message: InboundMessage) -> dict[str, object]:
    return {
        "request_id": message.request_id,
        "user_id": message.user_key,
        "platform": message.platform,
        "message_id": message.message_id,
    }
