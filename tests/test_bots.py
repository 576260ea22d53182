"""Several bots and agents in one process, against the doubles: two DingTalk robots and one Feishu
app, each answering with its own agent and replying through itself; a route; per-bot webhooks;
one bot refused while the others answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import Config, build
from gateway.i18n import translator
from gateway.keys import CHANNELS, DISPATCHER
from gateway.steps import RATE_LIMITED
from handlers.dingtalk.webhook import sign
from tests.doubles import feishu as fd
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu_events import APP_ID, message_event
from tests.doubles.openai import OpenAIDouble
from tests.helpers import readiness, sample, serve

Client = TestClient[web.Request, web.Application]
HR_PROMPT = "你是公司的人事助手"
BATCH_SEND = "/v1.0/robot/oToMessages/batchSend"
CARD_CREATE = "/v1.0/card/instances/createAndDeliver"
CARD_UPDATE = "/v1.0/card/instances"
IT_PROMPT = "You are the IT helpdesk"


async def model(aiohttp_server: Callable[..., Any], answer: str) -> tuple[OpenAIDouble, str]:
    double = OpenAIDouble(answer=answer)
    server = await aiohttp_server(double.app())
    return double, str(server.make_url("/v1"))


def bot(double: DingTalkDouble, name: str, agent: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "client_id": double.client_id,
        "client_secret": double.client_secret,
        "api_base": double.base,
        "oapi_base": double.base,
        "reconnect_delay": 0.05,
        "agent": agent,
        **extra,
    }


class World:
    """Two DingTalk doubles (hrbot, itbot), one Feishu double (itbot), two model doubles (hr, it)."""

    def __init__(self) -> None:
        self.hr_ding = DingTalkDouble(client_id="ding-hr", client_secret="hr-secret")
        self.it_ding = DingTalkDouble(client_id="ding-it", client_secret="it-secret")
        self.hr_model: tuple[OpenAIDouble, str] = (OpenAIDouble(), "")
        self.it_model: tuple[OpenAIDouble, str] = (OpenAIDouble(), "")
        self.feishu: tuple[fd.FeishuDouble, str] = (fd.FeishuDouble(), "")

    async def serve(self, aiohttp_server: Callable[..., Any]) -> None:
        await serve(aiohttp_server, self.hr_ding)
        await serve(aiohttp_server, self.it_ding)
        self.hr_model = await model(aiohttp_server, "HR answer")
        self.it_model = await model(aiohttp_server, "IT answer")
        self.feishu = await fd.start(aiohttp_server)

    def config(self, it_secret: str = "it-secret", hr_mode: str = "stream", **hr: Any) -> Config:
        data: dict[str, Any] = {
            "store": {"url": "memory://"},
            "cache": {"enabled": False},
            "agents": [
                {"name": "hr", "provider": "openai", "base_url": self.hr_model[1], "system_prompt": HR_PROMPT},
                {
                    "name": "it",
                    "provider": "openai",
                    "base_url": self.it_model[1],
                    "system_prompt": IT_PROMPT,
                    "group_context": "per_user",
                },
            ],
            "dingtalk": {
                "bots": [
                    bot(self.hr_ding, "hrbot", "hr", mode=hr_mode, **hr),
                    bot(self.it_ding, "itbot", "it", client_secret=it_secret),
                ]
            },
            "feishu": {
                "bots": [
                    {
                        "name": "itbot",
                        "app_id": APP_ID,
                        "app_secret": fd.APP_SECRET,
                        "domain": self.feishu[1],
                        "agent": "it",
                    }
                ]
            },
            "routes": [{"platform": "dingtalk", "bot": "hrbot", "conversation": "cidFIN", "agent": "it"}],
        }
        return build(data, env={}, source="<test>")


def system_prompts(double: OpenAIDouble) -> list[str]:
    return [str(r["messages"][0]["content"]) for r in double.requests]


async def test_each_bot_answers_with_its_agent_through_itself(aiohttp_server: Any, gateway: Any) -> None:
    world = World()
    await world.serve(aiohttp_server)
    client: Client = await gateway(world.config())
    await world.hr_ding.wait_for(lambda: world.hr_ding.connected)
    await world.it_ding.wait_for(lambda: world.it_ding.connected)
    feishu = world.feishu[0]
    await feishu.wait_for(lambda: feishu.pings >= 1)
    status, ready = await readiness(client)
    assert status == 200, ready
    assert ready["channels"] == {
        "dingtalk/hrbot": "connected",
        "dingtalk/itbot": "connected",
        "feishu/itbot": "connected",
        "web/default": "connected",
    }

    await world.hr_ding.push(world.hr_ding.message("请假怎么申请", staff_id="u1"))
    await world.it_ding.push(world.it_ding.message("VPN is down", staff_id="u1"))
    await feishu.push_event(message_event("printer?", message_id="om_fs1"))
    await world.hr_ding.wait_for(lambda: len(world.hr_ding.session_posts) >= 1)
    await world.it_ding.wait_for(lambda: len(world.it_ding.session_posts) >= 1)
    await feishu.wait_for(lambda: feishu.answer("om_fs1") is not None)
    await client.app[DISPATCHER].wait_idle()
    assert "HR answer" in orjson.dumps(world.hr_ding.session_posts).decode()
    assert "IT answer" in orjson.dumps(world.it_ding.session_posts).decode()
    assert "IT answer" in (feishu.answer("om_fs1") or "")
    assert len(world.hr_ding.session_posts) == 1 and len(world.it_ding.session_posts) == 1
    assert system_prompts(world.hr_model[0]) == [HR_PROMPT]
    assert system_prompts(world.it_model[0]) == [IT_PROMPT, IT_PROMPT]
    assert sample(client.app, "botgate_agent_answers_total", agent="hr") == 1
    assert sample(client.app, "botgate_agent_answers_total", agent="it") == 2

    # The route: this group of hrbot is answered by the IT agent, still through hrbot.
    await world.hr_ding.push(world.hr_ding.message("budget?", group=True, conversation_id="cidFIN"))
    await world.hr_ding.wait_for(lambda: len(world.hr_ding.session_posts) >= 2)
    await client.app[DISPATCHER].wait_idle()
    assert "IT answer" in orjson.dumps(world.hr_ding.session_posts[1]).decode()
    assert len(world.it_model[0].requests) == 3 and len(world.hr_model[0].requests) == 1
    assert world.it_model[0].requests[2]["messages"][0]["content"].startswith(IT_PROMPT)
    assert len(world.it_ding.session_posts) == 1


async def test_per_user_and_shared_group_context(aiohttp_server: Any, gateway: Any) -> None:
    world = World()
    await world.serve(aiohttp_server)
    client: Client = await gateway(world.config())
    await world.hr_ding.wait_for(lambda: world.hr_ding.connected)
    await world.it_ding.wait_for(lambda: world.it_ding.connected)
    for double in (world.hr_ding, world.it_ding):  # both robots in one group: two conversations
        for n, (staff, nick) in enumerate((("u1", "Alice"), ("u2", "Bob"))):
            await double.push(double.message(f"q{n}", group=True, conversation_id="cidTEAM", staff_id=staff, nick=nick))
            await double.wait_for(lambda d=double, k=n: len(d.session_posts) >= k + 1)  # type: ignore[misc]
            await client.app[DISPATCHER].wait_idle()
    # hr (shared): Bob's request carries Alice's turn, with her name.
    hr_second = world.hr_model[0].requests[1]["messages"]
    assert [m["content"] for m in hr_second[1:]] == ["Alice: q0", "HR answer", "Bob: q1"]
    # it (per_user): Bob's request starts afresh.
    it_second = world.it_model[0].requests[1]["messages"]
    assert [m["content"] for m in it_second[1:]] == ["Bob: q1"]


async def test_a_user_over_the_limit_on_one_bot_still_talks_to_the_other(
    aiohttp_server: Any, gateway: Any
) -> None:
    world = World()
    await world.serve(aiohttp_server)
    cfg = world.config()
    await gateway(replace(cfg, limits=replace(cfg.limits, per_user_per_minute=1)))
    await world.hr_ding.wait_for(lambda: world.hr_ding.connected)
    await world.it_ding.wait_for(lambda: world.it_ding.connected)
    for n, text in enumerate(("one", "two"), 1):
        await world.hr_ding.push(world.hr_ding.message(text, staff_id="u1"))
        await world.hr_ding.wait_for(lambda k=n: len(world.hr_ding.session_posts) >= k)  # type: ignore[misc]
    await world.it_ding.push(world.it_ding.message("three", staff_id="u1"))
    await world.it_ding.wait_for(lambda: len(world.it_ding.session_posts) >= 1)
    hr_posts = orjson.dumps(world.hr_ding.session_posts).decode()
    assert "HR answer" in hr_posts and translator("zh-CN")(RATE_LIMITED) in hr_posts
    assert "IT answer" in orjson.dumps(world.it_ding.session_posts).decode()


async def test_cards_and_openapi_fallbacks_leave_through_the_receiving_bot(
    aiohttp_server: Any, gateway: Any
) -> None:
    """hrbot answers in an AI card, itbot's expired sessionWebhook falls back to the OpenAPI: each
    with its own app's token and robotCode, on its own platform app, never the other's."""
    world = World()
    await world.serve(aiohttp_server)
    await gateway(world.config(card_template_id="tpl-hr.schema", stream_interval=0.0))
    await world.hr_ding.wait_for(lambda: world.hr_ding.connected)
    await world.it_ding.wait_for(lambda: world.it_ding.connected)
    await world.hr_ding.push(world.hr_ding.message("年假还有几天", staff_id="u1"))
    await world.it_ding.push(world.it_ding.message("late", staff_id="u2", expires_in=-60))
    await world.hr_ding.wait_for(lambda: world.hr_ding.calls(CARD_UPDATE))
    await world.it_ding.wait_for(lambda: world.it_ding.calls(BATCH_SEND))
    [create] = world.hr_ding.calls(CARD_CREATE)
    assert create["imRobotOpenDeliverModel"]["robotCode"] == "ding-hr"
    assert world.hr_ding.calls(CARD_UPDATE)[0]["cardData"]["cardParamMap"]["msgContent"] == "HR answer"
    [send] = world.it_ding.calls(BATCH_SEND)
    assert send["robotCode"] == "ding-it" and send["userIds"] == ["u2"] and "IT answer" in send["msgParam"]
    assert world.hr_ding.tokens_issued and world.it_ding.tokens_issued  # each app's own token
    assert not world.it_ding.calls(CARD_CREATE) and not world.hr_ding.calls(BATCH_SEND)
    assert world.hr_ding.session_posts == [] and world.it_ding.session_posts == []


async def test_one_bot_refused_the_others_answer(aiohttp_server: Any, gateway: Any) -> None:
    world = World()
    await world.serve(aiohttp_server)
    client: Client = await gateway(world.config(it_secret="wrong secret"))
    await world.hr_ding.wait_for(lambda: world.hr_ding.connected)
    feishu = world.feishu[0]
    await feishu.wait_for(lambda: feishu.pings >= 1)
    await world.hr_ding.push(world.hr_ding.message("hello"))
    await feishu.push_event(message_event("hi", message_id="om_fs2"))
    await world.hr_ding.wait_for(lambda: len(world.hr_ding.session_posts) >= 1)
    await feishu.wait_for(lambda: feishu.answer("om_fs2") is not None)
    status, ready = await readiness(client)
    assert status == 503
    assert ready["channels"]["dingtalk/hrbot"] == "connected" and ready["channels"]["feishu/itbot"] == "connected"
    assert ready["channels"]["dingtalk/itbot"] != "connected"
    assert "dingtalk/itbot" in ready["reason"] and "hrbot" not in ready["reason"]
    assert not world.it_ding.connected


async def test_per_bot_webhooks_check_their_own_signature(aiohttp_server: Any, gateway: Any) -> None:
    world = World()
    await world.serve(aiohttp_server)
    client: Client = await gateway(world.config(hr_mode="webhook"))
    body = orjson.dumps(world.hr_ding.message("webhook hello", staff_id="u9"))

    def signed(secret: str) -> dict[str, str]:
        ts = str(int(time.time() * 1000))
        return {"timestamp": ts, "sign": sign(ts, secret), "Content-Type": "application/json"}

    wrong = await client.post("/dingtalk/webhook/hrbot", data=body, headers=signed("it-secret"))
    assert wrong.status == 401
    bare = await client.post("/dingtalk/webhook", data=body, headers=signed("hr-secret"))
    assert bare.status == 404  # no default bot configured
    right = await client.post("/dingtalk/webhook/hrbot", data=body, headers=signed("hr-secret"))
    assert right.status == 200
    await world.hr_ding.wait_for(lambda: len(world.hr_ding.session_posts) >= 1)
    assert "HR answer" in orjson.dumps(world.hr_ding.session_posts).decode()
    assert "dingtalk/hrbot" in client.app[CHANNELS]
    async with asyncio.timeout(10):
        await client.app[DISPATCHER].wait_idle()
