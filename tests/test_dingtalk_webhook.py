"""`POST /dingtalk/webhook` (outgoing-robot callback): signatures, bad input, and hot failover with
the Stream connection behind one dedup."""

from __future__ import annotations

import time
from typing import Any

import orjson

from handlers.dingtalk.webhook import sign
from tests.helpers import DingTalkEnv, start


def signed(env: DingTalkEnv, ts_ms: int | None = None, secret: str | None = None) -> dict[str, str]:
    ts = str(ts_ms if ts_ms is not None else int(time.time() * 1000))
    return {
        "timestamp": ts,
        "sign": sign(ts, secret or env.double.client_secret),
        "Content-Type": "application/json",
    }


async def post(env: DingTalkEnv, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    resp = await env.client.post("/dingtalk/webhook", data=body, headers=headers)
    return resp.status, await resp.json()


async def test_good_signature_is_answered(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, mode="webhook")
    body = env.double.message("via webhook", group=True, staff_id="u1")
    status, answer = await post(env, orjson.dumps(body), signed(env))
    assert (status, answer) == (200, {"msgtype": "empty"})
    [reply] = await env.answers(1)
    assert reply["markdown"]["text"] == "@u1 echo: Alice: via webhook"  # a group turn names its speaker
    ready = await env.client.get("/readyz")
    assert ready.status == 200  # nothing to connect in webhook mode


async def test_bad_missing_and_stale_signatures_are_401(aiohttp_server: Any, gateway: Any) -> None:
    env = await start(aiohttp_server, gateway, mode="webhook")
    body = orjson.dumps(env.double.message("forged"))
    two_hours_ago = int(time.time() * 1000) - 7_200_000
    cases = {
        "bad": signed(env, secret="not the secret"),
        "missing": {"Content-Type": "application/json"},
        "stale": signed(env, ts_ms=two_hours_ago),
        "future": signed(env, ts_ms=two_hours_ago + 4 * 3_600_000),
    }
    for name, headers in cases.items():
        status, error = await post(env, body, headers)
        assert status == 401 and error["error"], name
    received = env.sample("botgate_messages_received_total", platform="dingtalk", transport="webhook", kind="dm")
    assert received == 0  # nothing got past the signature check


async def test_garbage_is_400_and_too_large_is_413(aiohttp_server: Any, gateway: Any) -> None:
    env = await start(aiohttp_server, gateway, mode="webhook")
    status, error = await post(env, b"{not json", signed(env))
    assert status == 400 and error == {"error": "body is not JSON"}
    status, error = await post(env, b'{"msgtype": "text"}', signed(env))
    assert status == 400 and error["error"].startswith("not a robot message")
    huge = orjson.dumps(env.double.message("x" * 100_000))
    status, error = await post(env, huge, signed(env))
    assert status == 413 and error["error"] == "request body too large"
    assert env.dropped("malformed") == 1


async def test_stream_and_webhook_share_one_dedup(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, mode="both")
    body = env.double.message("asked twice", msg_id="msg-both")
    frame_id = await env.double.push(body)
    await env.double.wait_for(lambda: env.double.acked(frame_id) is not None)
    status, _ = await post(env, orjson.dumps(body), signed(env))
    assert status == 200  # a duplicate is acknowledged too, or DingTalk would retry it
    await env.double.push(env.double.message("then this"))
    answers = await env.answers(2)
    assert [a["markdown"]["text"] for a in answers] == ["echo: asked twice", "echo: then this"]
