"""Redis specifics: a clear error when unreachable at start, errors during an outage, recovery."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.errors import StoreError
from gateway.store import SENT, OutboxEntry, RedisStore, Turn
from tests.helpers import msg
from tests.redisd import RedisServer, free_port

pytestmark = pytest.mark.redis

NOTICE = OutboxEntry(
    "o1", "feishu", "default", "user", "ou_1", "notice", False, "token:ops", 1000.0, idempotency_key="token:ops:k"
)


async def test_unreachable_at_open_names_the_server_not_the_password() -> None:
    port = free_port()
    store = RedisStore(f"redis://:hunter2@127.0.0.1:{port}/0")
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert f"redis redis://127.0.0.1:{port}/0: unreachable" in str(caught.value)
    assert "hunter2" not in str(caught.value)


async def test_outage_raises_store_errors_then_recovers_by_itself(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    store = RedisStore(server.url)
    try:
        await store.open()
        assert await store.claim("dingtalk:1", 60)
        await asyncio.to_thread(server.stop)
        with pytest.raises(StoreError, match="unreachable"):
            await store.ping()
        with pytest.raises(StoreError, match="claim"):
            await store.claim("dingtalk:2", 60)
        with pytest.raises(StoreError, match="inbox add"):
            await store.admit(msg(2), 60)
        with pytest.raises(StoreError, match="backend session write"):
            await store.set_backend_session("dingtalk:c1", "conv-1", 60)
        with pytest.raises(StoreError, match="backend session read"):
            await store.backend_session("dingtalk:c1")
        with pytest.raises(StoreError, match="context reset"):
            await store.reset("dingtalk:c1")
        with pytest.raises(StoreError, match="outbox add"):
            await store.outbox_add(NOTICE, 60)
        with pytest.raises(StoreError, match="outbox read"):
            await store.outbox_get(NOTICE.id)
        with pytest.raises(StoreError, match="outbox update"):
            await store.outbox_update(NOTICE, 60)
        with pytest.raises(StoreError, match="outbox read"):
            await store.outbox_queued()

        await asyncio.to_thread(server.start)  # same port, empty (no persistence in tests)
        await store.ping()  # the pool reconnects; no reopen needed
        assert await store.claim("dingtalk:2", 60)
        message = msg(2)
        assert await store.admit(message, 60)  # the Lua scripts are loaded again after the restart
        assert await store.inbox_pending() == [message]
        await store.set_backend_session("dingtalk:c1", "conv-1", 60)
        assert await store.backend_session("dingtalk:c1") == "conv-1"
        assert await store.outbox_add(NOTICE, 60) == NOTICE
        assert await store.outbox_queued() == [NOTICE]
    finally:
        await store.close()
        server.stop()


async def test_keys_carry_the_botgate_prefix(redis_url: str, redis_server: RedisServer) -> None:
    store = RedisStore(redis_url)
    await store.open()
    try:
        await store.claim("k", 60)
        await store.admit(msg(1), 60)
        await store.cache_put("cache:x", "v", 60)
        await store.take_token("rate:u", 5)
        await store.acquire_lease("dingtalk:c1", "me", 60)
        await store.append_turns("dingtalk:c1", [Turn("user", "hi")], 10, 1000, 60)
        await store.set_backend_session("dingtalk:c1", "conv-1", 60)
        await store.outbox_add(NOTICE, 60)
    finally:
        await store.close()
    client = aioredis.Redis(port=redis_server.port)
    try:
        keys = [str(k, "utf-8") if isinstance(k, bytes) else k for k in await client.keys("*")]
    finally:
        await client.aclose()
    assert keys and all(k.startswith("botgate:") for k in keys), keys


async def test_a_backend_session_expires_by_redis_ttl_and_shows_on_every_instance(redis_url: str) -> None:
    one, two = RedisStore(redis_url), RedisStore(redis_url)
    await one.open()
    await two.open()
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await one.set_backend_session("feishu:oc_1", "conv-1", ttl=90)
        assert 80_000 < await admin.pttl("botgate:backend:feishu:oc_1") <= 90_000
        assert await two.backend_session("feishu:oc_1") == "conv-1"  # shared by the instances
        await two.set_backend_session("feishu:oc_1", "conv-1", ttl=300)  # stored again: refreshed
        assert 290_000 < await admin.pttl("botgate:backend:feishu:oc_1") <= 300_000
        await two.reset("feishu:oc_1")
        assert await one.backend_session("feishu:oc_1") is None
        assert await admin.exists("botgate:backend:feishu:oc_1") == 0
    finally:
        await admin.aclose()
        await one.close()
        await two.close()


async def test_a_done_outbox_entry_and_its_key_expire_by_redis_ttl(redis_url: str) -> None:
    """Redis itself forgets done entries (no sweep), on every instance at once."""
    one, two = RedisStore(redis_url), RedisStore(redis_url)
    await one.open()
    await two.open()
    admin = aioredis.Redis.from_url(redis_url)
    entry_key, idempotency_key = "botgate:{outbox}:o1", "botgate:{outbox}:key:token:ops:k"
    try:
        await one.outbox_add(NOTICE, 90)
        assert await admin.pttl(entry_key) == -1 and await admin.pttl(idempotency_key) == -1  # queued: kept
        await two.outbox_update(dataclasses.replace(NOTICE, state=SENT), keep=90)
        for key in (entry_key, idempotency_key):
            assert 80_000 < await admin.pttl(key) <= 90_000
        assert await one.outbox_queued() == [] and await admin.zcard("botgate:{outbox}:queue") == 0
    finally:
        await admin.aclose()
        await one.close()
        await two.close()


# Keeps Redis busy (every client waits) for ARGV[1] ms, timed by the server's clock.
STALL = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start >= ARGV[1] * 1000
return 1
"""


async def test_waiting_for_a_pooled_connection_is_not_an_outage(redis_url: str) -> None:
    """A backlog queues commands for the pool's few connections far longer than one command may
    take: they wait and succeed, none is reported as a store outage (which holds messages unACKed
    and apologises). Each command here takes a 0.1 s stall of the server, well within its 0.8 s
    timeout; the 40 of them over 2 connections take ~2 s."""
    store = RedisStore(redis_url, timeout=0.8, max_connections=2)
    await store.open()
    staller = aioredis.Redis.from_url(redis_url)
    done = asyncio.Event()

    async def stall_until_done() -> None:
        for _ in range(200):  # bounded: ~20 s of stalls at most
            if done.is_set():
                return
            await staller.eval(STALL, 0, 100)

    stalls = asyncio.create_task(stall_until_done())
    try:
        async with asyncio.timeout(30):
            claimed = await asyncio.gather(*(store.claim(f"dingtalk:{n}", 60) for n in range(40)))
        assert claimed == [True] * 40
    finally:
        done.set()
        await stalls
        await staller.aclose()
        await store.close()


async def test_appends_racing_on_one_context_from_two_instances_keep_every_turn(redis_url: str) -> None:
    """Without the lease (a writer outside it), appends of two instances at once each land: a
    write over turns that changed since they were read is retried on the turns there now."""
    one, two = RedisStore(redis_url), RedisStore(redis_url)
    await one.open()
    await two.open()
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await one.append_turns("dingtalk:c1", [Turn("user", "first")], 10, 1000, 60)
        await asyncio.gather(
            *((one, two)[n % 2].append_turns("dingtalk:c1", [Turn("user", f"t{n}")], 10, 1000, 90) for n in range(4))
        )
        turns = await two.context("dingtalk:c1")
        assert turns[0] == Turn("user", "first")
        assert sorted(t.content for t in turns[1:]) == ["t0", "t1", "t2", "t3"]
        assert 80_000 < await admin.pttl("botgate:ctx:dingtalk:c1") <= 90_000
    finally:
        await admin.aclose()
        await one.close()
        await two.close()


async def test_an_append_over_turns_changed_since_they_were_read_keeps_both(redis_url: str) -> None:
    """The append after an answer writes over the turns its `context` read: another instance
    appending in between is not overwritten."""
    one, two = RedisStore(redis_url), RedisStore(redis_url)
    await one.open()
    await two.open()
    try:
        assert await one.context("dingtalk:c1") == []
        await two.append_turns("dingtalk:c1", [Turn("user", "on two")], 10, 1000, 60)
        await one.append_turns("dingtalk:c1", [Turn("user", "on one")], 10, 1000, 60)
        assert await two.context("dingtalk:c1") == [Turn("user", "on two"), Turn("user", "on one")]
    finally:
        await one.close()
        await two.close()
