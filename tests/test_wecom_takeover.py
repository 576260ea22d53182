"""One WeCom connection per bot across instances: two gateway processes on one Redis, one holds the
bot's connection (the other stands by, ready), and when the holder dies (SIGKILL: no goodbye, its
lease just stops being renewed) the other subscribes within seconds and answers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from gateway.channel import ChannelState
from gateway.errors import StoreError
from gateway.store.redis import RedisStore
from handlers.wecom.holder import ConnectionHolder
from tests.conftest import make_config
from tests.doubles import wecom as wd
from tests.process import GatewayProcess, env_for
from tests.test_wecom_ws import wf_subscribe
from tests.wecom_env import start, wecom_section

pytestmark = pytest.mark.redis

LEASE = 0.6


async def readyz(gateway: GatewayProcess) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{gateway.url}/readyz") as resp:
        return resp.status, await resp.json()


async def until_state(gateway: GatewayProcess, state: str, within: float = 10.0) -> tuple[int, dict[str, Any]]:
    """Poll a process's /readyz (nothing in another process can wake us) until the bot is in `state`."""
    async with asyncio.timeout(within):
        while True:
            code, body = await readyz(gateway)
            if body["channels"].get("wecom/default") == state:
                return code, body
            await asyncio.sleep(0.05)


async def test_a_standby_instance_takes_the_connection_over_when_the_holder_dies(
    aiohttp_server: Callable[..., Any], spawn_gateway: Callable[..., GatewayProcess], redis_url: str
) -> None:
    double = await wd.start(aiohttp_server)

    async def instance() -> GatewayProcess:
        env = env_for(
            {
                "wecom": wecom_section(double, connection_lease=LEASE),
                "store": {"url": redis_url},
                "cache": {"enabled": False},
                "dispatcher": {"lease_ttl": 1.0, "drain_timeout": 2.0},
            }
        )
        process = spawn_gateway(env=env, start=False)
        await asyncio.to_thread(process.start)  # the double it talks to runs in this loop
        return process

    a = await instance()
    await double.wait_for(lambda: [c.number for c in double.live] == [1], timeout=15)
    b = await instance()
    code, body = await until_state(b, "standby")
    assert code == 200 and body["ready"]  # standing by is healthy: not a failed readiness
    assert len(double.subscribes) == 1  # B never kicked A off
    async with aiohttp.ClientSession() as http, http.get(f"{b.url}/api/status", headers=b.admin_headers()) as resp:
        row = next(c for c in (await resp.json())["channels"] if c["platform"] == "wecom")
    assert (row["state"], row["ready"]) == ("standby", True)  # the status page's row: standing by, not down
    assert row["detail"] == "another instance holds this bot's connection"

    first = await double.push(wd.text("who answers?"))
    assert "> who answers?" in (await double.wait_stream(first)).text

    await asyncio.to_thread(a.kill)  # dies without releasing anything
    died = time.monotonic()
    await double.wait_for(lambda: len(double.live) == 1 and double.live[0].number > 1, timeout=10)
    assert time.monotonic() - died < 3 * LEASE + 1.0  # within seconds: the lease, then a look
    await until_state(b, "connected")
    second = await double.push(wd.text("and now?"))
    assert "> and now?" in (await double.wait_stream(second)).text
    assert await asyncio.to_thread(b.stop) == 0


async def test_the_lease_holder_keeps_the_connection_and_a_dead_ones_lease_passes_on(redis_url: str) -> None:
    store = RedisStore(redis_url)
    await store.open()
    try:
        states: list[str] = []
        a = ConnectionHolder(store, "default", "a", LEASE, 60.0)
        b = ConnectionHolder(store, "default", "b", LEASE, 60.0)
        await a.acquire(states.append)
        waiting = asyncio.create_task(b.acquire(states.append))
        await asyncio.wait((waiting,), timeout=LEASE / 2)
        assert not waiting.done() and states[-1] == "another instance holds this bot's connection"
        # A stops renewing (it died): its lease runs out and B has it.
        async with asyncio.timeout(3 * LEASE):
            await waiting
        assert b.holding and states[-1] == ""
        renewing = asyncio.create_task(a.renew_until_lost())
        async with asyncio.timeout(LEASE):  # A, back, learns at its next renewal that it lost
            await renewing
        assert not a.holding
    finally:
        with contextlib.suppress(StoreError):
            await store.close()


async def test_callback_polls_reaching_another_instance_are_answered_from_the_store(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], redis_url: str
) -> None:
    """Behind a load balancer WeCom's refresh polls land on any instance: the one that did not
    receive the message answers them with the text the other one is writing."""
    double = await wd.start(aiohttp_server)
    callback = {"mode": "webhook", "token": wd.TOKEN, "encoding_aes_key": wd.ENCODING_AES_KEY}
    config = make_config(wecom=wecom_section(double, **callback), store={"url": redis_url}, cache={"enabled": False})
    a, b = await gateway(config), await gateway(config)
    wecom, message = wd.CallbackClient(), wd.text("who polls?")
    first = await wecom.deliver(a, "/wecom/webhook", message)
    assert first.reply is not None
    stream_id = first.reply["stream"]["id"]
    answer: dict[str, Any] = {}
    for _ in range(100):  # WeCom polls on a timer
        poll = await wecom.deliver(b, "/wecom/webhook", wecom.refresh(message, stream_id))
        assert poll.reply is not None
        answer = poll.reply["stream"]
        if answer["finish"]:
            break
        await asyncio.sleep(0.05)
    assert answer["finish"] is True and "> who polls?" in answer["content"]


LEASE_KEY = "wecom-connection:default"


async def _take_lease(store: RedisStore, holder: str, ttl: float) -> None:
    """Another instance ("b") holds the bot's connection lease now, as after `holder`'s lapsed."""
    await store.release_lease(LEASE_KEY, holder)
    assert await store.acquire_lease(LEASE_KEY, "b", ttl)


async def test_kicked_by_another_instance_of_ours_stands_by_and_holds_nobody_back(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], redis_url: str
) -> None:
    """A's lease lapsed (a stalled loop, Redis lost its keys) and B took it and subscribed: A is
    kicked by its own standby. A stands by for B instead of refusing for kicked_retry, and marks
    nothing that would keep B from subscribing again after a blip of its own."""
    env = await start(aiohttp_server, gateway, sections={"store": {"url": redis_url}},
                      connection_lease=30.0, kicked_retry=60.0)
    store = RedisStore(redis_url)
    await store.open()
    try:
        await _take_lease(store, env.adapter.runtime.dispatcher.instance_id, 30.0)
        async with env.client.session.ws_connect(env.double.ws_url) as b:
            await b.send_str(wf_subscribe())  # B's subscribe kicks A off
            async with asyncio.timeout(5):
                status = await env.adapter.tracker.wait_for(
                    lambda s: s.state in (ChannelState.STANDBY, ChannelState.REFUSED)
                )
            assert status.state is ChannelState.STANDBY
            assert status.detail == "another instance holds this bot's connection"
            assert await store.cache_get("wecom-kicked:default") is None
            holder_b = ConnectionHolder(store, "default", "b", 30.0, 60.0)
            reports: list[str] = []
            async with asyncio.timeout(2):  # B may subscribe again at once (a reconnect of its own)
                await holder_b.acquire(reports.append)
            assert reports == [""]
    finally:
        with contextlib.suppress(StoreError):
            await store.close()


async def test_a_lease_lost_while_connecting_is_not_followed_by_a_subscribe(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], redis_url: str
) -> None:
    """The websocket handshake took longer than the lease and another instance took it meanwhile:
    A must not subscribe (that would kick the new holder off), it stands by."""
    gate = asyncio.Event()
    env = await start(aiohttp_server, gateway, sections={"store": {"url": redis_url}},
                      double={"handshake_gate": gate}, connect=False, connection_lease=30.0)
    store = RedisStore(redis_url)
    await store.open()
    try:
        await env.double.wait_for(lambda: env.double.handshakes == 1)  # A holds the lease, connecting
        await _take_lease(store, env.adapter.runtime.dispatcher.instance_id, 30.0)
        gate.set()
        async with asyncio.timeout(5):
            await env.adapter.tracker.wait_for(lambda s: s.state is ChannelState.STANDBY)
        await env.double.wait_for(lambda: env.double.connections and env.double.connections[0].ws.closed)
        assert env.double.subscribes == []
    finally:
        with contextlib.suppress(StoreError):
            await store.close()
