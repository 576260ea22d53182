"""Durable state through the whole gateway: model cache, per-user rate limit, a Redis outage."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.i18n import Locale, translator
from gateway.keys import DISPATCHER
from gateway.steps import RATE_LIMITED, help_text
from tests.conftest import make_config
from tests.helpers import chat, hello, metric, readiness
from tests.redisd import RedisServer


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_section(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "redis":
        return {"url": request.getfixturevalue("redis_url")}
    return {"url": f"sqlite:///{tmp_path}/state/botgate.sqlite3"}


async def test_identical_request_within_ttl_is_served_from_cache(
    gateway: Any, openai_double: Any, store_section: dict[str, str]
) -> None:
    double, url = openai_double
    client = await gateway(make_config(model={"base_url": url}, store=store_section))
    answers = []
    async with client.ws_connect("/chat/ws") as ws:
        await ws.receive()
        answers.append((await chat(client, ws, "what is botgate?", "q1"))[-1])
        await chat(client, ws, "/reset", "r")  # the same (empty) context in the same conversation
        answers.append((await chat(client, ws, "what is botgate?", "q2"))[-1])
    assert [a["text"] for a in answers] == ["echo: what is botgate?"] * 2
    assert len(double.requests) == 1  # the second answer came from the cache
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, 'botgate_cache_requests_total{result="miss"}') == 1
    assert metric(metrics, 'botgate_cache_requests_total{result="hit"}') == 1


async def test_over_the_rate_limit_one_notice_and_no_model_call(
    gateway: Any, openai_double: Any, store_section: dict[str, str]
) -> None:
    double, url = openai_double
    client = await gateway(
        make_config(
            model={"base_url": url},
            store=store_section,
            limits={"per_user_per_minute": 2},
            cache={"enabled": False},
        )
    )
    async with client.ws_connect("/chat/ws") as ws:
        _, conversation = await hello(ws)
        assert (await chat(client, ws, "one", "1"))[-1]["type"] == "done"
        assert (await chat(client, ws, "two", "2"))[-1]["type"] == "done"
        third = await chat(client, ws, "three", "3")
        limited = translator(Locale.ZH_CN)(RATE_LIMITED)  # a browser naming no language: Chinese
        assert third[-1] == {"type": "notice", "text": limited, "reply_to": f"{conversation}:3"}
        # The fourth is accepted but silently skipped: one notice per minute, not one per message.
        await ws.send_str(orjson.dumps({"type": "message", "id": "4", "text": "four"}).decode())
        assert orjson.loads((await ws.receive()).data) == {"type": "accepted", "id": f"{conversation}:4"}
        async with asyncio.timeout(10):
            await client.app[DISPATCHER].wait_idle()
        help_frames = await chat(client, ws, "/help", "5")  # whatever came before shows up first
        assert [f["type"] for f in help_frames] == ["accepted", "notice"]
        assert help_frames[-1]["text"] == help_text(Locale.ZH_CN)  # a browser naming no language: Chinese
    assert len(double.requests) == 2


@pytest.mark.redis
async def test_redis_outage_flips_readiness_holds_messages_and_recovers(
    gateway: Any, openai_double: Any, tmp_path: Path
) -> None:
    _, url = openai_double
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    try:
        client = await gateway(make_config(model={"base_url": url}, store={"url": server.url}))
        assert (await readiness(client))[0] == 200
        async with client.ws_connect("/chat/ws") as ws:
            _, conversation = await hello(ws)
            assert (await chat(client, ws, "before", "1"))[-1]["text"] == "echo: before"
            async with asyncio.timeout(10):
                await client.app[DISPATCHER].wait_idle()  # its context and inbox writes are done

            await asyncio.to_thread(server.stop)
            status, body = await readiness(client)
            assert status == 503
            assert body["reason"].startswith(f"store unavailable: redis {server.url}: unreachable")
            # Held in memory (docs/state.md): answered once Redis is back, without being sent again.
            await ws.send_str(orjson.dumps({"type": "message", "id": "2", "text": "during"}).decode())
            assert orjson.loads((await ws.receive()).data) == {"type": "spilled", "id": f"{conversation}:2"}

            await asyncio.to_thread(server.start)
            async with asyncio.timeout(10):
                answer = orjson.loads((await ws.receive()).data)
                while answer["type"] != "done":
                    answer = orjson.loads((await ws.receive()).data)
            assert answer["text"] == "echo: during"
            assert (await readiness(client))[0] == 200
    finally:
        server.stop()
