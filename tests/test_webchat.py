"""Web chat end to end over a real websocket, through the dispatcher to the model."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from gateway.i18n import translator
from gateway.keys import DISPATCHER
from gateway.logs import JsonFormatter
from gateway.steps import RATE_LIMITED, RESET_DONE
from tests.conftest import make_config
from tests.helpers import chat, hello


async def test_echo_reply_without_model(gateway: Any) -> None:
    client = await gateway(make_config())
    async with client.ws_connect("/chat/ws") as ws:
        _, conversation = await hello(ws)
        frames = await chat(client, ws, "hello there", "m1")
    assert frames[0] == {"type": "accepted", "id": f"{conversation}:m1"}
    assert frames[-1]["type"] == "done"
    assert "> hello there" in frames[-1]["text"]
    assert "尚未配置模型" in frames[-1]["text"]  # a browser naming no language: Chinese


async def test_streamed_answer_from_openai_compatible_server(gateway: Any, openai_double: Any) -> None:
    double, url = openai_double
    client = await gateway(make_config(model={"base_url": url, "api_keys": ["k1"]}))
    async with client.ws_connect("/chat/ws") as ws:
        _, conversation = await hello(ws)
        frames = await chat(client, ws, "one two three four", "m1")
    deltas = [f["text"] for f in frames if f["type"] == "delta"]
    assert len(deltas) >= 3, deltas  # streamed word by word, not one blob
    assert "".join(deltas) == "echo: one two three four"
    assert frames[-1] == {"type": "done", "text": "echo: one two three four", "reply_to": f"{conversation}:m1"}
    assert double.auth_headers == ["Bearer k1"]


async def test_context_kept_and_reset(gateway: Any, openai_double: Any) -> None:
    double, url = openai_double
    client = await gateway(make_config(model={"base_url": url}, cache={"enabled": False}))
    async with client.ws_connect("/chat/ws") as ws:
        session, _ = await hello(ws)
        await chat(client, ws, "first", "a")
    async with client.ws_connect("/chat/ws", params={"session": session}) as ws:  # a reload of the page
        assert (await hello(ws))[0] == session
        await chat(client, ws, "second", "b")
        assert [m["content"] for m in double.requests[-1]["messages"][1:]] == [
            "first", "echo: first", "second"
        ]
        frames = await chat(client, ws, "/reset", "c")
        assert frames[-1]["type"] == "notice" and frames[-1]["text"] == translator("zh-CN")(RESET_DONE)
        await chat(client, ws, "third", "d")
    assert [m["content"] for m in double.requests[-1]["messages"][1:]] == ["third"]


async def test_bad_frames_get_clear_errors(gateway: Any) -> None:
    client = await gateway(make_config())
    async with client.ws_connect("/chat/ws") as ws:  # no Accept-Language: Chinese
        await hello(ws)
        await ws.send_str("{nope")
        assert orjson.loads((await ws.receive()).data) == {"type": "error", "error": "JSON 格式有误"}
    async with client.ws_connect("/chat/ws", headers={"Accept-Language": "en-GB,en;q=0.8"}) as ws:
        await hello(ws)
        await ws.send_str("{nope")
        assert orjson.loads((await ws.receive()).data) == {"type": "error", "error": "malformed JSON"}
        await ws.send_str('{"type": "message", "text": ""}')
        err = orjson.loads((await ws.receive()).data)
        assert err["error"] == "text must be a non-empty string"
        # The connection still works after bad input.
        frames = await chat(None, ws, "still here?", "ok")
    assert frames[-1]["type"] == "done"


async def test_a_session_is_issued_by_the_server_never_chosen_by_the_client(gateway: Any) -> None:
    """A client-chosen or forged session is not honoured: it gets a fresh one of its own, so a
    second socket cannot join (and read) someone else's conversation by naming it."""
    client = await gateway(make_config())
    async with client.ws_connect("/chat/ws?session=victimsession1") as ws:
        session, conversation = await hello(ws)
        assert conversation != "victimsession1" and session.startswith(f"{conversation}.")
        await chat(client, ws, "my private question", "m1")
    forged = f"{conversation}.{'A' * 22}"  # the conversation id is in the logs; the mac is not
    async with client.ws_connect("/chat/ws", params={"session": forged}) as spy:
        _, other = await hello(spy)
        frames = await chat(client, spy, "what did I ask?", "m2")
    assert other != conversation and frames[-1]["reply_to"] == f"{other}:m2"
    async with client.ws_connect("/chat/ws", params={"session": session}) as ws:  # the owner comes back
        assert await hello(ws) == (session, conversation)


async def test_the_session_value_is_never_logged_in_full(gateway: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    client = await gateway(make_config())
    async with client.ws_connect("/chat/ws") as ws:
        session, conversation = await hello(ws)
        await chat(client, ws, "hello", "m1")
    await client.app[DISPATCHER].wait_idle()
    lines = [JsonFormatter().format(record) for record in caplog.records]
    assert any(conversation in line for line in lines)  # the id names the conversation in the logs
    mac = session.partition(".")[2]
    assert not [line for line in lines if mac in line]


async def test_new_sessions_do_not_bypass_the_rate_limit(gateway: Any, openai_double: Any) -> None:
    """The per-user limit counts the client, not its sessions: a fresh session per message gains
    nothing."""
    double, url = openai_double
    client = await gateway(make_config(model={"base_url": url}, limits={"per_user_per_minute": 2}))
    finals = []
    for n in range(3):
        async with client.ws_connect("/chat/ws") as ws:
            await hello(ws)
            finals.append((await chat(client, ws, f"question {n}", "m"))[-1])
    assert [f["type"] for f in finals] == ["done", "done", "notice"]
    assert finals[-1]["text"] == translator("zh-CN")(RATE_LIMITED)
    assert len(double.requests) == 2
