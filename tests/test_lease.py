"""Two dispatchers on one Redis: the per-conversation lease keeps order and context and answers
each message once, whichever instance accepted it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.admission import Admission
from gateway.dispatcher import Dispatcher
from gateway.messages import InboundMessage
from gateway.metrics import Metrics, Outcome
from gateway.store import RedisStore, Store, Turn
from tests.conftest import make_config
from tests.helpers import msg

pytestmark = pytest.mark.redis


class Recorder:
    """A responder that answers from the shared context, like the real one, and records it."""

    def __init__(self, name: str, store: Store, log: list[tuple[str, str, list[str]]]) -> None:
        self.name = name
        self.store = store
        self.log = log
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None  # when set, answers wait for it

    async def handle(self, message: InboundMessage, ready_at: float) -> None:
        history = await self.store.context(message.conversation_key)
        self.log.append((self.name, message.text, [t.content for t in history]))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        await self.store.append_turns(
            message.conversation_key, [Turn("user", message.text)], 20, 10_000, 600
        )

    async def notice(self, message: InboundMessage, text: str, outcome: Outcome) -> None:
        self.log.append((self.name, f"notice: {text}", []))


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[tuple[Any, Any, list[tuple[str, str, list[str]]]]]:
    """Instances A and B: each its own store connection and dispatcher, one Redis."""
    log: list[tuple[str, str, list[str]]] = []
    cfg = make_config(dispatcher={"lease_ttl": 0.6}).dispatcher
    instances = []
    for name in ("A", "B"):
        store = RedisStore(redis_url)
        await store.open()
        recorder = Recorder(name, store, log)
        dispatcher = Dispatcher(cfg, store, Metrics(), recorder, instance_id=f"test-{name}")
        instances.append((dispatcher, store, recorder))
    yield instances[0], instances[1], log
    for dispatcher, store, _ in instances:
        await dispatcher.drain(5)
        await store.close()


async def idle(*dispatchers: Dispatcher) -> None:
    async with asyncio.timeout(10):
        for d in dispatchers:
            await d.wait_idle()


async def test_cross_delivered_duplicate_is_answered_once(pair: Any) -> None:
    (a, _, _), (b, _, _), log = pair
    first = msg(1)
    redelivered = dataclasses.replace(first, transport="webhook", request_id="other-request")
    admissions = await asyncio.gather(a.submit(first), b.submit(redelivered))
    assert sorted(admissions) == [Admission.ACCEPTED, Admission.DUPLICATE]
    await idle(a, b)
    assert [text for _, text, _ in log] == ["message 1"]


async def test_alternating_instances_keep_order_and_context(pair: Any) -> None:
    (a, store, _), (b, _, _), log = pair
    # Hold the conversation as a third party so all three messages queue up on both instances.
    assert await store.acquire_lease("dingtalk:c1", "someone-else", 30)
    for dispatcher, n in ((a, 1), (b, 2), (a, 3)):
        assert await dispatcher.submit(msg(n)) is Admission.ACCEPTED
    await store.release_lease("dingtalk:c1", "someone-else")
    await idle(a, b)
    assert [(text, seen) for _, text, seen in log] == [
        ("message 1", []),
        ("message 2", ["message 1"]),
        ("message 3", ["message 1", "message 2"]),
    ]
    assert await store.inbox_pending() == []


async def test_a_long_answer_keeps_its_lease(pair: Any) -> None:
    (a, store, recorder_a), (b, _, _), log = pair
    recorder_a.gate = asyncio.Event()
    await a.submit(msg(1))
    async with asyncio.timeout(5):
        await recorder_a.started.wait()
    await b.submit(msg(2))
    # Nothing to await here: the point is that time passes beyond the lease TTL (0.6 s) while
    # A still answers, and A's renewals keep B from answering message 1 a second time.
    await asyncio.sleep(1.5)
    assert [text for _, text, _ in log] == ["message 1"]
    recorder_a.gate.set()
    await idle(a, b)
    assert [(name, text) for name, text, _ in log] == [("A", "message 1"), ("B", "message 2")]
    assert await store.inbox_pending() == []


async def test_a_dead_instances_lease_expires(pair: Any) -> None:
    (a, store, _), _, log = pair
    assert await store.acquire_lease("dingtalk:c1", "crashed-instance", 0.5)
    await a.submit(msg(1))
    await idle(a)
    assert [text for _, text, _ in log] == ["message 1"]


async def test_a_dead_instances_accepted_messages_are_adopted(pair: Any) -> None:
    (a, store, recorder_a), (b, _, _), log = pair
    # Accepted by an instance that died (its lease already expired): only in the shared inbox.
    orphan = dataclasses.replace(msg(1, "c7"), created_at=time.time() - 1000)
    recent = msg(2, "c8")
    await store.admit(orphan, 60)
    await store.admit(recent, 60)
    recorder_a.gate = asyncio.Event()
    await a.submit(msg(3, "c9"))  # A's own, still being answered
    async with asyncio.timeout(5):
        await recorder_a.started.wait()
    assert await b.resume(older_than=300) == 1  # a recent one is left to its owner for now
    await idle(b)
    assert [(name, text) for name, text, _ in log] == [("A", "message 3"), ("B", "message 1")]
    assert await a.resume() == 1  # everything, except what A itself is already answering
    recorder_a.gate.set()
    await idle(a)
    assert sorted((name, text) for name, text, _ in log) == [
        ("A", "message 2"), ("A", "message 3"), ("B", "message 1")
    ]
    assert await store.inbox_pending() == []


async def test_the_lease_comes_with_its_conversations_pending_messages(redis_url: str) -> None:
    """What a worker answers under the lease is read with it, in one step: the conversation's
    pending messages oldest first (not another conversation's, not an answered one); nothing
    while another instance holds the lease, whose holder it stays."""
    store = RedisStore(redis_url)
    await store.open()
    try:
        first, other, second = msg(1), msg(2, "c2"), msg(3)
        for message in (first, other, second):
            await store.admit(message, 60)
        assert await store.lease_pending("dingtalk:c1", "a", 30) == [first, second]
        assert await store.lease_pending("dingtalk:c1", "b", 30) is None
        await store.inbox_done(first)
        admin = aioredis.Redis.from_url(redis_url)
        try:  # an id without its body (never written so by the store's scripts) is left out
            await admin.zadd("botgate:{inbox}:conv:dingtalk:c1", {"no-body": 0})
        finally:
            await admin.aclose()
        assert await store.lease_pending("dingtalk:c1", "a", 30) == [second]  # renewed by its holder
        assert await store.acquire_lease("dingtalk:c1", "b", 30) is False
        await store.release_lease("dingtalk:c1", "a")
        assert await store.lease_pending("dingtalk:c3", "b", 30) == []
    finally:
        await store.close()
