"""Web chat end to end over a real websocket, through the dispatcher to the model."""

from __future__ import annotations

from typing import Any

import orjson

from tests.conftest import make_config
from tests.helpers import chat


async def test_echo_reply_without_model(gateway: Any) -> None:
    client = await gateway(make_config())
    async with client.ws_connect("/chat/ws?session=testsession1") as ws:
        hello = orjson.loads((await ws.receive()).data)
        assert hello == {"type": "hello", "session": "testsession1"}
        frames = await chat(client, ws, "hello there", "m1")
    assert frames[0] == {"type": "accepted", "id": "testsession1:m1"}
    assert frames[-1]["type"] == "done"
    assert "> hello there" in frames[-1]["text"]
    assert "no model is configured" in frames[-1]["text"]


async def test_streamed_answer_from_openai_compatible_server(gateway: Any, openai_double: Any) -> None:
    double, url = openai_double
    client = await gateway(make_config(model={"base_url": url, "api_keys": ["k1"]}))
    async with client.ws_connect("/chat/ws?session=testsession2") as ws:
        await ws.receive()
        frames = await chat(client, ws, "one two three four", "m1")
    deltas = [f["text"] for f in frames if f["type"] == "delta"]
    assert len(deltas) >= 3, deltas  # streamed word by word, not one blob
    assert "".join(deltas) == "echo: one two three four"
    assert frames[-1] == {"type": "done", "text": "echo: one two three four", "reply_to": "testsession2:m1"}
    assert double.auth_headers == ["Bearer k1"]


async def test_context_kept_and_reset(gateway: Any, openai_double: Any) -> None:
    double, url = openai_double
    client = await gateway(make_config(model={"base_url": url}, cache={"enabled": False}))
    async with client.ws_connect("/chat/ws?session=testsession3") as ws:
        await ws.receive()
        await chat(client, ws, "first", "a")
        await chat(client, ws, "second", "b")
        assert [m["content"] for m in double.requests[-1]["messages"][1:]] == [
            "first", "echo: first", "second"
        ]
        frames = await chat(client, ws, "/reset", "c")
        assert frames[-1]["type"] == "notice" and "forgot" in frames[-1]["text"]
        await chat(client, ws, "third", "d")
    assert [m["content"] for m in double.requests[-1]["messages"][1:]] == ["third"]


async def test_bad_frames_get_clear_errors(gateway: Any) -> None:
    client = await gateway(make_config())
    async with client.ws_connect("/chat/ws?session=testsession4") as ws:
        await ws.receive()
        await ws.send_str("{nope")
        assert orjson.loads((await ws.receive()).data) == {"type": "error", "error": "malformed JSON"}
        await ws.send_str('{"type": "message", "text": ""}')
        err = orjson.loads((await ws.receive()).data)
        assert err["error"] == "text must be a non-empty string"
        # The connection still works after bad input.
        frames = await chat(None, ws, "still here?", "ok")
    assert frames[-1]["type"] == "done"
