"""/stop (/停止): the answer being written ends, with one visible text for both messages, and the
model's HTTP connection is closed (gateway/stopping.py); on the Feishu, DingTalk and OpenAI doubles."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.i18n import translator
from gateway.keys import DISPATCHER
from gateway.stopping import NOT_YOURS, NOTHING_TO_STOP, STOPPED, STOPPED_MARK
from tests import helpers
from tests.doubles import feishu as fd
from tests.doubles.feishu import FeishuDouble
from tests.doubles.feishu_events import message_event
from tests.doubles.openai import OpenAIDouble

Client = TestClient[web.Request, web.Application]
Start = Callable[..., Any]


ZH = translator("zh-CN")  # both platforms default to Chinese
CARD_CREATE = "/v1.0/card/instances/createAndDeliver"
CARD_STREAM = "/v1.0/card/streaming"
CARD_UPDATE = "/v1.0/card/instances"


@pytest.fixture
async def slow_model(aiohttp_server: Callable[..., Any]) -> Any:
    """An OpenAI double that stalls its first answer mid-stream. Its test server cancels a handler
    whose client leaves, so the double sees (`disconnects`) that the gateway closed the connection."""
    double = OpenAIDouble(script=["stall"])
    server = await aiohttp_server(double.app())
    yield double, str(server.make_url("/v1"))
    double.release()


async def closed(model: OpenAIDouble) -> None:
    """The model double saw its streaming connection closed by the gateway (bounded wait)."""
    async with asyncio.timeout(5):
        await model.disconnected.wait()
    assert model.disconnects == 1


def shown(post: dict[str, Any]) -> str:
    """The text of a DingTalk sessionWebhook message (markdown or text)."""
    return str(post["markdown"]["text"] if "markdown" in post else post["text"]["content"])


async def test_stop_mid_stream_leaves_one_text_and_no_context(
    feishu_gateway: Start, feishu: Any, openai_double: Any
) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.script = ["stall"]
    client = await feishu_gateway()
    await double.push_event(message_event("tell me a long story", message_id="om_1"))
    await double.wait_for(lambda: bool(double.replies_to("om_1")))  # the card is shown
    await double.push_event(message_event("/stop", message_id="om_2"))
    await double.wait_for(lambda: double.open_cards() == [] and bool(double.cards))
    await client.app[DISPATCHER].wait_idle()
    model.release()
    (reply,) = double.replies_to("om_1")
    assert double.shown(reply) == "echo:\n\n" + translator(None)(STOPPED_MARK)
    assert double.replies_to("om_2") == []  # /stop itself: no second text
    assert len(model.requests) == 1  # /stop never reached the model
    # The next question is answered normally, without the stopped turn as context.
    await double.push_event(message_event("hello again", message_id="om_3"))
    await double.wait_for(lambda: double.answer("om_3") == "echo: hello again")
    history = [m["content"] for m in model.requests[-1]["messages"] if m["role"] != "system"]
    assert history == ["hello again"]


@pytest.mark.parametrize("command", ["/stop", "/停止"])
async def test_stop_with_nothing_running(feishu_gateway: Start, feishu: Any, command: str) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    await double.push_event(message_event(command, message_id="om_1"))
    await double.wait_for(lambda: double.answer("om_1") is not None)
    await client.app[DISPATCHER].wait_idle()
    assert double.answer("om_1") == translator(None)(NOTHING_TO_STOP)


async def test_feishu_stop_closes_the_model_connection(
    feishu: tuple[FeishuDouble, str], slow_model: Any, gateway: Start
) -> None:
    double, domain = feishu
    model, url = slow_model
    client = await gateway(fd.config(domain, url))
    await double.wait_for(lambda: double.pings >= 1)
    await double.push_event(message_event("tell me a long story", message_id="om_1"))
    await double.wait_for(lambda: bool(double.replies_to("om_1")))
    await double.push_event(message_event("/停止", message_id="om_2"))
    await closed(model)  # before release(): the gateway hung up, the backend stops generating
    await double.wait_for(lambda: double.open_cards() == [] and bool(double.cards))
    await client.app[DISPATCHER].wait_idle()
    (reply,) = double.replies_to("om_1")
    assert double.shown(reply) == "echo:\n\n" + ZH(STOPPED_MARK)


async def test_dingtalk_stop_without_card_one_stopped_text(aiohttp_server: Any, gateway: Any, slow_model: Any) -> None:
    model, url = slow_model
    env = await helpers.start(aiohttp_server, gateway, model_url=url)
    await env.double.push(env.double.message("tell me a long story"))
    await model.wait_requests(1)  # the model is streaming (and stalls after its first word)
    await env.double.push(env.double.message("/stop"))
    await closed(model)
    posts = await env.answers(1)
    await env.client.app[DISPATCHER].wait_idle()
    assert [shown(p) for p in posts] == [ZH(STOPPED)]  # one text for both messages
    assert len(model.requests) == 1
    model.release()
    await env.double.push(env.double.message("hello again"))
    posts = await env.answers(2)
    assert shown(posts[1]) == "echo: hello again"
    history = [m["content"] for m in model.requests[-1]["messages"] if m["role"] != "system"]
    assert history == ["hello again"]  # nothing of the stopped turn


async def test_dingtalk_stop_finishes_the_ai_card(aiohttp_server: Any, gateway: Any, slow_model: Any) -> None:
    model, url = slow_model
    env = await helpers.start(aiohttp_server, gateway, model_url=url, card_template_id="tpl", stream_interval=0.0)
    await env.double.push(env.double.message("tell me a long story"))
    await env.double.wait_for(lambda: env.double.calls(CARD_CREATE))  # created with the first word
    [create] = env.double.calls(CARD_CREATE)
    assert create["cardData"]["cardParamMap"]["msgContent"] == "echo:"
    await env.double.push(env.double.message("/停止"))
    await closed(model)
    await env.double.wait_for(lambda: env.double.calls(CARD_UPDATE))
    await env.client.app[DISPATCHER].wait_idle()
    final = "echo:\n\n" + ZH(STOPPED_MARK)
    assert env.double.calls(CARD_STREAM)[-1]["content"] == final
    [done] = env.double.calls(CARD_UPDATE)
    assert done["cardData"]["cardParamMap"] == {"flowStatus": "3", "msgContent": final}
    assert len(env.double.calls(CARD_CREATE)) == 1 and env.double.session_posts == []  # the card only


async def test_dingtalk_group_stop_by_the_asker(aiohttp_server: Any, gateway: Any, slow_model: Any) -> None:
    model, url = slow_model
    env = await helpers.start(aiohttp_server, gateway, model_url=url)
    await env.double.push(env.double.message("a long story", group=True, conversation_id="cid-g", staff_id="u3"))
    await model.wait_requests(1)
    await env.double.push(env.double.message("/stop", group=True, conversation_id="cid-g", staff_id="u3"))
    await closed(model)
    posts = await env.answers(1)
    await env.client.app[DISPATCHER].wait_idle()
    assert len(posts) == 1 and ZH(STOPPED) in shown(posts[0])


async def test_dingtalk_group_stop_by_another_member_is_refused(
    aiohttp_server: Any, gateway: Any, slow_model: Any
) -> None:
    model, url = slow_model
    env = await helpers.start(aiohttp_server, gateway, model_url=url)
    await env.double.push(env.double.message("a long story", group=True, conversation_id="cid-g", staff_id="u3"))
    await model.wait_requests(1)
    await env.double.push(env.double.message("/stop", group=True, conversation_id="cid-g", staff_id="u4", nick="Bo"))
    (refusal,) = await env.answers(1)
    assert ZH(NOT_YOURS) in shown(refusal)
    assert model.disconnects == 0  # the answer runs on
    model.release()
    posts = await env.answers(2)
    await env.client.app[DISPATCHER].wait_idle()
    assert shown(posts[1]) == "@u3 echo:"  # the stalled stream, released: its first word
