"""Two gateway processes on one Redis, both connected to the DingTalk double's Stream (and taking
webhooks): a message delivered to both is answered once; a conversation whose messages land on
alternate instances keeps its context and its order."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from handlers.dingtalk.webhook import sign
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.openai import OpenAIDouble
from tests.helpers import dingtalk_section, metric, serve
from tests.process import GatewayProcess, env_for

pytestmark = pytest.mark.redis

A, B = 1, 2  # the instances' Stream connection numbers at the double


@dataclass
class Pair:
    double: DingTalkDouble
    model: OpenAIDouble
    a: GatewayProcess
    b: GatewayProcess

    async def webhook(self, gateway: GatewayProcess, body: dict[str, Any]) -> int:
        """POST a robot message to an instance's webhook, signed like DingTalk; the status."""
        ts = str(int(time.time() * 1000))
        headers = {"timestamp": ts, "sign": sign(ts, self.double.client_secret)}
        async with aiohttp.ClientSession() as http, http.post(
            f"{gateway.url}/dingtalk/webhook", data=orjson.dumps(body), headers=headers
        ) as resp:
            return resp.status

    async def wait_answers(self, count: int) -> None:
        await self.double.wait_for(lambda: len(self.double.session_posts) >= count)

    def answers(self) -> list[str]:
        return [post["markdown"]["text"] for post in self.double.session_posts]

    def asked_by(self) -> list[tuple[str, str]]:
        """(instance, message) of every model request: each instance has its own API key."""
        return [
            (key.removeprefix("Bearer key-"), request["messages"][-1]["content"])
            for key, request in zip(self.model.auth_headers, self.model.requests, strict=True)
        ]


@pytest.fixture
async def pair(
    aiohttp_server: Any,
    openai_double: tuple[OpenAIDouble, str],
    spawn_gateway: Callable[..., GatewayProcess],
    redis_url: str,
) -> AsyncIterator[Pair]:
    double = DingTalkDouble()
    await serve(aiohttp_server, double)
    model, model_url = openai_double

    async def instance(name: str, connection: int) -> GatewayProcess:
        env = env_for(
            {
                "dingtalk": {**dingtalk_section(double), "mode": "both"},
                "model": {"base_url": model_url, "api_keys": [f"key-{name}"]},
                "store": {"url": redis_url},
                "cache": {"enabled": False},
                "dispatcher": {"lease_ttl": 1.0, "drain_timeout": 5.0},
            }
        )
        process = spawn_gateway(env=env, start=False)
        await asyncio.to_thread(process.start)  # the doubles it talks to run in this loop
        await double.wait_for(lambda: connection in double.open_connections, timeout=15)
        return process

    a = await instance("a", A)  # one after the other, so connection 1 is A's and 2 is B's
    b = await instance("b", B)
    yield Pair(double, model, a, b)
    assert await asyncio.to_thread(a.stop) == 0
    assert await asyncio.to_thread(b.stop) == 0


async def dedup_dropped(gateway: GatewayProcess) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{gateway.url}/metrics") as resp:
        return metric(await resp.text(), 'botgate_dedup_dropped_total{platform="dingtalk"}')


async def test_a_message_delivered_to_both_instances_is_answered_once(pair: Pair) -> None:
    double = pair.double
    texts = []
    for i in range(8):
        # Stream to A and at the same moment: a redelivery to B, or the webhook of B.
        body = double.message(f"twice {i}", staff_id=f"u{i}")
        texts.append(f"echo: twice {i}")
        other = double.push(body, to=B) if i % 2 else pair.webhook(pair.b, body)
        _, second = await asyncio.gather(double.push(body, to=A), other)
        assert i % 2 or second == 200
    # Every frame is ACKed, the duplicate ones too, so DingTalk stops redelivering.
    await double.wait_for(lambda: len(double.acks) == 8 + 4)
    assert all(ack.code == 200 for ack in double.acks)
    await double.wait_for(lambda: len(double.session_posts) >= 8)
    # A late second answer would come before the next answer of its conversation.
    for i in range(8):
        await double.push(double.message(f"after {i}", staff_id=f"u{i}"), to=A if i % 2 else B)
    await double.wait_for(lambda: len(double.session_posts) >= 16)
    counts = Counter(pair.answers())
    assert {t: counts[t] for t in texts} == dict.fromkeys(texts, 1)
    assert sum(counts.values()) == 16
    assert await dedup_dropped(pair.a) + await dedup_dropped(pair.b) == 8


def turns(request: dict[str, Any]) -> list[str]:
    """The conversation the model saw before the new message (system prompt left out)."""
    return [m["content"] for m in request["messages"][1:-1]]


def expected_turns(texts: list[str]) -> list[str]:
    return [t for text in texts for t in (text, f"echo: {text}")]


async def test_alternating_instances_keep_context_and_order(pair: Pair) -> None:
    double, model = pair.double, pair.model
    # One at a time: each instance answers what it received, from the context the other wrote.
    first = [f"step {i}" for i in range(4)]
    for i, text in enumerate(first):
        await double.push(double.message(text, staff_id="alice"), to=A if i % 2 == 0 else B)
        await pair.wait_answers(i + 1)
    assert pair.asked_by() == [("a", "step 0"), ("b", "step 1"), ("a", "step 2"), ("b", "step 3")]
    assert [turns(r) for r in model.requests] == [expected_turns(first[:i]) for i in range(4)]

    # All at once, while the model holds the first answer: both instances have the
    # conversation's messages queued, and the lease decides who answers what, in order.
    model.hold = True
    burst = [f"burst {i}" for i in range(6)]
    for i, text in enumerate(burst):
        frame = await double.push(double.message(text, staff_id="alice"), to=A if i % 2 == 0 else B)
        await double.wait_acked(frame)  # accepted in this order
    await model.wait_requests(len(first) + 1)
    model.release()
    await double.wait_for(lambda: len(double.session_posts) == len(first) + len(burst))
    assert pair.answers() == [f"echo: {t}" for t in first + burst]
    history = first + burst
    assert [turns(r) for r in model.requests[len(first) :]] == [
        expected_turns(history[: len(first) + i]) for i in range(len(burst))
    ]
