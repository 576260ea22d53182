"""A reasoning model's thinking, end to end against the OpenAI double streaming it in each form
(`reasoning_content`, `reasoning`, inline `<think>`, inline without the opening tag): stripped by
default from every reply and from the context; quoted with `show`; with `fold`, in a collapsed
panel of the Feishu card, and stripped where there is no panel (DingTalk's AI card, the web chat)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.keys import DISPATCHER
from gateway.reasoning import THINKING, shown
from handlers.feishu.render import THINKING_ID
from tests.conftest import make_config
from tests.doubles import feishu as fd
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu import FeishuDouble
from tests.doubles.feishu_events import message_event
from tests.doubles.openai import OpenAIDouble
from tests.helpers import chat, hello, start

THOUGHT = "the user wants my secret plan"
FORMS = ["reasoning_content", "reasoning", "think", "orphan"]
Client = TestClient[web.Request, web.Application]


def context(model: OpenAIDouble) -> list[str]:
    """What the model was sent with the last question: the kept turns, then the question."""
    return [m["content"] for m in model.requests[-1]["messages"][1:]]


async def webchat(gateway: Any, url: str, **model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Two questions in one web chat conversation: the frames of each."""
    client = await gateway(make_config(model={"base_url": url, **model}, cache={"enabled": False}))
    async with client.ws_connect("/chat/ws") as ws:
        await hello(ws)
        return await chat(client, ws, "one two", "m1"), await chat(client, ws, "three", "m2")


def leaked(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if "secret" in f.get("text", "")]


@pytest.mark.parametrize("form", FORMS)
async def test_thinking_never_reaches_the_chat_nor_the_context_by_default(
    gateway: Any, openai_double: tuple[OpenAIDouble, str], form: str
) -> None:
    model, url = openai_double
    model.reasoning, model.reasoning_as = THOUGHT, form
    first, second = await webchat(gateway, url)
    assert (first[-1]["text"], second[-1]["text"]) == ("echo: one two", "echo: three")
    assert context(model) == ["one two", "echo: one two", "three"]
    if form == "orphan":
        # Nothing tells a thought without its opening tag from an answer until the close tag: the
        # first stream showed it for a moment, and from then on the model is known for it.
        assert leaked(first) and all(f["type"] == "delta" for f in leaked(first))
        assert leaked(second) == []
    else:
        assert leaked(first) == leaked(second) == []


@pytest.mark.parametrize("form", FORMS)
async def test_show_quotes_the_thinking_above_the_answer_but_keeps_only_the_answer(
    gateway: Any, openai_double: tuple[OpenAIDouble, str], form: str
) -> None:
    model, url = openai_double
    model.reasoning, model.reasoning_as = THOUGHT, form
    first, second = await webchat(gateway, url, reasoning="show")
    assert first[-1]["text"] == shown(THOUGHT, "echo: one two")
    assert first[-1]["text"].startswith(f"> **{THINKING}**\n>\n> {THOUGHT}\n\n")
    assert second[-1]["text"] == shown(THOUGHT, "echo: three")
    assert context(model) == ["one two", "echo: one two", "three"]


async def test_fold_strips_the_thinking_where_there_is_no_panel(
    gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    model.reasoning = THOUGHT
    first, second = await webchat(gateway, url, reasoning="fold")
    assert first[-1]["text"] == "echo: one two" and leaked(first) == leaked(second) == []


async def test_fold_on_a_dingtalk_ai_card_strips_the_thinking(
    aiohttp_server: Callable[..., Any], gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    model.reasoning, model.reasoning_as = THOUGHT, "think"
    double = DingTalkDouble()
    env = await start(
        aiohttp_server,
        gateway,
        model_url=url,
        double=double,
        card_template_id="tpl-ai.schema",
        stream_interval=0.0,
        sections={"model": {"reasoning": "fold"}},
    )
    await double.push(double.message("one two"))
    await double.wait_for(lambda: double.cards and all(c.finished for c in double.cards.values()))
    await env.client.app[DISPATCHER].wait_idle()
    [card] = double.cards.values()
    assert card.text == "echo: one two" and card.streamed
    assert all("secret" not in str(update) for update in card.streamed)


@pytest.mark.parametrize("form", ["reasoning_content", "think"])
@pytest.mark.parametrize("interval", [0.0, 3600.0])  # every delta pushed; only the first and the final text
async def test_fold_puts_the_thinking_in_a_collapsed_panel_of_the_feishu_card(
    aiohttp_server: Callable[..., Any],
    gateway: Any,
    openai_double: tuple[OpenAIDouble, str],
    form: str,
    interval: float,
) -> None:
    model, url = openai_double
    model.reasoning, model.reasoning_as = THOUGHT, form
    double: FeishuDouble
    double, domain = await fd.start(aiohttp_server)
    feishu = {"stream_interval": interval}
    client: Client = await gateway(fd.config(domain, url, feishu=feishu, model={"reasoning": "fold"}))
    await double.wait_for(lambda: double.pings >= 1)
    for n, text in enumerate(["one two", "three"]):
        await double.push_event(message_event(text, message_id=f"om_{n}"))
        await double.wait_for(lambda n=n: double.answer(f"om_{n}") is not None)  # type: ignore[misc]
        await client.app[DISPATCHER].wait_idle()
    assert [double.answer("om_0"), double.answer("om_1")] == ["echo: one two", "echo: three"]
    card = double.card_of(double.replies_to("om_0")[0])
    panel, answer = card.card["body"]["elements"]  # the card as created: the panel first
    assert panel["tag"] == "collapsible_panel" and panel["expanded"] is False
    assert panel["header"]["title"]["content"] == THINKING
    assert panel["elements"][0]["element_id"] == THINKING_ID
    assert card.element_text(THINKING_ID) == THOUGHT  # streamed into the panel, the end with the answer
    assert all("secret" not in text for _, text in card.contents)  # never in the answer's element
    assert "secret" not in answer["content"]
    assert card.closed and double.rejected == []
    assert context(model) == ["one two", "echo: one two", "three"]
