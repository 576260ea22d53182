"""Usage accounting and daily quotas (gateway/usage.py) through the DingTalk double and the OpenAI
double: `/usage` figures, a quota crossed, reported and estimated tokens, figures surviving a
restart, the admin export, the metrics."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError
from gateway.keys import DISPATCHER
from gateway.usage import estimate_tokens, resets_at, zone
from tests.conftest import make_config
from tests.doubles.openai import OpenAIDouble
from tests.helpers import DingTalkEnv, start


def text_of(post: dict[str, Any]) -> str:
    """What a sessionWebhook post shows."""
    if "markdown" in post:
        return str(post["markdown"]["text"])
    return str(post["text"]["content"])


async def say(env: DingTalkEnv, text: str, *, staff_id: str = "alice", group: str = "") -> str:
    """One message (a DM, or in group `group`); returns the text of the reply it got."""
    before = len(env.double.session_posts)
    if group:
        body = env.double.message(text, group=True, conversation_id=group, staff_id=staff_id, nick=staff_id)
    else:
        body = env.double.message(text, staff_id=staff_id)
    await env.double.push(body)
    posts = await env.answers(before + 1)
    await env.client.app[DISPATCHER].wait_idle()
    return text_of(posts[before])


async def test_usage_after_three_answers_counts_the_reported_tokens(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    for n in range(3):
        assert await say(env, f"question {n}") == f"echo: question {n}"
    # The client asked for the usage chunk; the double sent 7 prompt + 3 completion tokens each.
    assert all(r["stream_options"] == {"include_usage": True} for r in model.requests)
    report = await say(env, "/usage")
    assert len(model.requests) == 3  # answered by the gateway itself
    assert "你的用量" in report
    assert "- 今天：3 条消息，30 个 token" in report
    assert "- 本月：3 条消息，30 个 token" in report
    assert "估算" not in report and "本群" not in report
    assert await say(env, "/用量") == report  # the Chinese alias; commands are not counted
    assert env.sample("botgate_tokens_total", bot="dingtalk/default", agent="default", source="reported") == 30
    assert env.sample("botgate_tokens_total", bot="dingtalk/default", agent="default", source="estimated") == 0


async def test_usage_in_a_group_shows_the_groups_figures_too(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    await say(env, "hello team", staff_id="alice", group="cid-team")
    await say(env, "hi all", staff_id="bob", group="cid-team")
    await say(env, "just us", staff_id="bob")
    report = await say(env, "/usage", staff_id="bob", group="cid-team")
    mine, group = report.split("**本群**")
    # Bob: two answers (group + DM); the group: Alice's and Bob's. Each 7 + 3 tokens ("echo: <name>: <text>").
    assert "- 今天：2 条消息" in mine and "- 今天：2 条消息" in group
    assert report.startswith("@bob ")


async def test_a_user_over_the_daily_messages_gets_the_notice_and_no_model_call(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, sections={"quotas": {"user_daily_messages": 2}})
    await say(env, "one")
    await say(env, "two")
    notice = await say(env, "three")
    assert notice == "你今天的 2 条消息额度已用完，将于明天 00:00（北京时间）重置。"
    assert len(model.requests) == 2  # the model never saw the third
    assert env.sample("botgate_quota_refused_total", kind="user_messages") == 1
    assert "- 你的消息：已用 2 / 2" in await say(env, "/usage")  # commands still work
    assert await say(env, "four", staff_id="bob") == "echo: four"  # another user has their own
    assert len(model.requests) == 3


async def test_token_quotas_of_a_user_and_of_a_conversation(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    quotas = {"user_daily_tokens": 15, "conversation_daily_tokens": 25}
    env = await start(aiohttp_server, gateway, model_url=url, sections={"quotas": quotas, "chat": {"locale": "en"}})
    await say(env, "a", group="cid-g")  # 10 tokens: under both
    await say(env, "b", group="cid-g")  # crosses Alice's 15 (answered: the cost is known afterwards)
    refused = await say(env, "c", group="cid-g")
    assert "You have used today's quota of 15 tokens. It resets tomorrow at 00:00 (Beijing time)." in refused
    await say(env, "d", staff_id="bob", group="cid-g")  # the group: 30 tokens now
    refused = await say(env, "e", staff_id="carol", group="cid-g")
    assert "This conversation has used today's quota of 25 tokens." in refused
    assert len(model.requests) == 3
    assert env.sample("botgate_quota_refused_total", kind="user_tokens") == 1
    assert env.sample("botgate_quota_refused_total", kind="conversation_tokens") == 1


@pytest.mark.parametrize("backend", ["openai-without-usage", "echo"])
async def test_tokens_are_estimated_and_marked_when_the_backend_reports_none(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], backend: str
) -> None:
    url = ""
    if backend != "echo":
        double = OpenAIDouble(usage=False)
        url = str((await aiohttp_server(double.app())).make_url("/v1"))
    env = await start(aiohttp_server, gateway, model_url=url)
    await say(env, "今天天气怎么样")
    report = await say(env, "/usage")
    estimated = env.sample("botgate_tokens_total", bot="dingtalk/default", agent="default", source="estimated")
    assert estimated > 0
    assert env.sample("botgate_tokens_total", bot="dingtalk/default", agent="default", source="reported") == 0
    assert f"- 今天：1 条消息，{int(estimated)} 个 token" in report
    assert f"（其中 {int(estimated)} 个 token 是估算的：模型没有报告用量。）" in report


def test_the_estimate_counts_chinese_characters_dearer() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a" * 10) == 3  # 0.3 a character
    assert estimate_tokens("你" * 10) == 6  # 0.6 a character
    assert estimate_tokens("你好 hi") == 3  # 1.2 + 0.9, rounded up


async def test_usage_survives_a_restart_on_sqlite(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str],
    tmp_path: Path,
) -> None:
    _, url = openai_double
    store = {"store": {"url": f"sqlite:///{tmp_path / 'usage.sqlite3'}"}}
    first = await start(aiohttp_server, gateway, model_url=url, sections=dict(store))
    await say(first, "before the restart")
    await first.client.close()
    second = await start(aiohttp_server, gateway, model_url=url, sections=dict(store))
    assert "- 今天：1 条消息，11 个 token" in await say(second, "/usage")


async def test_admin_usage_json_and_csv(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    await say(env, "x", group="cid-g")
    await say(env, "y", staff_id="bob")
    await say(env, "z", staff_id="bob")
    resp = await env.client.get("/api/usage")
    assert resp.status == 200
    body = await resp.json()
    assert body["timezone"] == "Asia/Shanghai"
    assert [(u["key"], u["messages"]) for u in body["users"]] == [("dingtalk:bob", 2), ("dingtalk:alice", 1)]
    assert [g["key"] for g in body["groups"]] == ["dingtalk:cid-g"]
    # 7 prompt tokens each, and a completion token per word of "echo: alice: x", "echo: y", "echo: z"
    assert body["bots"] == [{"key": "dingtalk/default", "messages": 3, "tokens": 28, "estimated_tokens": 0}]
    assert body["agents"][0]["key"] == "default"
    resp = await env.client.get("/api/usage", params={"day": body["day"], "format": "csv"})
    assert resp.status == 200 and resp.content_type == "text/csv"
    rows = list(csv.reader(io.StringIO(await resp.text())))
    assert rows[0] == ["kind", "key", "messages", "tokens", "estimated_tokens"]
    assert ["bot", "dingtalk/default", "3", "28", "0"] in rows
    other_day = await (await env.client.get("/api/usage", params={"day": "2020-01-01"})).json()
    assert other_day["users"] == [] and other_day["bots"] == []
    for bad in ({"day": "yesterday"}, {"day": "2026-13-01"}, {"format": "xml"}, {"limit": "0"}):
        assert (await env.client.get("/api/usage", params=bad)).status == 400
    # The status page's panel: today's top users, groups and bots.
    page = await (await env.client.get("/", headers={"Accept-Language": "en"})).text()
    assert "Usage today" in page and "dingtalk:bob" in page and "dingtalk:cid-g" in page


async def test_usage_needs_the_admin_login(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], aiohttp_client: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway)
    anonymous = await aiohttp_client(env.client.server)
    assert (await anonymous.get("/api/usage")).status == 401


def test_quota_settings_are_checked() -> None:
    cfg = make_config()
    quotas = cfg.quotas
    assert (quotas.user_daily_tokens, quotas.user_daily_messages, quotas.timezone) == (0, 0, "Asia/Shanghai")
    with pytest.raises(ConfigError, match=r"quotas\.user_daily_messages: must be 0 \(unlimited\) or more"):
        make_config(quotas={"user_daily_messages": -1})
    with pytest.raises(ConfigError, match=r"quotas\.timezone: must be an IANA time zone"):
        make_config(quotas={"timezone": "Mars/Olympus"})
    utc = make_config(quotas={"timezone": "UTC"})
    assert resets_at(zone(utc), None) == "明天 00:00（UTC）"
