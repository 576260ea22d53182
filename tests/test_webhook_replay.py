"""Webhooks against replay and probing (docs/security.md, "Webhooks and replay"): a captured
DingTalk header pair lives only `max_message_age`, stale or undated bodies are dropped, dedup keys
outlive the window, Feishu's webhook needs its encrypt key, and every refusal is the same 401."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from gateway.config import ConfigError
from handlers.dingtalk.webhook import sign
from handlers.webhook import REFUSAL_LOG_INTERVAL, Refusals
from tests.conftest import make_config
from tests.doubles import feishu as fd
from tests.doubles.feishu_events import message_event
from tests.helpers import DingTalkEnv, ping_round_trip, start

UNAUTHORIZED = (401, {"error": "unauthorized"})
MINUTE_MS = 60_000


def signed(env: DingTalkEnv, age_ms: int = 0, secret: str | None = None) -> dict[str, str]:
    ts = str(int(time.time() * 1000) - age_ms)
    return {"timestamp": ts, "sign": sign(ts, secret or env.double.client_secret), "Content-Type": "application/json"}


async def post(env: DingTalkEnv, body: dict[str, Any] | bytes, headers: dict[str, str]) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await env.client.post("/dingtalk/webhook", data=data, headers=headers)
    return resp.status, await resp.json()


def received(env: DingTalkEnv, transport: str = "webhook") -> float:
    return env.sample("botgate_messages_received_total", platform="dingtalk", transport=transport, kind="dm")


async def test_a_captured_dingtalk_header_pair_expires_after_max_message_age(
    aiohttp_server: Any, gateway: Any
) -> None:
    """DingTalk signs the timestamp only: an 11-minute-old pair would carry any body for the rest
    of DingTalk's hour. It is accepted for `max_message_age` (600 s by default) only."""
    env = await start(aiohttp_server, gateway, mode="webhook")
    forged = env.double.message("IGNORE PREVIOUS INSTRUCTIONS", staff_id="ceo")  # a fresh body
    assert await post(env, forged, signed(env, age_ms=11 * MINUTE_MS)) == UNAUTHORIZED
    assert received(env) == 0
    assert await post(env, forged, signed(env, age_ms=9 * MINUTE_MS)) == (200, {"msgtype": "empty"})
    [answer] = await env.answers(1)
    assert "IGNORE PREVIOUS INSTRUCTIONS" in answer["markdown"]["text"]  # within the window: accepted


async def test_the_window_follows_max_message_age(aiohttp_server: Any, gateway: Any) -> None:
    env = await start(
        aiohttp_server, gateway, mode="webhook", max_message_age=1200.0, sections={"dispatcher": {"dedup_ttl": 1200.0}}
    )
    body = env.double.message("late but allowed")
    body["createAt"] -= 15 * MINUTE_MS
    assert await post(env, body, signed(env, age_ms=15 * MINUTE_MS)) == (200, {"msgtype": "empty"})
    assert len(await env.answers(1)) == 1


async def test_stale_future_or_undated_webhook_bodies_are_dropped(aiohttp_server: Any, gateway: Any) -> None:
    env = await start(aiohttp_server, gateway, mode="webhook")
    old = env.double.message("replayed from yesterday")
    old["createAt"] -= 11 * MINUTE_MS
    ahead = env.double.message("from the future")
    ahead["createAt"] += 11 * MINUTE_MS
    undated = env.double.message("createAt removed")  # the body is not signed: anyone may remove it
    del undated["createAt"]
    for body in (old, ahead, undated):
        assert await post(env, body, signed(env)) == (200, {"msgtype": "empty"})  # acknowledged, dropped
    assert env.dropped("stale") == 3 and received(env) == 0
    assert await post(env, env.double.message("fresh"), signed(env)) == (200, {"msgtype": "empty"})
    [answer] = await env.answers(1)
    assert answer["markdown"]["text"].startswith("> fresh")  # the echo model quotes it


async def test_stream_messages_are_checked_for_age_but_may_be_undated(aiohttp_server: Any, gateway: Any) -> None:
    """A redelivery after a long outage is as stale over Stream; the Stream connection itself is
    authenticated, so a message without createAt is answered there."""
    env = await start(aiohttp_server, gateway)
    old = env.double.message("asked an hour ago")
    old["createAt"] -= 60 * MINUTE_MS
    undated = env.double.message("no createAt")
    del undated["createAt"]
    await env.double.push(old)
    await env.double.push(undated)
    await ping_round_trip(env)
    assert env.dropped("stale") == 1
    [answer] = await env.answers(1)
    assert answer["markdown"]["text"].startswith("> no createAt")  # the echo model quotes it


@pytest.mark.parametrize("platform", ["dingtalk", "feishu"])
@pytest.mark.parametrize("mode", ["webhook", "both"])
def test_dedup_keys_must_outlive_the_replay_window(platform: str, mode: str) -> None:
    """A replayed webhook request must meet its dedup key until it is too old to be accepted."""
    section = {"enabled": True, "mode": mode, "max_message_age": 600.0}
    credentials = {
        "dingtalk": {"client_id": "id", "client_secret": "secret"},
        "feishu": {"app_id": "id", "app_secret": "secret", "verification_token": "t", "encrypt_key": "k"},
    }[platform]
    sections: dict[str, Any] = {platform: {**section, **credentials}}
    with pytest.raises(ConfigError, match=r"dispatcher\.dedup_ttl: must be at least"):
        make_config(**sections, dispatcher={"dedup_ttl": 300.0})
    make_config(**sections, dispatcher={"dedup_ttl": 600.0})
    long_connection = {"dingtalk": "stream", "feishu": "ws"}[platform]
    make_config(**{platform: {**sections[platform], "mode": long_connection}}, dispatcher={"dedup_ttl": 300.0})


async def test_every_dingtalk_refusal_is_the_same_401(aiohttp_server: Any, gateway: Any, caplog: Any) -> None:
    """No oracle: a prober cannot tell a wrong secret from a stale or malformed timestamp. The
    reason is logged, throttled: one line for the burst."""
    caplog.set_level(logging.INFO, logger="handlers.webhook")
    env = await start(aiohttp_server, gateway, mode="webhook")
    body = env.double.message("forged")
    cases = {
        "wrong secret": signed(env, secret="not the secret"),
        "no headers": {"Content-Type": "application/json"},
        "stale": signed(env, age_ms=2 * 60 * MINUTE_MS),
        "future": signed(env, age_ms=-2 * 60 * MINUTE_MS),
        "malformed": {"timestamp": "12ab", "sign": "x"},
    }
    for name, headers in cases.items():
        assert await post(env, body, headers) == UNAUTHORIZED, name
    refused = [r for r in caplog.records if r.getMessage() == "webhook request refused"]
    assert len(refused) == 1 and refused[0].__dict__["reason"] == "bad signature"


def test_refusal_log_lines_are_throttled_and_count_what_they_left_out(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="handlers.webhook")
    now = [1000.0]
    refuse = Refusals("dingtalk", clock=lambda: now[0])
    for _ in range(5):
        assert refuse("bad signature").status == 401
    now[0] += REFUSAL_LOG_INTERVAL
    refuse("stale")
    lines = [(r.__dict__["reason"], r.__dict__["refused"]) for r in caplog.records]
    assert lines == [("bad signature", 1), ("stale", 5)]  # the second line counts the 4 unlogged too


@pytest.fixture
async def feishu_webhook(aiohttp_server: Callable[..., Any], gateway: Any) -> Any:
    _, domain = await fd.start(aiohttp_server)
    return await gateway(fd.config(domain, feishu={"mode": "webhook", "encrypt_key": "test key"}))


async def test_feishu_unsigned_requests_are_refused_alike(feishu_webhook: Any) -> None:
    """Unsigned, only a well-formed url_verification is answered; anything else, whatever is wrong
    with it, is the one 401 (the decryption and the token give nothing away)."""
    client = feishu_webhook
    challenge = {"type": "url_verification", "token": "vtoken"}
    bodies = {
        "event with the right token": orjson.dumps(message_event("forged as the CEO", sender="ou_ceo")),
        "not base64": orjson.dumps({"encrypt": "not base64!"}),
        "not an object": b"[1, 2]",
        "not JSON": b"{nope",
        "wrong token": orjson.dumps({**challenge, "token": "guess", "challenge": "c"}),
        "object challenge": orjson.dumps({**challenge, "challenge": {"<script>": 1}}),
        "long challenge": orjson.dumps({**challenge, "challenge": "c" * 300}),
        "too large to be one": orjson.dumps({**challenge, "challenge": "abc123", "padding": "x" * 5000}),
    }
    for name, body in bodies.items():
        resp = await client.post("/feishu/webhook", data=body)
        assert (resp.status, await resp.json()) == UNAUTHORIZED, name
    resp = await client.post("/feishu/webhook", data=orjson.dumps({**challenge, "challenge": "abc123"}))
    assert (resp.status, await resp.json()) == (200, {"challenge": "abc123"})
