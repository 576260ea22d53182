"""The working indicator of an answer made without a card (gateway/working.py): Feishu's "OnIt"
reaction on the user's message while it is made, and one "still working" notice when it takes
longer than `[chat] long_task_notice`; on the Feishu, DingTalk and OpenAI doubles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.i18n import translator
from gateway.keys import CHANNELS, DISPATCHER
from gateway.working import STILL_WORKING, Marks
from handlers.feishu.adapter import WORKING_EMOJI, FeishuAdapter
from tests import helpers
from tests.doubles import feishu as fd
from tests.doubles.feishu import FeishuDouble
from tests.doubles.feishu_events import message_event
from tests.doubles.openai import OpenAIDouble

Client = TestClient[web.Request, web.Application]
Start = Callable[..., Any]
STILL = translator("zh-CN")(STILL_WORKING)  # both platforms default to Chinese


@pytest.fixture
async def feishu(aiohttp_server: Callable[..., Any]) -> tuple[FeishuDouble, str]:
    return await fd.start(aiohttp_server)


@pytest.fixture
def start(feishu: tuple[FeishuDouble, str], openai_double: tuple[OpenAIDouble, str], gateway: Start) -> Start:
    """A Feishu gateway answering without cards: its API budget is 80 % used (`monthly_api_budget`
    of 10, spent on /help answers, one billable call each), the only state in which Feishu does."""

    async def run(**chat: Any) -> Client:
        double, domain = feishu
        sections: dict[str, Any] = {"feishu": {"monthly_api_budget": 10}, "limits": {"per_user_per_minute": 0}}
        client: Client = await gateway(fd.config(domain, openai_double[1], chat=chat, **sections))
        await double.wait_for(lambda: double.pings >= 1)
        adapter = client.app[CHANNELS]["feishu/default"]
        assert isinstance(adapter, FeishuAdapter)
        for n in range(10):  # bounded: one billable reply each
            if adapter.budget.degraded:
                break
            await double.push_event(message_event("/help", message_id=f"om_help{n}"))
            await double.wait_for(lambda n=n: double.answer(f"om_help{n}") is not None)  # type: ignore[misc]
        assert adapter.budget.degraded and not adapter.budget.spent
        double.reaction_calls.clear()
        return client

    return run


def path_index(double: FeishuDouble, fragment: str) -> list[int]:
    """Where the Open API calls whose path contains `fragment` came, in arrival order."""
    return [i for i, (_, path) in enumerate(double.requests) if fragment in path]


async def test_feishu_reaction_added_while_answering_and_removed_after(
    start: Start, feishu: Any, openai_double: Any
) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.hold = True
    client = await start()
    before = len(double.requests)
    await double.push_event(message_event("slow one", message_id="om_1"))
    await double.wait_for(lambda: bool(double.reactions))
    assert list(double.reactions.values()) == [("om_1", WORKING_EMOJI)]  # marked while it is made
    assert double.replies_to("om_1") == []
    model.release()
    await double.wait_for(lambda: double.answer("om_1") == "echo: slow one")
    await client.app[DISPATCHER].wait_idle()
    (reply,) = double.replies_to("om_1")
    assert reply.content.get("type") != "card" and double.cards == {}  # no card: that is why
    assert double.reactions == {}  # and removed once answered
    assert double.reaction_calls == [("add", "om_1", "OnIt", "rc_1"), ("remove", "om_1", "OnIt", "rc_1")]
    # Around the answer: added before the reply went out, removed after it.
    added, removed = (i for i in path_index(double, "/reactions") if i >= before)
    (replied,) = (i for i in path_index(double, "/reply") if i >= before)
    assert added < replied < removed


async def test_feishu_long_answer_gets_one_notice_before_it(start: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.hold = True
    client = await start(long_task_notice=0.05)
    await double.push_event(message_event("long one", message_id="om_1"))
    await double.wait_for(lambda: double.answer("om_1") == STILL)
    model.release()
    await double.wait_for(lambda: len(double.replies_to("om_1")) >= 2)
    await client.app[DISPATCHER].wait_idle()
    assert [double.shown(r) for r in double.replies_to("om_1")] == [STILL, "echo: long one"]


async def test_feishu_quick_answer_gets_no_notice(start: Start, feishu: Any) -> None:
    double, _ = feishu
    client = await start(long_task_notice=5)
    await double.push_event(message_event("quick", message_id="om_1"))
    await double.wait_for(lambda: double.answer("om_1") is not None)
    await client.app[DISPATCHER].wait_idle()
    assert [double.shown(r) for r in double.replies_to("om_1")] == ["echo: quick"]


def shown(post: dict[str, Any]) -> str:
    """The text of a DingTalk sessionWebhook message (markdown or text)."""
    return str(post["markdown"]["text"] if "markdown" in post else post["text"]["content"])


async def test_dingtalk_long_answer_gets_one_notice_and_no_reaction(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    model.hold = True
    env = await helpers.start(aiohttp_server, gateway, model_url=url, sections={"chat": {"long_task_notice": 0.05}})
    await env.double.push(env.double.message("long one"))
    (notice,) = await env.answers(1)
    assert shown(notice) == STILL
    model.release()
    posts = await env.answers(2)
    await env.client.app[DISPATCHER].wait_idle()
    assert [shown(p) for p in posts] == [STILL, "echo: long one"]
    # No reaction on DingTalk: its adapter has no way to mark a message (docs/chat.md).
    assert not isinstance(env.adapter, Marks)


async def test_dingtalk_quick_answer_gets_no_notice(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    _, url = openai_double
    env = await helpers.start(aiohttp_server, gateway, model_url=url, sections={"chat": {"long_task_notice": 5}})
    await env.double.push(env.double.message("quick"))
    await env.answers(1)
    await env.client.app[DISPATCHER].wait_idle()
    assert [shown(p) for p in env.double.session_posts] == ["echo: quick"]
