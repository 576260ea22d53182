"""The dispatcher fed `InboundMessage`s directly, with a recording responder at the seam.

The responder is the dispatcher's collaborator, not the code under test: it records what it is
asked to do and holds each answer until the test releases it, so every assertion waits on events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.admission import Admission
from gateway.config import DispatcherConfig
from gateway.dispatcher import APOLOGY, BUSY_NOTICE, TIMEOUT_NOTICE, Dispatcher
from gateway.i18n import translator
from gateway.messages import ConversationKind, InboundMessage
from gateway.metrics import Metrics, Outcome
from gateway.store import MemoryStore, SqliteStore

# A message without a locale (as one stored before messages carried one) is answered in the default, Chinese.
ZH = translator(None)
BUSY = ZH(BUSY_NOTICE)


def msg(conversation: str, message_id: str, platform: str = "dingtalk") -> InboundMessage:
    return InboundMessage(
        platform=platform,
        transport="stream",
        conversation_id=conversation,
        conversation_kind=ConversationKind.GROUP,
        sender_id="u1",
        sender_name="User",
        text=f"text of {message_id}",
        mentioned=True,
        message_id=message_id,
    )


@dataclass
class RecordingResponder:
    """Implements the dispatcher's `Responder` protocol; answers wait for `release(message_id)`."""

    hold: bool = True
    fail: dict[str, BaseException] = field(default_factory=dict)  # message id -> raised by handle
    events: list[tuple[str, str]] = field(default_factory=list)  # ("start"|"end"|"cancelled", id)
    notices: list[tuple[str, str]] = field(default_factory=list)  # (message id, text)
    ready_at: dict[str, float] = field(default_factory=dict)
    running: int = 0
    peak: int = 0
    notice_fails: bool = False
    _gates: dict[str, asyncio.Event] = field(default_factory=dict)
    _change: asyncio.Event = field(default_factory=asyncio.Event)

    def gate(self, message_id: str) -> asyncio.Event:
        return self._gates.setdefault(message_id, asyncio.Event())

    def release(self, *message_ids: str) -> None:
        for message_id in message_ids:
            self.gate(message_id).set()

    def release_all(self) -> None:
        """Stop holding answers: the held ones go on, later ones are not held."""
        self.hold = False
        for gate in self._gates.values():
            gate.set()

    def _changed(self) -> None:
        """Wake every waiter (each re-checks its predicate) and arm a fresh event."""
        self._change.set()
        self._change = asyncio.Event()

    def _record(self, kind: str, message_id: str) -> None:
        self.events.append((kind, message_id))
        self._changed()

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._change.wait()

    def started(self) -> list[str]:
        return [i for kind, i in self.events if kind == "start"]

    def ended(self) -> list[str]:
        return [i for kind, i in self.events if kind == "end"]

    async def handle(self, message: InboundMessage, ready_at: float) -> None:
        self.ready_at[message.message_id] = ready_at
        self.running += 1
        self.peak = max(self.peak, self.running)
        self._record("start", message.message_id)
        try:
            if self.hold:
                await self.gate(message.message_id).wait()
            if message.message_id in self.fail:
                raise self.fail[message.message_id]
        except asyncio.CancelledError:
            self._record("cancelled", message.message_id)
            raise
        finally:
            self.running -= 1
        self._record("end", message.message_id)

    async def notice(self, message: InboundMessage, text: str, outcome: Outcome) -> None:
        self.notices.append((message.message_id, text))
        self._changed()
        if self.notice_fails:
            raise RuntimeError("notice delivery broke")


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def make(store: MemoryStore) -> AsyncIterator[Any]:
    """Build a dispatcher around a recording responder; drained (bounded) at teardown."""
    made: list[tuple[Dispatcher, RecordingResponder]] = []

    def build(**cfg: Any) -> tuple[Dispatcher, RecordingResponder, Metrics]:
        responder = RecordingResponder()
        metrics = Metrics()
        dispatcher = Dispatcher(DispatcherConfig(**cfg), store, metrics, responder)
        made.append((dispatcher, responder))
        return dispatcher, responder, metrics

    yield build
    for dispatcher, responder in made:
        responder.release_all()
        await dispatcher.drain(5.0)


def assert_no_leftover_state(dispatcher: Dispatcher) -> None:
    """Idle conversations cost nothing: nothing is kept per conversation once it is answered."""
    assert dispatcher.conversations == 0
    assert dispatcher.depth == 0 and dispatcher.inflight == 0


async def test_one_conversation_is_answered_strictly_in_order(make: Any) -> None:
    dispatcher, responder, _ = make()
    for i in range(4):
        assert await dispatcher.submit(msg("c1", f"m{i}")) is Admission.ACCEPTED
    for i in range(4):
        await responder.wait_for(lambda i=i: responder.started() == [f"m{j}" for j in range(i + 1)])
        assert responder.running == 1  # the next one waits for this answer to finish
        responder.release(f"m{i}")
    await responder.wait_for(lambda: len(responder.ended()) == 4)
    assert responder.events == [(k, f"m{i}") for i in range(4) for k in ("start", "end")]
    await dispatcher.wait_idle()
    assert_no_leftover_state(dispatcher)


async def test_conversations_run_concurrently_up_to_max_concurrency(make: Any) -> None:
    dispatcher, responder, metrics = make(max_concurrency=3)
    for i in range(6):
        await dispatcher.submit(msg(f"c{i}", f"m{i}"))
    await responder.wait_for(lambda: len(responder.started()) == 3)
    assert dispatcher.inflight == 3 and dispatcher.depth == 3
    assert dispatcher.conversations == 6  # three answered, three waiting for a slot
    assert metrics.registry.get_sample_value("botgate_queue_depth") == 3
    assert metrics.registry.get_sample_value("botgate_inflight") == 3
    for i in range(6):  # free one slot at a time: each frees exactly one more start
        responder.release(f"m{i}")
        await responder.wait_for(lambda i=i: len(responder.ended()) == i + 1)
    await dispatcher.wait_idle()
    assert responder.peak == 3  # really concurrent, and never beyond the limit
    assert sorted(responder.ended()) == [f"m{i}" for i in range(6)]
    assert_no_leftover_state(dispatcher)


async def test_a_slow_conversation_does_not_block_others(make: Any) -> None:
    dispatcher, responder, _ = make()
    await dispatcher.submit(msg("slow", "s1"))
    await dispatcher.submit(msg("slow", "s2"))
    await dispatcher.submit(msg("fast", "f1"))
    responder.release("f1")
    await responder.wait_for(lambda: responder.ended() == ["f1"])
    assert responder.started() == ["s1", "f1"]  # s2 still waits behind s1
    responder.release("s1", "s2")
    await dispatcher.wait_idle()
    assert responder.ended() == ["f1", "s1", "s2"]


async def test_duplicates_within_dedup_ttl_are_dropped(make: Any) -> None:
    dispatcher, responder, metrics = make(dedup_ttl=0.2)
    responder.hold = False
    first = msg("c1", "same-id")
    assert await dispatcher.submit(first) is Admission.ACCEPTED
    again = msg("c1", "same-id")  # a redelivery: new object, same platform message id
    assert await dispatcher.submit(again) is Admission.DUPLICATE
    assert Admission.DUPLICATE.acknowledge  # the platform is ACKed so it stops redelivering
    # The same id on another platform is another message.
    assert await dispatcher.submit(msg("c1", "same-id", platform="feishu")) is Admission.ACCEPTED
    await dispatcher.wait_idle()
    assert responder.started() == ["same-id", "same-id"]
    assert metrics.registry.get_sample_value(
        "botgate_dedup_dropped_total", {"platform": "dingtalk"}
    ) == 1
    # After dedup_ttl the id is forgotten (bounded wait for the clock to pass it).
    async with asyncio.timeout(5):
        while await dispatcher.submit(msg("c1", "same-id")) is Admission.DUPLICATE:  # noqa: ASYNC110 - waiting for the clock
            await asyncio.sleep(0.05)
    await dispatcher.wait_idle()
    assert len(responder.started()) == 3


async def test_full_queue_tells_the_sender_at_once(make: Any, store: MemoryStore) -> None:
    dispatcher, responder, _ = make(max_queue=1, max_concurrency=1)
    await dispatcher.submit(msg("a", "m1"))
    await responder.wait_for(lambda: responder.started() == ["m1"])  # in flight, not queued
    assert await dispatcher.submit(msg("b", "m2")) is Admission.ACCEPTED  # waits for the slot
    overflow = msg("c", "m3")
    admission = await dispatcher.submit(overflow)
    assert admission is Admission.BUSY and admission.acknowledge
    # The notice goes out while m1 is still being answered: not after the queue drains.
    await responder.wait_for(lambda: responder.notices == [("m3", BUSY)])
    assert responder.started() == ["m1"]
    assert [m.message_id for m in await store.inbox_pending()] == ["m1", "m2"]
    responder.release("m1", "m2")
    await dispatcher.wait_idle()
    assert responder.ended() == ["m1", "m2"]  # m3 was never answered, only told


async def test_deadline_exceeded_sends_a_timeout_notice(make: Any, store: MemoryStore, caplog: Any) -> None:
    dispatcher, responder, _ = make(deadline=0.1)
    late = msg("c1", "m1")
    await dispatcher.submit(late)
    await dispatcher.submit(msg("c1", "m2"))
    await responder.wait_for(lambda: len(responder.notices) == 1)
    assert responder.notices == [("m1", ZH(TIMEOUT_NOTICE, request_id=late.request_id))]
    assert ("cancelled", "m1") in responder.events
    responder.release("m2")
    await dispatcher.wait_idle()
    assert responder.ended() == ["m2"]  # the conversation goes on
    assert await store.inbox_pending() == []  # a notice is an answer: nothing left to resume
    assert any(
        r.message == "deadline exceeded" and getattr(r, "request_id", None) == late.request_id
        for r in caplog.records
    )


async def test_responder_failure_gets_an_apology_with_the_request_id(make: Any, caplog: Any) -> None:
    dispatcher, responder, _ = make()
    responder.hold = False
    broken = msg("c1", "m1")
    responder.fail["m1"] = RuntimeError("boom")
    # A TimeoutError raised inside the responder is a failure, not the dispatcher's deadline.
    responder.fail["m2"] = TimeoutError()
    second = msg("c1", "m2")
    with caplog.at_level(logging.ERROR, logger="gateway.dispatcher"):
        await dispatcher.submit(broken)
        await dispatcher.submit(second)
        await dispatcher.submit(msg("c1", "m3"))
        await dispatcher.wait_idle()
    assert responder.notices == [
        ("m1", ZH(APOLOGY, request_id=broken.request_id)),
        ("m2", ZH(APOLOGY, request_id=second.request_id)),
    ]
    assert broken.request_id in ZH(APOLOGY, request_id=broken.request_id) != APOLOGY
    failed = [r for r in caplog.records if r.message == "answer failed"]
    assert [getattr(r, "request_id", None) for r in failed] == [broken.request_id, second.request_id]
    assert failed[0].exc_info is not None and "boom" in str(failed[0].exc_info[1])
    assert responder.ended() == ["m3"]  # the worker survived both


async def test_a_notice_that_raises_does_not_kill_the_worker(make: Any) -> None:
    dispatcher, responder, _ = make()
    responder.hold = False
    responder.notice_fails = True
    responder.fail["m1"] = RuntimeError("boom")
    await dispatcher.submit(msg("c1", "m1"))
    await dispatcher.submit(msg("c1", "m2"))
    await dispatcher.wait_idle()
    assert responder.ended() == ["m2"]
    assert_no_leftover_state(dispatcher)


async def test_drain_waits_for_in_flight_work(make: Any, store: MemoryStore) -> None:
    dispatcher, responder, _ = make()
    await dispatcher.submit(msg("c1", "m1"))
    await dispatcher.submit(msg("c1", "m2"))
    await responder.wait_for(lambda: responder.started() == ["m1"])
    drain = asyncio.create_task(dispatcher.drain(5.0))
    async with asyncio.timeout(5):
        while dispatcher.accepting:  # noqa: ASYNC110 - let the drain task start
            await asyncio.sleep(0)
    # Intake is closed: the adapter must not ACK (webhooks answer 503).
    closed = await dispatcher.submit(msg("c2", "late"))
    assert closed is Admission.CLOSED and not closed.acknowledge
    assert not drain.done()
    responder.release("m1", "m2")
    assert await drain is True
    assert responder.ended() == ["m1", "m2"]  # queued work was finished too
    assert await store.inbox_pending() == []
    assert_no_leftover_state(dispatcher)


async def test_drain_timeout_cancels_and_leaves_messages_in_the_inbox(
    make: Any, store: MemoryStore
) -> None:
    dispatcher, responder, _ = make(max_concurrency=1)
    await dispatcher.submit(msg("c1", "m1"))
    await dispatcher.submit(msg("c1", "m2"))  # queued behind m1
    await dispatcher.submit(msg("c2", "m3"))  # waiting for the only slot
    await responder.wait_for(lambda: responder.started() == ["m1"])
    assert await dispatcher.drain(0.1) is False
    assert ("cancelled", "m1") in responder.events
    assert responder.ended() == [] and responder.notices == []
    # Nothing is lost: all three are resumed by the next start.
    assert sorted(m.message_id for m in await store.inbox_pending()) == ["m1", "m2", "m3"]
    assert dispatcher.conversations == 0  # every worker was cancelled


async def test_resume_answers_what_a_previous_process_left(make: Any, store: MemoryStore) -> None:
    left = [msg("c1", "old1"), msg("c1", "old2"), msg("c2", "old3")]
    for m in left:
        await store.admit(m, 60)
    dispatcher, responder, _ = make()
    responder.hold = False
    assert await dispatcher.resume() == 3
    await dispatcher.wait_idle()
    ended = responder.ended()
    assert sorted(ended) == ["old1", "old2", "old3"]
    assert ended.index("old1") < ended.index("old2")  # order within a conversation is kept
    assert await store.inbox_pending() == []


async def test_resume_skips_what_this_process_already_accepted(
    make: Any, store: MemoryStore
) -> None:
    dispatcher, responder, _ = make()
    new, last = msg("c1", "new"), msg("c1", "next")
    await dispatcher.submit(new)  # an adapter was quicker than the resume
    await dispatcher.submit(last)  # queued behind it
    await responder.wait_for(lambda: responder.started() == ["new"])
    assert [m.message_id for m in await store.inbox_pending()] == ["new", "next"]
    assert await dispatcher.resume() == 0
    responder.release("new", "next")
    await dispatcher.wait_idle()
    assert responder.started() == ["new", "next"]  # each answered once, not twice
    assert_no_leftover_state(dispatcher)
    # Once answered, nothing of them is kept here: a message left in the inbox with one of
    # their request ids is resumed like any other.
    await store.admit(dataclasses.replace(msg("c1", "left"), request_id=last.request_id), 60)
    assert await dispatcher.resume() == 1
    responder.release("left")
    await dispatcher.wait_idle()
    assert responder.started() == ["new", "next", "left"]


async def test_ready_at_excludes_waiting_behind_the_same_conversation(make: Any) -> None:
    dispatcher, responder, _ = make()
    first, second = msg("c1", "m1"), msg("c1", "m2")
    await dispatcher.submit(first)
    await dispatcher.submit(second)
    await responder.wait_for(lambda: responder.started() == ["m1"])
    responder.release("m1")
    await responder.wait_for(lambda: responder.started() == ["m1", "m2"])
    assert responder.ready_at["m1"] == first.created_at  # ready on arrival
    assert responder.ready_at["m2"] > second.created_at  # ready once m1 was answered
    responder.release("m2")


async def full_disk(store: SqliteStore) -> None:
    """A real SQLITE_FULL from now on: the file capped at its size, as a full disk."""
    pages = await store.db.write(lambda conn, now: conn.execute("PRAGMA page_count").fetchone()[0])
    await store.db.write(lambda conn, now: conn.execute(f"PRAGMA max_page_count = {pages}"))


async def disk_has_room(store: SqliteStore) -> None:
    await store.db.write(lambda conn, now: conn.execute("PRAGMA max_page_count = 1073741823"))


def big(conversation: str, message_id: str) -> InboundMessage:
    """A message the full file cannot take (its dedup claim alone would fit)."""
    return dataclasses.replace(msg(conversation, message_id), text="x" * 20_000)


def spill_events(metrics: Metrics) -> dict[str, float]:
    events = ("spilled", "recovered", "refused", "lost")
    return {e: metrics.registry.get_sample_value("botgate_spill_total", {"event": e}) or 0.0 for e in events}


async def test_held_in_memory_while_the_disk_is_full_and_answered_in_order_once_it_has_room(
    tmp_path: Path,
) -> None:
    """The store refuses messages: they are held in memory (not acknowledged, since a crash would
    lose them), a redelivery of one is recognised, and once the store has room each is answered
    once, with no redelivery needed, in its conversation's order: a message arriving then for a
    conversation with held messages goes into the inbox behind them."""
    store = SqliteStore(tmp_path / "full.sqlite3")
    await store.open()
    responder = RecordingResponder(hold=False)
    metrics = Metrics()
    dispatcher = Dispatcher(DispatcherConfig(), store, metrics, responder)
    try:
        await full_disk(store)
        first, second, other = big("c1", "m1"), big("c1", "m2"), big("c2", "o1")
        for message in (first, second, other):
            admission = await dispatcher.submit(message)
            assert admission is Admission.SPILLED and not admission.acknowledge
        redelivered = dataclasses.replace(first, request_id="redelivery")
        assert await dispatcher.submit(redelivered) is Admission.SPILLED  # the same message, not a 4th
        assert dispatcher.spilled == 3 and responder.events == [] and dispatcher.depth == 0

        await disk_has_room(store)
        assert await dispatcher.submit(msg("c1", "m3")) is Admission.ACCEPTED  # behind m1 and m2
        async with asyncio.timeout(5):
            await dispatcher.wait_idle()
        assert [m for m in responder.ended() if m.startswith("m")] == ["m1", "m2", "m3"]
        assert sorted(responder.ended()) == ["m1", "m2", "m3", "o1"]  # each once
        assert await store.inbox_pending() == [] and dispatcher.spilled == 0
        assert spill_events(metrics) == {"spilled": 3, "recovered": 3, "refused": 0, "lost": 0}
        assert metrics.registry.get_sample_value("botgate_dedup_dropped_total", {"platform": "dingtalk"}) == 1
    finally:
        await dispatcher.drain(5.0)
        await store.close()


async def test_a_full_spill_tells_the_sender_and_what_shutdown_cannot_store_is_counted_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStore(tmp_path / "full.sqlite3")
    await store.open()
    responder = RecordingResponder(hold=False)
    metrics = Metrics()
    dispatcher = Dispatcher(DispatcherConfig(spill_max=1), store, metrics, responder)
    try:
        await full_disk(store)
        assert await dispatcher.submit(big("c1", "m1")) is Admission.SPILLED
        refused = await dispatcher.submit(big("c2", "o1"))  # the newest is refused, the oldest kept
        assert refused is Admission.BUSY and refused.acknowledge
        await responder.wait_for(lambda: responder.notices == [("o1", BUSY)])
        assert not await dispatcher.drain(0.2)  # the store never came back
        assert spill_events(metrics) == {"spilled": 1, "recovered": 0, "refused": 1, "lost": 1}
        assert any("held in memory are lost" in r.getMessage() for r in caplog.records)
        assert responder.events == []
    finally:
        await store.close()


async def test_refused_while_the_disk_is_full_and_admitted_when_redelivered(tmp_path: Path) -> None:
    """Without a spill (`spill_max = 0`), a real SQLITE_FULL: the message is not acknowledged, and
    the platform's redelivery, once there is room, is admitted and answered rather than dropped as
    a duplicate of a message that never reached the inbox."""
    store = SqliteStore(tmp_path / "full.sqlite3")
    await store.open()
    responder = RecordingResponder(hold=False)
    dispatcher = Dispatcher(DispatcherConfig(spill_max=0), store, Metrics(), responder)
    try:
        pages = await store.db.write(lambda conn, now: conn.execute("PRAGMA page_count").fetchone()[0])
        await store.db.write(lambda conn, now: conn.execute(f"PRAGMA max_page_count = {pages}"))
        big = dataclasses.replace(msg("c1", "m1"), text="x" * 20_000)  # its claim alone would fit
        admission = await dispatcher.submit(big)
        assert admission is Admission.UNAVAILABLE and not admission.acknowledge
        assert responder.events == [] and dispatcher.depth == 0

        await store.db.write(lambda conn, now: conn.execute("PRAGMA max_page_count = 1073741823"))
        redelivered = dataclasses.replace(big, request_id="redelivery")
        assert await dispatcher.submit(redelivered) is Admission.ACCEPTED
        await dispatcher.wait_idle()
        assert responder.ended() == ["m1"]
        assert await store.inbox_pending() == []
    finally:
        await dispatcher.drain(5.0)
        await store.close()
