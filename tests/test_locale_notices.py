"""The chat's own texts in the message's language (docs/chat.md "Languages"): Simplified Chinese by
default on DingTalk and Feishu, English where `[chat] locale = "en"` forces it or the Feishu domain
is Lark's, a bot's own `locale` over `[chat]`'s, and the web chat by the browser's Accept-Language."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient, TestServer

import handlers
from gateway.answer import EMPTY_ANSWER, MODEL_DOWN
from gateway.app import create_app
from gateway.config import DEFAULT_SYSTEM_PROMPT
from gateway.dispatcher import BUSY_NOTICE
from gateway.i18n import Locale, translator
from gateway.keys import AUTH, DISPATCHER, RESOLVER
from gateway.steps import RATE_LIMITED, help_text
from tests.conftest import make_config
from tests.doubles import feishu as fd
from tests.doubles.feishu import FeishuDouble
from tests.doubles.feishu_events import message_event
from tests.doubles.openai import OpenAIDouble
from tests.helpers import DingTalkEnv, chat, hello, notice_start, start

Client = TestClient[web.Request, web.Application]
ZH, EN = translator(Locale.ZH_CN), translator(Locale.EN)
LARK = "open.larksuite.test"  # a larksuite domain (the double, resolved to 127.0.0.1 by `Resolver`)


def help_in(locale: Locale) -> str:
    """/help as `locale` words it (checked against its first words, not only the code making it)."""
    text = help_text(locale)
    assert text.startswith({Locale.ZH_CN: "我是 AI 助手", Locale.EN: "I am an AI assistant."}[locale])
    assert "`/reset`" in text and "`/help`" in text
    return text


# -- DingTalk ---------------------------------------------------------------------------------------
async def ask(env: DingTalkEnv, text: str, staff_id: str = "u1") -> str:
    """Push a DM and return the text of the next message the double receives."""
    before = len(env.double.session_posts)
    await env.double.push(env.double.message(text, staff_id=staff_id, conversation_id=f"cid-{staff_id}"))
    posts = await env.answers(before + 1)
    return str(posts[before]["markdown"]["text"])


async def test_dingtalk_speaks_chinese_by_default(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, sections={"model": {"max_retries": 0}})
    assert await ask(env, "/help") == help_in(Locale.ZH_CN)
    model.script = [500]
    down = await ask(env, "are you there?")
    assert down.startswith(notice_start(MODEL_DOWN, reason="server error")) and down.startswith("抱歉")
    model.answer = ""
    assert (await ask(env, "say nothing")).startswith(notice_start(EMPTY_ANSWER))
    model.answer = None
    assert await ask(env, "hello") == "echo: hello"
    # The default system prompt is worded in the message's language too.
    assert model.requests[-1]["messages"][0]["content"] == ZH(DEFAULT_SYSTEM_PROMPT) != DEFAULT_SYSTEM_PROMPT


async def test_dingtalk_rate_limit_notice_in_chinese(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, sections={"limits": {"per_user_per_minute": 1}})
    assert await ask(env, "one") == "echo: one"
    assert await ask(env, "two") == ZH(RATE_LIMITED) == "你发消息的速度比我回答得还快，请稍等一分钟。"


async def test_dingtalk_busy_notice_in_chinese(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    model, url = openai_double
    model.hold = True
    dispatcher = {"max_queue": 1, "max_concurrency": 1}
    env = await start(aiohttp_server, gateway, model_url=url, sections={"dispatcher": dispatcher})
    await env.double.push(env.double.message("question 1", staff_id="a1", conversation_id="cid-a1"))
    await model.wait_requests(1)  # in flight: the next one fills the queue
    await env.double.wait_acked(await env.double.push(env.double.message("question 2", staff_id="b2")))
    assert await ask(env, "question 3", "c3") == ZH(BUSY_NOTICE)
    model.release()
    await env.answers(3)
    async with asyncio.timeout(10):
        await env.client.app[DISPATCHER].wait_idle()


async def test_forced_english(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    model, url = openai_double
    sections: dict[str, dict[str, Any]] = {
        "chat": {"locale": "en"},
        "model": {"max_retries": 0},
        "limits": {"per_user_per_minute": 2},  # /help is not counted
    }
    env = await start(aiohttp_server, gateway, model_url=url, sections=sections)
    assert await ask(env, "/help") == help_in(Locale.EN)
    model.script = [500]
    assert (await ask(env, "there?")).startswith("Sorry, the AI model is not answering right now (server error).")
    model.answer = ""
    assert (await ask(env, "nothing")).startswith(EN(EMPTY_ANSWER).split("{request_id}")[0])
    assert await ask(env, "four") == RATE_LIMITED  # the msgid is the English
    assert model.requests[-1]["messages"][0]["content"] == DEFAULT_SYSTEM_PROMPT


async def test_a_bots_own_locale_wins_over_chat(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    """`[chat] locale = "en"`, but this DingTalk bot's `locale = "zh-CN"`: Chinese."""
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, sections={"chat": {"locale": "en"}}, locale="zh-CN")
    assert await ask(env, "/help") == help_in(Locale.ZH_CN)


async def test_an_operators_system_prompt_is_not_translated(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    prompt = "You answer questions about the HR handbook."
    env = await start(aiohttp_server, gateway, model_url=url, sections={"model": {"system_prompt": prompt}})
    await ask(env, "holidays?")
    assert model.requests[-1]["messages"][0]["content"] == prompt


# -- Feishu and Lark --------------------------------------------------------------------------------
class Resolver(AbstractResolver):
    """`LARK` is 127.0.0.1; every other name fails (no DNS server is ever asked)."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != LARK:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(
                hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0, flags=socket.AI_NUMERICHOST
            )
        ]

    async def close(self) -> None:
        pass


StartFeishu = Callable[..., Any]


@pytest.fixture
def feishu(
    aiohttp_server: Callable[..., Any], aiohttp_client: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> StartFeishu:
    """Start a Feishu double and a gateway on it, its domain named `domain` (a name: resolved by
    `Resolver`), with `sections` merged over the config; returns both once connected."""

    async def run(domain: str = "", **sections: dict[str, Any]) -> tuple[FeishuDouble, Client]:
        double, base = await fd.start(aiohttp_server)
        if domain:
            base = base.replace("127.0.0.1", domain)
        app = create_app(fd.config(base, openai_double[1], **sections), [handlers.setup])
        app[RESOLVER] = Resolver()
        headers = {"Authorization": f"Bearer {app[AUTH].login_token.current()}"}
        client: Client = await aiohttp_client(TestServer(app, host="127.0.0.1"), headers=headers)
        await double.wait_for(lambda: double.pings >= 1)
        return double, client

    return run


async def feishu_ask(double: FeishuDouble, text: str, message_id: str) -> str:
    await double.push_event(message_event(text, message_id=message_id))
    await double.wait_for(lambda: double.answer(message_id) is not None)
    shown = double.answer(message_id)
    assert shown is not None
    return shown


async def test_feishu_speaks_chinese_by_default(feishu: StartFeishu, openai_double: Any) -> None:
    model, _ = openai_double
    double, client = await feishu(model={"max_retries": 0}, limits={"per_user_per_minute": 3})  # /help is not counted
    assert await feishu_ask(double, "/help", "om_1") == help_in(Locale.ZH_CN)
    model.script = [500]
    assert (await feishu_ask(double, "there?", "om_2")).startswith(notice_start(MODEL_DOWN, reason="server error"))
    model.answer = ""
    assert (await feishu_ask(double, "nothing", "om_3")).startswith(notice_start(EMPTY_ANSWER))
    model.answer = None
    assert await feishu_ask(double, "five", "om_4") == "echo: five"
    assert await feishu_ask(double, "six", "om_5") == ZH(RATE_LIMITED)
    await client.app[DISPATCHER].wait_idle()


async def test_feishu_busy_notice_in_chinese(feishu: StartFeishu, openai_double: Any) -> None:
    model, _ = openai_double
    model.hold = True
    double, client = await feishu(dispatcher={"max_queue": 1, "max_concurrency": 1})
    await double.push_event(message_event("one", message_id="om_1", chat_id="oc_1", sender="ou_1"))
    await model.wait_requests(1)  # in flight: the next one fills the queue
    second = await double.push_event(message_event("two", message_id="om_2", chat_id="oc_2", sender="ou_2"))
    await double.response(second)  # accepted, and queued
    await double.push_event(message_event("three", message_id="om_3", chat_id="oc_3", sender="ou_3"))
    await double.wait_for(lambda: double.answer("om_3") is not None)
    assert double.answer("om_3") == ZH(BUSY_NOTICE)
    model.release()
    await double.wait_for(lambda: double.answer("om_2") is not None)
    await client.app[DISPATCHER].wait_idle()


async def test_lark_speaks_english(feishu: StartFeishu, openai_double: Any) -> None:
    model, _ = openai_double
    double, _ = await feishu(domain=LARK, model={"max_retries": 0})
    assert await feishu_ask(double, "/help", "om_1") == help_in(Locale.EN)
    model.script = [500]
    down = await feishu_ask(double, "there?", "om_2")
    assert down.startswith(notice_start(MODEL_DOWN, "en", reason="server error"))


async def test_lark_bot_with_its_own_locale(feishu: StartFeishu) -> None:
    """A Lark app whose `[feishu] locale = "zh-CN"`: Chinese, Lark or not."""
    double, _ = await feishu(domain=LARK, feishu={"locale": "zh-CN"})
    assert await feishu_ask(double, "/help", "om_1") == help_in(Locale.ZH_CN)


# -- the web chat -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("accept_language", "chat_locale", "expected"),
    [
        ("en-US,en;q=0.9", "auto", Locale.EN),
        ("zh-CN,zh;q=0.9,en;q=0.8", "auto", Locale.ZH_CN),
        ("fr-FR, de", "auto", Locale.EN),  # only other languages: the international fallback
        (None, "auto", Locale.ZH_CN),  # no header: like every other channel
        ("en-US", "zh-CN", Locale.ZH_CN),  # a forced locale wins over the browser
    ],
)
async def test_web_chat_follows_accept_language(
    gateway: Any, openai_double: Any, accept_language: str | None, chat_locale: str, expected: Locale
) -> None:
    model, url = openai_double
    client = await gateway(make_config(model={"base_url": url, "max_retries": 0}, chat={"locale": chat_locale}))
    headers = {"Accept-Language": accept_language} if accept_language else {}
    async with client.ws_connect("/chat/ws", headers=headers) as ws:
        await hello(ws)
        assert (await chat(client, ws, "/help", "m1"))[-1]["text"] == help_in(expected)
        model.script = [500]
        down = (await chat(client, ws, "there?", "m2"))[-1]["text"]
    assert down.startswith(notice_start(MODEL_DOWN, expected.value, reason="server error"))
