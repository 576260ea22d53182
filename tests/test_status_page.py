"""Status page: the template with an idle and a busy gateway, the live feed (server-sent events),
secrets never shown, and the in-process statistics behind it."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
from typing import Any

import aiohttp_jinja2
import orjson

from gateway.channel import ChannelState
from gateway.i18n import Locale
from gateway.stats import SAMPLES, LatencyWindow, MinuteCounter, Stats
from handlers.status import context, fmt_age
from tests.conftest import make_config
from tests.helpers import chat


def render(app: Any, snap: dict[str, Any]) -> str:
    return str(aiohttp_jinja2.get_env(app).get_template("status.html").render(context(snap, Locale.EN)))


def text_of(html: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html)
    assert match, element_id
    return match.group(1)


async def api_status(client: Any) -> dict[str, Any]:
    resp = await client.get("/api/status")
    assert resp.status == 200
    return dict(orjson.loads(await resp.read()))


async def test_template_renders_an_idle_gateway(gateway: Any) -> None:
    client = await gateway(make_config())
    html = await (await client.get("/", headers={"Accept": "text/html", "Accept-Language": "en"})).text()
    assert text_of(html, "messages-in") == "0"
    assert text_of(html, "replies-out") == "0"
    assert text_of(html, "queue-depth") == "0"
    assert text_of(html, "overhead-p99") == "—"
    assert "No admin password is set" in html and "BOTGATE_ADMIN__PASSWORD" in html
    # Platforms the config leaves off say so, and what to set.
    assert "BOTGATE_DINGTALK__CLIENT_ID" in html and "BOTGATE_FEISHU__APP_SECRET" in html
    assert "echo" in html and "no model configured" in html
    assert '<script src="/static/status.js"></script>' in html
    assert "<script>" not in html and " style=" not in html  # CSP: nothing inline


async def test_template_renders_a_busy_gateway(gateway: Any) -> None:
    client = await gateway(make_config(admin={"password": "pw-for-busy-page"}))
    app = client.server.app
    token = (await (await client.post("/login", json={"password": "pw-for-busy-page"})).json())[
        "token"
    ]
    resp = await client.get("/api/status", headers={"Authorization": f"Bearer {token}"})
    snap = copy.deepcopy(orjson.loads(await resp.read()))  # the real shape, then made busy
    snap["channels"] = [
        {
            **snap["channels"][0],
            "platform": "dingtalk",
            "state": ChannelState.CONNECTED.value,
            "ready": True,
            "transports": ["stream", "webhook"],
            "connected_since": snap["now"] - 7200,
            "reconnects": 3,
            "last_event_age": 2.5,
            "last_error": "",
        },
        {
            **snap["channels"][0],
            "platform": "feishu",
            "state": ChannelState.RECONNECTING.value,
            "ready": False,
            "reconnects": 12,
            "last_event_age": 400.0,
            "last_error": "<script>alert('x')</script> 1011 keepalive",
        },
    ]
    snap["traffic"].update(
        received_total=1_234_567,
        replies_total=1_230_000,
        failed_total=420,
        queue_depth=37,
        inflight=64,
        per_minute={
            "received": [(i * 37) % 900 for i in range(60)],
            "replied": [(i * 37) % 880 for i in range(60)],
            "failed": [i % 7 for i in range(60)],
        },
    )
    snap["latency"] = {
        "overhead": {"count": 1024, "p50": 0.0031, "p95": 0.012, "p99": 0.61},
        "model": {"count": 1024, "p50": 1.8, "p95": 6.2, "p99": 14.9},
    }
    snap["errors"] = {
        "ratio_5m": 0.031,
        "replies_5m": 4400,
        "ratio_60m": 0.004,
        "replies_60m": 52000,
    }
    snap["model"].update(
        name="deepseek-chat",
        configured=True,
        calls=50_000,
        failures=12,
        failure_streak=6,
        last_error="rate_limited",
        prompt_tokens=9_876_543,
        completion_tokens=1_234_567,
        cache_hits=300,
        cache_misses=700,
        cache_hit_rate=0.3,
    )
    snap["store"] = {"backend": "redis", "healthy": False, "error": "connection refused"}
    snap["alerts"] = {
        "sinks": ["dingtalk"],
        "active": [
            {
                "key": "model_failing",
                "title": "model failing",
                "detail": "6 model calls failed in a row",
                "since": snap["now"] - 60,
                "notified": True,
            }
        ],
    }
    snap["config"]["needs_restart"] = ["feishu.app_id", "server.port"]
    snap["admin"]["ephemeral_secret"] = True

    html = render(app, snap)
    assert text_of(html, "messages-in") == "1,234,567"
    assert text_of(html, "queue-depth") == "37" and text_of(html, "inflight") == "64"
    assert text_of(html, "error-rate") == "3.10 %"
    assert text_of(html, "overhead-p99") == "610 ms"
    assert "1.8" not in text_of(html, "overhead-p99")
    assert "&lt;script&gt;alert(" in html and "<script>alert(" not in html  # escaped
    assert '<span class="state bad">reconnecting</span>' in html
    assert '<span class="state ok">connected</span>' in html and "(stream, webhook)" in html
    assert "30.00 % hit rate" in html and "6 in a row, last: rate_limited" in html
    assert "unavailable" in html and "connection refused" in html
    assert "Alert: <strong>model failing</strong>" in html
    assert "need a restart to take effect: feishu.app_id, server.port" in html
    assert "logins last only until the next restart" in html
    assert "log out" in html
    received, replied, failed = re.findall(r'<polyline points="([^"]+)" class="line', html)
    assert len(received.split()) == len(replied.split()) == len(failed.split()) == 60
    assert "(peak 888/min)" in html
    assert "No admin password is set" not in html


async def test_secrets_never_reach_the_page_or_the_api(gateway: Any) -> None:
    secrets: dict[str, dict[str, Any]] = {
        "model": {"api_keys": ["sk-live-abcdef123456"], "base_url": "http://127.0.0.1:9/v1"},
        "admin": {
            "password": "hunter2-but-longer",
            "jwt_secret": "jwt-secret-value-xyz-of-32-bytes-min",
            "metrics_token": "mt-0987654321",
        },
        "alerts": {
            "dingtalk_webhook": "https://oapi.dingtalk.com/robot/send?access_token=tok-secret-42",
            "dingtalk_secret": "SEC-signing-secret",
        },
    }
    client = await gateway(make_config(**secrets))
    token = (await (await client.post("/login", json={"password": "hunter2-but-longer"})).json())[
        "token"
    ]
    auth = {"Authorization": f"Bearer {token}"}
    page = await (await client.get("/", headers=auth)).text()
    api = await (await client.get("/api/status", headers=auth)).text()
    for value in (
        "sk-live-abcdef123456",
        "hunter2-but-longer",
        "jwt-secret-value-xyz",
        "mt-0987654321",
        "tok-secret-42",
        "SEC-signing-secret",
    ):
        assert value not in page and value not in api
    assert orjson.loads(api)["config"]["settings"]["model"]["api_keys"] == "***"
    assert orjson.loads(api)["config"]["settings"]["model"]["base_url"] == "http://127.0.0.1:9/v1"


async def read_event(stream: Any) -> dict[str, Any]:
    """The next `status` event of a server-sent-event stream."""
    event, data = "", b""
    async with asyncio.timeout(10):
        while True:
            line = (await stream.readline()).rstrip(b"\n")
            if line.startswith(b"event: "):
                event = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
            elif not line and event == "status":
                return dict(orjson.loads(data))


async def test_live_feed_pushes_a_new_page_body_on_traffic(gateway: Any) -> None:
    client = await gateway(make_config())
    async with client.get("/status/events") as events:
        assert events.headers["Content-Type"] == "text/event-stream"
        first = await read_event(events.content)
        assert text_of(first["html"], "messages-in") == "0"
        async with client.ws_connect("/chat/ws?session=feedsession1") as ws:
            await ws.receive()
            await chat(client, ws, "anyone there?", "m1")
        # The feed pushes a body at least every few seconds for as long as it is open, so the wait
        # for the count is bounded, or a counter that never reaches 1 would read pushes forever.
        latest, shown = first, []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while text_of(latest["html"], "messages-in") != "1":
                    latest = await read_event(events.content)
                    shown.append(text_of(latest["html"], "messages-in"))
        assert text_of(latest["html"], "messages-in") == "1", f"messages-in pushed in 10 s after one message: {shown}"
        assert text_of(latest["html"], "replies-out") == "1"
        assert latest["at"] > first["at"]


async def test_live_feed_ends_on_shutdown(gateway: Any) -> None:
    client = await gateway(make_config())
    async with client.get("/status/events") as events:
        await read_event(events.content)
        await client.server.app.shutdown()  # what a SIGTERM does first
        async with asyncio.timeout(10):
            while await events.content.readline():
                pass  # drained to EOF: the server ended the stream itself


def test_minute_counter_keeps_exactly_the_last_hour() -> None:
    counter = MinuteCounter()
    t0 = 1_800_000_000.0 - 1_800_000_000.0 % 60
    counter.add(t0, 5)
    counter.add(t0 + 59, 1)
    counter.add(t0 + 60, 2)
    assert counter.series(t0 + 60)[-2:] == [6, 2]
    assert counter.recent(t0 + 60, 2) == 8
    # 59 minutes later the first minute is the oldest still shown; a minute after, it is gone.
    assert counter.series(t0 + 59 * 60)[0] == 6
    assert counter.series(t0 + 60 * 60)[0] == 2
    counter.add(t0 + 60 * 60, 1)  # reuses the ring slot of the expired minute
    assert sum(counter.series(t0 + 60 * 60)) == 3
    assert len(counter.series(t0)) == 60


def test_latency_percentiles_are_bounded_and_recent() -> None:
    window = LatencyWindow()
    for i in range(1, 101):
        window.observe(1000.0, i / 1000)
    p = window.percentiles(1000.0)
    assert (p.count, p.p50, p.p95, p.p99) == (100, 0.05, 0.095, 0.099)
    assert window.percentiles(1000.0 + 3601).count == 0  # an hour later, nothing recent
    for _ in range(SAMPLES * 3):
        window.observe(2000.0, 1.0)
    assert window.percentiles(2000.0).count == SAMPLES


def test_stats_error_ratio_and_streaks() -> None:
    now = [1_800_000_000.0]
    stats = Stats(lambda: now[0])
    assert stats.error_ratio(5) == (None, 0)
    for failed in (False, False, False, True):
        stats.reply(failed)
    assert stats.error_ratio(5) == (0.25, 4)
    now[0] += 5 * 60
    assert stats.error_ratio(5) == (None, 0)
    assert stats.error_ratio(60) == (0.25, 4)
    stats.model_call(1.0, "timeout")
    stats.model_call(1.0, "auth")
    assert (stats.model_failure_streak, stats.last_model_error) == (2, "auth")
    stats.model_call(1.0, None)
    assert (stats.model_calls, stats.model_failures, stats.model_failure_streak) == (3, 2, 0)


def test_ages_show_at_most_two_units_and_a_dash_when_unknown() -> None:
    assert [fmt_age(s) for s in (None, 4.9, 61, 3600 * 2 + 60 * 5, 86400 * 3 + 3600)] == [
        "—",
        "4 s",
        "1 min 1 s",
        "2 h 5 min",
        "3 d 1 h",
    ]


async def test_live_feed_ends_with_the_login(gateway: Any) -> None:
    client = await gateway(make_config(admin={"password": "short-lived-pw", "token_ttl": 1.0}))
    login = await client.post("/login", json={"password": "short-lived-pw"})
    bearer = {"Authorization": f"Bearer {(await login.json())['token']}"}
    async with client.get("/status/events", headers=bearer) as events:
        assert (await read_event(events.content))["html"]
        async with asyncio.timeout(10):
            while await events.content.readline():
                pass  # the server ended the stream when the token expired
    again = await client.get("/status/events", headers=bearer)
    assert again.status == 401 and (await again.json())["error"] == "token expired"
