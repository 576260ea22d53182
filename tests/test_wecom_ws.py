"""The WeCom long connection against the double: subscribe, answers as streams, dedup, reconnects,
pings, a takeover by another connection, the stream life, quotas and the enter_chat welcome."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from gateway.channel import ChannelState
from gateway.doctor import Status
from gateway.i18n import Locale
from gateway.keys import OUTBOX
from handlers.wecom.doctor import checks as doctor_checks
from handlers.wecom.parse import welcome
from tests.conftest import make_config
from tests.doubles import wecom as wd
from tests.doubles.openai import OpenAIDouble
from tests.helpers import readiness
from tests.wecom_env import start, wecom_section


async def test_a_single_chat_message_is_answered_as_one_stream(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway)
    assert env.double.subscribes == [{"bot_id": wd.BOT_ID, "secret": wd.SECRET}]
    req_id = await env.double.push(wd.text("hello there"))
    stream = await env.double.wait_stream(req_id)
    assert "> hello there" in stream.text
    assert [s.stream_id for s in env.double.streams(req_id)] == [stream.stream_id]  # one stream
    assert all(stream.text.startswith(s.rstrip()) or s == " " for s in stream.snapshots)  # full snapshots
    assert env.double.refused == []


async def test_a_group_message_loses_the_bots_mention_and_is_answered_in_the_group(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    req_id = await env.double.push(wd.text("what time is it?", group=wd.GROUP))
    stream = await env.double.wait_stream(req_id)
    assert stream.conversation == wd.GROUP
    asked = model.requests[-1]["messages"][-1]["content"]  # "<member label>: <text>" in a group
    assert asked.endswith(": what time is it?") and wd.BOT_NAME not in asked
    # So a command is recognised too: /help is answered by the gateway, not the model.
    help_req = await env.double.push(wd.text("/help", group=wd.GROUP))
    assert "/reset" in (await env.double.wait_stream(help_req)).text
    assert len(model.requests) == 1


async def test_a_duplicate_msgid_is_answered_once(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway)
    first = await env.double.push(wd.text("once", msgid="dup-1"))
    await env.double.wait_stream(first)
    again = await env.double.redeliver("dup-1")
    after = await env.double.push(wd.text("barrier"))  # in order: once this is answered, so was the copy
    await env.double.wait_stream(after)
    await env.adapter.settled()
    assert env.double.streams(again) == []
    assert env.sample("botgate_dedup_dropped_total", platform="wecom") == 1


async def test_reconnects_within_two_seconds_after_the_socket_drops(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway)
    await env.double.close_sockets()
    async with asyncio.timeout(2):
        await env.double.wait_for(lambda: len(env.double.live) == 1 and env.double.live[0].number == 2)
        await env.adapter.wait_connected()
    req_id = await env.double.push(wd.text("still there?"))
    assert "> still there?" in (await env.double.wait_stream(req_id)).text
    assert env.adapter.status().reconnects == 1


async def test_pings_go_out_and_a_silent_socket_is_declared_dead(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway, ping_interval=0.1)
    await env.double.wait_for(lambda: env.double.connections[0].pings >= 2)
    env.double.go_silent()  # the socket stays open, nothing answers
    async with asyncio.timeout(5):  # two pings unanswered: the link is dead
        lost = await env.adapter.tracker.wait_for(lambda s: s.state is ChannelState.RECONNECTING)
    assert "2 pings unanswered" in lost.last_error
    env.double.answer_acks = env.double.answer_pings = env.double.answer_ws_pings = True
    async with asyncio.timeout(5):  # and a new connection is made
        await env.adapter.tracker.wait_for(lambda s: s.state is ChannelState.CONNECTED)
    assert len(env.double.connections) == 2


async def test_another_connection_taking_the_bot_over_is_not_fought(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway, kicked_retry=60.0)
    # Someone else subscribes with the same bot (another deployment): WeCom kicks us off.
    async with env.client.session.ws_connect(env.double.ws_url) as other:
        await other.send_str(wf_subscribe())
        async with asyncio.timeout(5):
            status = await env.adapter.tracker.wait_for(lambda s: s.state is ChannelState.REFUSED)
        assert "another connection took this bot over" in status.last_error
        subscribes = len(env.double.subscribes)
        await env.double.wait_for(lambda: len(env.double.live) == 1)
        await asyncio.sleep(0.5)  # no event to await: a reconnect would have come after 0.05-0.2 s
        assert len(env.double.subscribes) == subscribes  # no kicking back
        code, body = await readiness(env.client)
        assert code == 503 and body["channels"]["wecom/default"] == "refused"


def wf_subscribe() -> str:
    from handlers.wecom import frame as wf

    return wf.subscribe(wd.BOT_ID, wd.SECRET).encode()


async def test_a_wrong_secret_is_refused_without_a_reconnect_storm(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway, connect=False, secret="wrong")
    async with asyncio.timeout(5):
        status = await env.adapter.tracker.wait_for(lambda s: s.state is ChannelState.REFUSED)
    assert "853000" in status.last_error and "bot_id and secret" in status.last_error
    assert "wrong" not in status.last_error
    assert len(env.double.subscribes) == 1


async def test_a_rate_limited_subscribe_waits_the_reconnect_cap(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    double = {"subscribe_limit": 1, "subscribe_window": 0.5}
    env = await start(aiohttp_server, gateway, double=double, reconnect_cap=1.0)
    await env.double.close_sockets()  # the reconnect's subscribe is the second in the window: 45009
    await env.double.wait_for(lambda: len(env.double.subscribes) == 2)
    refused_at = time.monotonic()
    async with asyncio.timeout(5):
        status = await env.adapter.tracker.wait_for(lambda s: "45009" in s.last_error)
    assert status.state is ChannelState.RECONNECTING
    await env.double.wait_for(lambda: len(env.double.subscribes) == 3)
    # The next try waited the cap (1 s), not the 0.05 s of reconnect_delay: no subscribe storm.
    assert time.monotonic() - refused_at >= 0.95
    async with asyncio.timeout(5):
        await env.adapter.wait_connected()


async def test_an_answer_past_the_stream_life_ends_the_stream_and_follows_as_a_message(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    model.script = ["pause"]  # the first word, then the rest once released
    env = await start(aiohttp_server, gateway, model_url=url, stream_life=0.6, double={"stream_lifetime": 0.6})
    req_id = await env.double.push(wd.text("tell me a long story"))
    stream = await env.double.wait_stream(req_id)  # finished by us before WeCom's limit
    assert stream.text == "echo:"
    model.release()
    await env.double.wait_for(lambda: env.double.sent)
    sent = env.double.sent[0]
    assert sent.conversation == wd.USER and sent.body["msgtype"] == "markdown"
    assert sent.body["markdown"]["content"] == " tell me a long story"  # the rest, after "echo:"
    assert [r for r in env.double.refused if r[0] == "aibot_respond_msg"] == []


async def test_a_reply_whose_connection_is_gone_is_pushed(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    model.hold = True
    env = await start(aiohttp_server, gateway, model_url=url)
    await env.double.push(wd.text("answer me later"))
    await model.wait_requests(1)
    await env.double.close_sockets()  # the callback's req_id dies with its connection
    await env.double.wait_for(lambda: len(env.double.live) == 1 and env.double.live[0].number == 2)
    model.release()
    await env.double.wait_for(lambda: env.double.sent)
    assert "answer me later" in env.double.sent[0].body["markdown"]["content"]
    assert env.double.stream_list == []


async def test_a_long_answer_continues_in_a_second_stream(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    model.answer = "\n\n".join(f"段落{i} " + "长文本" * 900 for i in range(5))  # ~40 KB of UTF-8
    env = await start(aiohttp_server, gateway, model_url=url)
    req_id = await env.double.push(wd.text("long please"))
    await env.double.wait_for(lambda: "".join(s.text for s in env.double.streams(req_id)) == model.answer)
    streams = env.double.streams(req_id)
    assert len(streams) >= 2 and all(s.finished for s in streams)
    assert all(len(s.text.encode()) <= 20_480 for s in streams)
    assert env.double.refused == []


async def test_quota_makes_a_reply_wait_and_says_so(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    drain = {"dispatcher": {"drain_timeout": 0.2}}  # the held reply must not hold up the shutdown
    env = await start(aiohttp_server, gateway, replies_per_minute=2, double={"per_minute": 2}, sections=drain)
    waiting = asyncio.Event()

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "quota" in record.getMessage():
                waiting.set()

    handler = Waiting()
    logging.getLogger("handlers.wecom.api").addHandler(handler)
    try:
        firsts = [await env.double.push(wd.text(f"q{i}", msgid=f"quota-{i}")) for i in range(2)]
        for req_id in firsts:
            await env.double.wait_stream(req_id)
        third = await env.double.push(wd.text("q2", msgid="quota-2"))
        async with asyncio.timeout(5):
            await waiting.wait()  # said while it waits
        # Held back, not sent into WeCom's refusal (45009) and lost.
        assert env.double.streams(third) == []
        assert env.double.refused == []
    finally:
        logging.getLogger("handlers.wecom.api").removeHandler(handler)


async def test_enter_chat_is_welcomed_in_chinese_within_its_five_seconds(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway)
    req_id = await env.double.push_event("enter_chat")
    await env.double.wait_for(lambda: env.double.replies)
    reply = env.double.replies[0]
    assert reply.cmd == "aibot_respond_welcome_msg" and reply.req_id == req_id
    assert env.adapter.locale() is Locale.ZH_CN  # WeCom's default
    assert reply.body["text"]["content"] == welcome(Locale.ZH_CN)


async def test_a_picture_is_downloaded_and_decrypted_with_its_key(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, sections={"model": {"vision": True}})
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    media_url, aeskey = env.double.host_media(png, "pic.png")
    req_id = await env.double.push(wd.image(media_url, aeskey))
    await env.double.wait_stream(req_id)
    parts = model.requests[-1]["messages"][-1]["content"]
    images = [p["image_url"]["url"] for p in parts if p.get("type") == "image_url"]
    import base64

    assert images == [f"data:image/png;base64,{base64.b64encode(png).decode()}"]
    assert [status for _, status in env.double.media_gets] == [200]


async def test_a_file_is_downloaded_within_its_url_life_and_read(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    media_url, aeskey = env.double.host_media(b"quarterly revenue grew 42 percent\n", "report.txt")
    req_id = await env.double.push(wd.file(media_url, aeskey))
    await env.double.wait_stream(req_id)
    assert "quarterly revenue grew 42 percent" in str(model.requests[-1]["messages"][-1]["content"])
    assert [status for _, status in env.double.media_gets] == [200]


API_TOKEN = "wecom-api-token-0123456789"


async def test_the_send_api_pushes_to_a_chat_that_messaged_the_bot(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway, sections={"api": {"tokens": [API_TOKEN]}})
    await env.double.wait_stream(await env.double.push(wd.text("hi", group=wd.GROUP)))
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    outbox = env.client.app[OUTBOX]
    body = {"platform": "wecom", "conversation": wd.GROUP, "markdown": "**deploy** finished"}
    sent = await env.client.post("/api/v1/messages", json=body, headers=auth)
    assert sent.status == 202
    async with asyncio.timeout(10):
        assert (await outbox.settled((await sent.json())["id"])).state == "sent"
    assert [(s.conversation, s.body["markdown"]["content"]) for s in env.double.sent] == [
        (wd.GROUP, "**deploy** finished")
    ]
    # WeCom takes pushes only to chats that wrote first: failed at once, with WeCom's reason.
    stranger = await env.client.post(
        "/api/v1/messages", json={"platform": "wecom", "user": "stranger", "text": "hello"}, headers=auth
    )
    async with asyncio.timeout(10):
        failed = await outbox.settled((await stranger.json())["id"])
    assert failed.state == "failed" and failed.attempts == 1 and failed.reason


async def test_doctor_subscribes_with_the_credentials_and_names_the_fix(aiohttp_server: Callable[..., Any]) -> None:
    double = await wd.start(aiohttp_server)
    good = make_config(wecom=wecom_section(double))
    bad = make_config(wecom=wecom_section(double, secret="not-it"))
    async with aiohttp.ClientSession() as http:
        ok = await doctor_checks(good, http)[0].run()
        refused = await doctor_checks(bad, http)[0].run()
    assert ok.status is Status.WARN and "subscribed" in ok.detail and "one connection per bot" in ok.fix
    assert refused.status is Status.FAIL and "853000" in refused.detail and "[wecom] bot_id and secret" in refused.fix
    assert "not-it" not in refused.detail + refused.fix
