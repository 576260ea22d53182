"""WeCom's callback mode against the double's `CallbackClient` (WeCom's side: signed, encrypted):
URL verification, a full encrypted round trip with stream polling, refusals, the welcome, and
`both` behind one dedup."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.doubles import wecom as wd
from tests.doubles.openai import OpenAIDouble
from tests.wecom_env import start

PATH = "/wecom/webhook"
CALLBACK: dict[str, Any] = {"token": wd.TOKEN, "encoding_aes_key": wd.ENCODING_AES_KEY}


async def test_the_url_check_is_answered_with_the_plaintext(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway, mode="webhook", **CALLBACK)
    query, echo = wd.CallbackClient().verification()
    async with env.client.get(PATH, params=query) as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        assert await resp.text() == echo  # as it is: no quotes, no newline


async def test_bad_signatures_are_refused_401_json_never_5xx(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway, mode="webhook", **CALLBACK)
    query, _ = wd.CallbackClient().verification()
    async with env.client.get(PATH, params={**query, "msg_signature": "0" * 40}) as resp:
        assert resp.status == 401 and (await resp.json()) == {"error": "unauthorized"}
    forger = wd.CallbackClient(token="not-the-token")
    query, body = forger.envelope(wd.text("let me in"))
    async with env.client.post(PATH, params=query, data=body) as resp:
        assert resp.status == 401 and (await resp.json()) == {"error": "unauthorized"}
    for garbage in (b"", b"not json", b'{"encrypt": 5}', b'{"encrypt": "%%%"}'):
        async with env.client.post(PATH, params=query, data=garbage) as resp:
            assert resp.status == 401
    assert env.sample("botgate_messages_total", platform="wecom") == 0


async def test_a_message_round_trip_streams_through_the_polls(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway, mode="webhook", **CALLBACK)
    streams = await wd.CallbackClient().converse(env.client, PATH, wd.text("hello callback"))
    assert streams[0]["finish"] is False and streams[0]["content"]  # never empty
    assert len({s["id"] for s in streams}) == 1
    assert streams[-1]["finish"] is True and "> hello callback" in streams[-1]["content"]


async def test_a_repeated_delivery_gets_the_same_stream_and_one_answer(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway, mode="webhook", **CALLBACK)
    wecom, message = wd.CallbackClient(), wd.text("only once", msgid="cb-dup")
    first = await wecom.deliver(env.client, PATH, message)
    again = await wecom.deliver(env.client, PATH, message)
    assert first.reply is not None and again.reply is not None
    assert first.reply["stream"]["id"] == again.reply["stream"]["id"]
    assert env.sample("botgate_dedup_dropped_total", platform="wecom") == 1


async def test_an_unknown_stream_poll_is_told_to_stop(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway, mode="webhook", **CALLBACK)
    wecom = wd.CallbackClient()
    poll = await wecom.deliver(env.client, PATH, wecom.refresh(wd.text("x"), "someone-elses"))
    assert poll.status == 200 and poll.reply is not None and poll.reply["stream"]["finish"] is True


async def test_enter_chat_is_welcomed_in_the_reply(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway, mode="webhook", **CALLBACK)
    delivered = await wd.CallbackClient().deliver(env.client, PATH, wd.event("enter_chat"))
    assert delivered.reply is not None and delivered.reply["msgtype"] == "text"
    assert delivered.reply["text"]["content"]


async def test_both_transports_answer_a_message_once(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    env = await start(aiohttp_server, gateway, mode="both", **CALLBACK)
    message = wd.text("via both", msgid="both-1")
    req_id = await env.double.push(message)
    await env.double.wait_stream(req_id)
    late = await wd.CallbackClient().deliver(env.client, PATH, message)
    assert late.status == 200 and late.reply is None  # answered already: no second stream to poll
    assert env.sample("botgate_dedup_dropped_total", platform="wecom") == 1
    assert len(env.double.stream_list) == 1


async def test_past_the_stream_life_the_rest_goes_to_the_response_url(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], openai_double: tuple[OpenAIDouble, str]
) -> None:
    model, url = openai_double
    model.script = ["pause"]  # the first word, then the rest once released
    env = await start(aiohttp_server, gateway, model_url=url, mode="webhook", stream_life=0.5, **CALLBACK)
    wecom = wd.CallbackClient()
    message = {**wd.text("a slow one"), "response_url": env.double.response_url("rc-slow")}
    first = await wecom.deliver(env.client, PATH, message)
    assert first.reply is not None
    stream_id = first.reply["stream"]["id"]
    seen = ""
    while seen != "echo:":  # WeCom polls on a timer; the first word comes at once
        poll = await wecom.deliver(env.client, PATH, wecom.refresh(message, stream_id))
        assert poll.reply is not None
        seen = poll.reply["stream"]["content"]
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the stream life passes (WeCom would stop polling): nothing to await
    model.release()
    await env.double.wait_for(lambda: "rc-slow" in env.double.active_replies)
    assert env.double.active_replies["rc-slow"] == {"msgtype": "markdown", "markdown": {"content": " a slow one"}}
