"""Prometheus /metrics: every family the dashboards rely on is there and moves with real traffic
(web chat over a websocket, a real model client against local doubles); label sets stay bounded
no matter how many users talk to the bot."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

import handlers
from gateway.admission import Admission
from gateway.app import create_app
from gateway.budget import ApiBudget
from gateway.channel import ChannelState, ChannelStatus, StatusTracker
from gateway.connection import ConnectionLoop
from gateway.keys import AUTH, CHANNELS, DISPATCHER, METRICS
from gateway.messages import Attachment, ConversationKind, InboundMessage, Reply
from gateway.tasks import stop_task
from tests.conftest import make_config
from tests.helpers import chat, hello

FAMILIES = {
    "botgate_schedule_runs": ("counter", {"schedule", "result"}),
    "botgate_outbox_messages": ("counter", {"platform", "state"}),
    "botgate_messages_received": ("counter", {"platform", "transport", "kind"}),
    "botgate_replies": ("counter", {"platform", "outcome"}),
    "botgate_model_request_duration_seconds": ("histogram", set()),
    "botgate_model_errors": ("counter", {"reason"}),
    "botgate_gateway_overhead_seconds": ("histogram", set()),
    "botgate_queue_depth": ("gauge", set()),
    "botgate_inflight": ("gauge", set()),
    "botgate_channel_connected": ("gauge", {"platform", "bot"}),
    "botgate_reconnects": ("counter", {"platform"}),
    "botgate_send_retries": ("counter", {"platform"}),
    "botgate_dedup_dropped": ("counter", {"platform"}),
    "botgate_cache_requests": ("counter", {"result"}),
    "botgate_platform_api_calls": ("counter", {"platform", "endpoint"}),
    "botgate_platform_throttled": ("counter", {"platform", "endpoint"}),
    "botgate_platform_api_calls_per_answer": ("histogram", {"platform"}),
    "botgate_platform_api_budget_used": ("gauge", {"platform", "bot"}),
    "botgate_platform_api_budget_ratio": ("gauge", {"platform", "bot"}),
    "botgate_platform_api_quota_spent": ("gauge", {"platform", "bot"}),
    "botgate_http_requests": ("counter", {"route", "status"}),
    "botgate_http_request_duration_seconds": ("histogram", {"route"}),
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
    for name, (kind, _) in FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
        assert families[name].documentation, name
    # Every sample carries exactly the documented label names (histograms add `le`).
    registry = client.server.app[METRICS].registry
    for metric in registry.collect():
        if metric.name in FAMILIES:
            for sample in metric.samples:
                assert set(sample.labels) - {"le"} == FAMILIES[metric.name][1], metric.name
    # Running channels start at 0 so rate() works from the first scrape.
    assert value(samples, "botgate_channel_connected", platform="web", bot="default") == 1
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

    async with client.ws_connect("/chat/ws") as ws:
        session, conversation = await hello(ws)
        await chat(client, ws, "what is the answer", "a")
        await chat(client, ws, "status:500 please fail", "b")
        await ws.send_str(orjson.dumps({"type": "message", "id": "a", "text": "again"}).decode())
        assert (await ws.receive_json()) == {"type": "duplicate", "id": f"{conversation}:a"}
    async with client.ws_connect("/chat/ws", params={"session": session}) as ws:
        await ws.receive()
        await chat(client, ws, "/reset", "r")
        await chat(client, ws, "what is the answer", "c")  # same prompt, same (empty) context: cache hit
    await client.get("/no/such/page")

    _, after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert (
        moved("botgate_messages_received_total", platform="web", transport="websocket", kind="dm")
        == 4
    )
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
        make_config(
            model={"base_url": str(server.make_url("/v1")), "stream": False},
            dispatcher={"max_concurrency": 1},
        )
    )
    async with (
        slow.ws_connect("/chat/ws?session=queueuser1") as ws1,
        slow.ws_connect("/chat/ws?session=queueuser2") as ws2,
    ):
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
    # A thousand users, all from this test's one address: the per-user limit would count them as one.
    client = await gateway(make_config(limits={"per_user_per_minute": 0}))

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

    def botgate(samples: dict[Sample, float]) -> set[Sample]:
        return {k for k in samples if k[0].startswith("botgate_")}

    assert botgate(after) == botgate(warm)  # the same series, only their values moved
    assert len(botgate(after)) < 150  # 14 of them per route for the HTTP duration histogram
    assert "cardinality-user" not in text and "/random/path" not in text
    timed = {dict(labels)["route"] for name, labels in after if name.startswith("botgate_http_request_duration")}
    assert timed == {"/chat/ws", "/metrics", "unmatched"}  # route templates, never paths
    assert (
        value(
            after,
            "botgate_messages_received_total",
            platform="web",
            transport="websocket",
            kind="dm",
        )
        == 1000
    )
    assert value(after, "botgate_http_requests_total", route="unmatched", status="404") == 1000


class FrameServer:
    """A long-connection server double: accepts websockets; the test can drop the current one."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[web.WebSocketResponse] = asyncio.Queue()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.accept)
        return app

    async def accept(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hello")
        self.connections.put_nowait(ws)
        async for _ in ws:
            pass
        return ws


class LoopChannel:
    """The smallest adapter built from the shared core pieces (ConnectionLoop, ApiBudget), the way
    the DingTalk and Feishu adapters are: its metrics are the ones those adapters produce."""

    platform = "loopy"

    def __init__(self, url: str, metrics: Any) -> None:
        self.url = url
        self.tracker = StatusTracker(
            ChannelStatus(self.platform, ChannelState.CONNECTING, transports=("ws",))
        )
        self.budget = ApiBudget(self.platform, 0, metrics)
        self.loop = ConnectionLoop(self.platform, self.tracker, metrics, self._session)
        self.sent: asyncio.Queue[Reply] = asyncio.Queue()

    async def _session(self, connected: Callable[[], None]) -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(self.url) as ws:
            connected()
            async for _ in ws:
                self.tracker.event_seen()

    def status(self) -> ChannelStatus:
        return self.tracker.snapshot()

    async def send(self, reply: Reply) -> None:
        self.budget.record("messages/send")
        self.sent.put_nowait(reply)

    async def open_stream(self, message: InboundMessage) -> None:
        return None

    async def fetch(self, message: InboundMessage, attachment: Attachment) -> tuple[bytes, str]:
        raise NotImplementedError

    async def reconnect(self) -> None:
        self.loop.reconnect()


async def test_channel_families_move_with_a_long_connection(
    aiohttp_server: Callable[..., Any], aiohttp_client: Callable[..., Any]
) -> None:
    frames = FrameServer()
    server = await aiohttp_server(frames.app())

    def setup_loopy(app: web.Application) -> None:
        channel = LoopChannel(str(server.make_url("/ws")), app[METRICS])
        app[CHANNELS][f"{channel.platform}/default"] = channel

        async def run(app: web.Application) -> Any:
            task = asyncio.create_task(channel.loop.run())
            yield
            await stop_task(task)

        app.cleanup_ctx.append(run)

    app = create_app(make_config(), [handlers.setup, setup_loopy])
    admin = {"Authorization": f"Bearer {app[AUTH].login_token.current()}"}  # no password: the login token
    client = await aiohttp_client(TestServer(app, host="127.0.0.1"), headers=admin)
    channel = app[CHANNELS]["loopy/default"]
    assert isinstance(channel, LoopChannel)

    first = await frames.connections.get()
    await channel.loop.connected_event.wait()
    _, samples = await scrape(client)
    assert value(samples, "botgate_channel_connected", platform="loopy", bot="default") == 1
    assert value(samples, "botgate_reconnects_total", platform="loopy") == 0

    await first.close()  # the server drops us: the loop reconnects at once
    await frames.connections.get()
    assert (await client.post("/api/channels/loopy/reconnect")).status == 200  # admin: reconnect
    await frames.connections.get()
    await channel.loop.connected_event.wait()

    message = InboundMessage(
        platform="loopy",
        transport="ws",
        conversation_id="group-1",
        conversation_kind=ConversationKind.GROUP,
        sender_id="u1",
        sender_name="U",
        text="/help",
        mentioned=True,
        message_id="frame-1",
    )
    assert await app[DISPATCHER].submit(message) is Admission.ACCEPTED
    await channel.sent.get()
    await app[DISPATCHER].wait_idle()

    _, samples = await scrape(client)
    assert value(samples, "botgate_reconnects_total", platform="loopy") == 2
    assert value(samples, "botgate_channel_connected", platform="loopy", bot="default") == 1
    assert (
        value(
            samples, "botgate_platform_api_calls_total", platform="loopy", endpoint="messages/send"
        )
        == 1
    )
    assert (
        value(
            samples,
            "botgate_messages_received_total",
            platform="loopy",
            transport="ws",
            kind="group",
        )
        == 1
    )
    assert value(samples, "botgate_replies_total", platform="loopy", outcome="notice") == 1
    status = orjson.loads(await (await client.get("/api/status")).read())
    loopy = next(c for c in status["channels"] if c["platform"] == "loopy")
    assert loopy["reconnects"] == 2 and loopy["state"] == "connected"
    assert loopy["last_error"] == "" and loopy["last_event_age"] is not None
