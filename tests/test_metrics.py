"""Prometheus /metrics: every family the dashboards rely on is there and moves with real traffic
(web chat over a websocket, a real model client against local doubles); label sets stay bounded
no matter how many users talk to the bot."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import DISPATCHER, METRICS
from tests.conftest import make_config
from tests.test_webchat import chat

FAMILIES = {
    "botgate_messages_received": ("counter", {"platform", "transport", "kind"}),
    "botgate_replies": ("counter", {"platform", "outcome"}),
    "botgate_model_request_duration_seconds": ("histogram", set()),
    "botgate_model_errors": ("counter", {"reason"}),
    "botgate_gateway_overhead_seconds": ("histogram", set()),
    "botgate_queue_depth": ("gauge", set()),
    "botgate_inflight": ("gauge", set()),
    "botgate_channel_connected": ("gauge", {"platform"}),
    "botgate_reconnects": ("counter", {"platform"}),
    "botgate_dedup_dropped": ("counter", {"platform"}),
    "botgate_cache_requests": ("counter", {"result"}),
    "botgate_platform_api_calls": ("counter", {"platform", "endpoint"}),
    "botgate_http_requests": ("counter", {"route", "status"}),
}
Sample = tuple[str, frozenset[tuple[str, str]]]


async def scrape(client: Any) -> tuple[dict[str, Any], dict[Sample, float]]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    samples = {
        (s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples
    }
    return families, samples


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_every_family_is_exposed_with_its_labels(gateway: Any) -> None:
    client = await gateway(make_config())
    families, samples = await scrape(client)
    for name, (kind, labels) in FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
        assert families[name].documentation, name
    # Label names, from HELP/TYPE-only families too: read them off the registry's descriptions.
    registry = client.server.app[METRICS].registry
    for metric in registry.collect():
        if metric.name in FAMILIES:
            for sample in metric.samples:
                assert set(sample.labels) - {"le"} == FAMILIES[metric.name][1], metric.name
    # Running channels start at 0 so rate() works from the first scrape.
    assert value(samples, "botgate_channel_connected", platform="web") == 1
    assert ("botgate_reconnects_total", frozenset({("platform", "web")})) in samples
    assert ("botgate_dedup_dropped_total", frozenset({("platform", "web")})) in samples
    # Process metrics for the CPU alert.
    assert "process_cpu_seconds" in families and value(samples, "process_cpu_seconds_total") > 0


class GatedModel:
    """An OpenAI-compatible endpoint that answers only when the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        return app

    async def completions(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrived.set()
        await self.gate.wait()
        return web.json_response(
            {
                "model": "gated",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            }
        )


async def test_families_move_with_traffic(
    gateway: Any, openai_double: Any, aiohttp_server: Callable[..., Any]
) -> None:
    _, model_url = openai_double
    client = await gateway(make_config(model={"base_url": model_url, "max_retries": 0}))
    _, before = await scrape(client)

    async with client.ws_connect("/chat/ws?session=metricsuser1") as ws:
        await ws.receive()
        await chat(client, ws, "what is the answer", "a")
        await chat(client, ws, "status:500 please fail", "b")
        await ws.send_str(orjson.dumps({"type": "message", "id": "a", "text": "again"}).decode())
        assert (await ws.receive_json()) == {"type": "duplicate", "id": "metricsuser1:a"}
    async with client.ws_connect("/chat/ws?session=metricsuser2") as ws:
        await ws.receive()
        await chat(client, ws, "what is the answer", "a")  # same prompt, fresh context: cache hit
    await client.get("/no/such/page")

    _, after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("botgate_messages_received_total", platform="web", transport="websocket", kind="dm") == 3
    assert moved("botgate_replies_total", platform="web", outcome="ok") == 2
    assert moved("botgate_replies_total", platform="web", outcome="model_error") == 1
    assert moved("botgate_model_request_duration_seconds_count") == 2  # the cache hit made no call
    assert moved("botgate_model_errors_total", reason="server_error") == 1
    assert moved("botgate_model_tokens_total", type="prompt") > 0
    assert moved("botgate_gateway_overhead_seconds_count") == 2
    assert moved("botgate_dedup_dropped_total", platform="web") == 1
    assert moved("botgate_cache_requests_total", result="miss") == 2  # the answer and the failure
    assert moved("botgate_cache_requests_total", result="hit") == 1
    assert moved("botgate_http_requests_total", route="/chat/ws", status="101") == 2
    assert moved("botgate_http_requests_total", route="unmatched", status="404") == 1
    assert moved("botgate_http_requests_total", route="/metrics", status="200") == 1

    # Queue depth and in-flight, caught while a slow model holds the only worker slot.
    gated = GatedModel()
    server = await aiohttp_server(gated.app())
    slow = await gateway(
        make_config(model={"base_url": str(server.make_url("/v1")), "stream": False},
                    dispatcher={"max_concurrency": 1})
    )
    async with slow.ws_connect("/chat/ws?session=queueuser1") as ws1, slow.ws_connect(
        "/chat/ws?session=queueuser2"
    ) as ws2:
        await ws1.receive()
        await ws2.receive()
        await ws1.send_str(orjson.dumps({"type": "message", "id": "1", "text": "first"}).decode())
        await ws1.receive_json()  # accepted
        await gated.arrived.wait()
        await ws2.send_str(orjson.dumps({"type": "message", "id": "2", "text": "second"}).decode())
        await ws2.receive_json()  # accepted, waiting for the slot
        _, busy = await scrape(slow)
        assert value(busy, "botgate_inflight") == 1
        assert value(busy, "botgate_queue_depth") == 1
        gated.gate.set()
        await slow.server.app[DISPATCHER].wait_idle()
    _, idle = await scrape(slow)
    assert value(idle, "botgate_inflight") == 0 and value(idle, "botgate_queue_depth") == 0


async def test_label_cardinality_does_not_grow_with_users(gateway: Any) -> None:
    client = await gateway(make_config())

    async def user(n: int) -> None:
        session = f"cardinality-user-{n:05d}"
        async with client.ws_connect(f"/chat/ws?session={session}") as ws:
            await ws.receive()
            frames = await chat(client, ws, f"hello from user {n}", "m")
            assert frames[-1]["type"] == "done"

    async def users(first: int, last: int) -> None:
        for start in range(first, last, 50):
            await asyncio.gather(*(user(n) for n in range(start, min(start + 50, last))))

    await users(0, 10)
    for n in range(10):
        await client.get(f"/random/path/{n}")
    await scrape(client)  # so the scrape's own request is counted in `warm` too
    _, warm = await scrape(client)
    await users(10, 1000)
    for n in range(10, 1000):
        await client.get(f"/random/path/{n}")
    resp = await client.get("/metrics")
    text = await resp.text()
    _, after = await scrape(client)

    botgate = lambda samples: {k for k in samples if k[0].startswith("botgate_")}  # noqa: E731
    assert botgate(after) == botgate(warm)  # the same series, only their values moved
    assert len(botgate(after)) < 100
    assert "cardinality-user" not in text and "/random/path" not in text
    assert value(after, "botgate_messages_received_total", platform="web", transport="websocket", kind="dm") == 1000
    assert value(after, "botgate_http_requests_total", route="unmatched", status="404") == 1000
