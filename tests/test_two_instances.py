"""Two gateway processes on one Redis, both connected to the DingTalk double's Stream (and taking
webhooks): a message delivered to both is answered once; a conversation whose messages land on
alternate instances keeps its context and its order. With two bots on each instance (two DingTalk
robots), dedup and leases are per bot: each bot answers a message once, the same message and
conversation id arriving through both bots is answered by each, and the two bots' conversations
proceed and keep their context independently."""

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


# -- several bots on each instance ----------------------------------------------------------------
PROMPTS = {"hr": "You are the HR assistant.", "it": "You are the IT helpdesk."}


def bots_config(robots: dict[str, DingTalkDouble], model_url: str) -> str:
    """Agents hr and it, robots hrbot (agent hr) and itbot (agent it); secrets come from the environment."""
    agents = "".join(
        f'[[agents]]\nname = "{name}"\nprovider = "openai"\nbase_url = "{model_url}"\nsystem_prompt = "{prompt}"\n\n'
        for name, prompt in PROMPTS.items()
    )
    bots = "".join(
        f'[[dingtalk.bots]]\nname = "{name}"\nagent = "{name.removesuffix("bot")}"\nmode = "both"\n'
        f'client_id = "{robot.client_id}"\napi_base = "{robot.base}"\noapi_base = "{robot.base}"\n'
        "reconnect_delay = 0.05\n\n"
        for name, robot in robots.items()
    )
    return agents + bots


@dataclass
class BotsPair:
    robots: dict[str, DingTalkDouble]  # by bot name: hrbot, itbot
    model: OpenAIDouble
    a: GatewayProcess
    b: GatewayProcess

    async def webhook(self, gateway: GatewayProcess, bot: str, body: dict[str, Any]) -> int:
        """POST a robot message to an instance's webhook of `bot`, signed with that bot's secret."""
        ts = str(int(time.time() * 1000))
        headers = {"timestamp": ts, "sign": sign(ts, self.robots[bot].client_secret)}
        async with aiohttp.ClientSession() as http, http.post(
            f"{gateway.url}/dingtalk/webhook/{bot}", data=orjson.dumps(body), headers=headers
        ) as resp:
            return resp.status

    def answers(self, bot: str) -> list[str]:
        return [post["markdown"]["text"] for post in self.robots[bot].session_posts]

    async def wait_answers(self, count: int) -> None:
        """Until every robot has posted `count` answers."""
        for robot in self.robots.values():
            await robot.wait_for(lambda r=robot: len(r.session_posts) >= count)  # type: ignore[misc]

    def asked(self, agent: str | None = None) -> list[tuple[str, str, str]]:
        """(agent, instance, message) of every model request (of `agent`'s only, if given): the
        agent by its system prompt, the instance by its API key."""
        out = []
        for key, request in zip(self.model.auth_headers, self.model.requests, strict=True):
            prompt = request["messages"][0]["content"]
            name = next(n for n, p in PROMPTS.items() if prompt.startswith(p))
            if agent in (None, name):
                out.append((name, key.removeprefix("Bearer key-"), request["messages"][-1]["content"]))
        return out

    def requests_of(self, agent: str) -> list[dict[str, Any]]:
        return [r for r in self.model.requests if r["messages"][0]["content"].startswith(PROMPTS[agent])]


@pytest.fixture
async def bots_pair(
    aiohttp_server: Any,
    openai_double: tuple[OpenAIDouble, str],
    spawn_gateway: Callable[..., GatewayProcess],
    redis_url: str,
) -> AsyncIterator[BotsPair]:
    robots = {
        "hrbot": DingTalkDouble(client_id="ding-hr", client_secret="hr-secret"),
        "itbot": DingTalkDouble(client_id="ding-it", client_secret="it-secret"),
    }
    for robot in robots.values():
        await serve(aiohttp_server, robot)
    model, model_url = openai_double
    config = bots_config(robots, model_url)

    async def instance(name: str, connection: int) -> GatewayProcess:
        env = {
            **env_for(
                {
                    "store": {"url": redis_url},
                    "cache": {"enabled": False},
                    "dispatcher": {"lease_ttl": 1.0, "drain_timeout": 5.0},
                }
            ),
            "BOTGATE_DINGTALK__BOTS__HRBOT__CLIENT_SECRET": robots["hrbot"].client_secret,
            "BOTGATE_DINGTALK__BOTS__ITBOT__CLIENT_SECRET": robots["itbot"].client_secret,
            "BOTGATE_AGENTS__HR__API_KEYS": f"key-{name}",
            "BOTGATE_AGENTS__IT__API_KEYS": f"key-{name}",
        }
        process = spawn_gateway(config, env=env, start=False)
        await asyncio.to_thread(process.start)
        for robot in robots.values():
            await robot.wait_for(lambda r=robot: connection in r.open_connections, timeout=15)  # type: ignore[misc]
        return process

    a = await instance("a", A)  # at each robot's double, connection 1 is A's and 2 is B's
    b = await instance("b", B)
    yield BotsPair(robots, model, a, b)
    assert await asyncio.to_thread(a.stop) == 0
    assert await asyncio.to_thread(b.stop) == 0


async def test_several_bots_a_message_delivered_to_both_instances_is_answered_once_per_bot(
    bots_pair: BotsPair,
) -> None:
    pair = bots_pair
    n = 6
    deliveries = []
    for i in range(n):
        for name, robot in pair.robots.items():
            # One message id and conversation id through both robots: two messages, one per bot.
            body = robot.message(f"{name} {i}", msg_id=f"msg-{i}", staff_id=f"u{i}", conversation_id=f"cid-{i}")
            # Stream to A and at the same moment: a redelivery to B, or the bot's webhook of B.
            other = robot.push(body, to=B) if i % 2 else pair.webhook(pair.b, name, body)
            deliveries += [robot.push(body, to=A), other]
    results = await asyncio.gather(*deliveries)
    webhooks = len(pair.robots) * len(range(0, n, 2))
    assert [status for status in results if isinstance(status, int)] == [200] * webhooks
    for robot in pair.robots.values():
        await robot.wait_for(lambda r=robot: len(r.acks) == n + n // 2)  # type: ignore[misc]
        assert all(ack.code == 200 for ack in robot.acks)
    await pair.wait_answers(n)
    # A late second answer would come before the next answer of its conversation.
    for i in range(n):
        for name, robot in pair.robots.items():
            body = robot.message(f"{name} after {i}", staff_id=f"u{i}", conversation_id=f"cid-{i}")
            await robot.push(body, to=A if i % 2 else B)
    await pair.wait_answers(2 * n)
    for name in pair.robots:
        # Each robot answered each of its messages exactly once, through itself.
        texts = [f"echo: {name} {i}" for i in range(n)] + [f"echo: {name} after {i}" for i in range(n)]
        assert sorted(pair.answers(name)) == sorted(texts)
        # ... with its own agent.
        agent = name.removesuffix("bot")
        assert sorted(m for _, _, m in pair.asked(agent)) == sorted(t.removeprefix("echo: ") for t in texts)
    assert await dedup_dropped(pair.a) + await dedup_dropped(pair.b) == 2 * n


async def test_several_bots_one_conversation_id_has_a_lease_and_a_context_per_bot(bots_pair: BotsPair) -> None:
    pair, model = bots_pair, bots_pair.model
    hr, it = pair.robots["hrbot"], pair.robots["itbot"]

    def say(robot: DingTalkDouble, text: str, i: int) -> dict[str, Any]:
        # Both robots see the same conversation id and message ids: Alice's chat with each.
        return robot.message(text, msg_id=f"m-{i}", staff_id="alice", conversation_id="cid-alice")

    # A answers hrbot's message and the model holds it: A holds hrbot's lease on the conversation.
    # itbot's message of the same conversation id, on B, does not wait for it: its own lease.
    model.hold = True
    await hr.push(say(hr, "hr 0", 0), to=A)
    await model.wait_requests(1)
    await it.push(say(it, "it 0", 0), to=B)
    async with asyncio.timeout(10):
        await model.wait_requests(2)
    assert pair.asked() == [("hr", "a", "hr 0"), ("it", "b", "it 0")]
    model.hold = False
    model.release()
    await pair.wait_answers(1)

    # Messages alternate between the instances: each bot's conversation keeps its own turns.
    rounds = 4
    for i in range(1, rounds):
        await hr.push(say(hr, f"hr {i}", i), to=B if i % 2 else A)
        await it.push(say(it, f"it {i}", i), to=A if i % 2 else B)
        await pair.wait_answers(i + 1)
    for agent, first in (("hr", "a"), ("it", "b")):
        history = [f"{agent} {i}" for i in range(rounds)]
        assert [turns(r) for r in pair.requests_of(agent)] == [expected_turns(history[:i]) for i in range(rounds)]
        other = "b" if first == "a" else "a"
        assert [who for _, who, _ in pair.asked(agent)] == [first, other, first, other]
    assert pair.answers("hrbot") == [f"echo: hr {i}" for i in range(rounds)]
    assert pair.answers("itbot") == [f"echo: it {i}" for i in range(rounds)]
