"""Scenario 9: answers streamed into cards at the shipped cadence (`stream_interval = 1.0`), DingTalk
(card template set) and Feishu CardKit: how soon the first card text is visible after the model's
first token, and how many API calls one 5 s streamed answer costs on the card path.

"Visible" is what the platform double observes: the arrival of the call that shows the card to the
user (DingTalk createAndDeliver; Feishu the reply carrying the card), on the bench process's clock,
which is also the model double's. Messages arrive four a second, so a few answers stream at once,
well under the platforms' (and the gateway's own) rate limits.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Callable

import orjson
from aiohttp import web

from .context import BenchError, Context, store_url
from .dingtalk import DingTalkDouble
from .env import HOST, free_port
from .feishu import FeishuDouble
from .latency import percentile
from .report import Row, at_most
from .servers import dingtalk_section, feishu_section, gateway, gateway_sections

S9 = "9. Card streaming"
TOKENS, GAP = 50, 0.1  # the answer streams for 4.9 s; with its final update, a 5 s streamed answer
ARRIVAL_GAP = 0.25  # seconds between two messages
_TAG = re.compile(r"cardbench-\d+")


class PacedModel:
    """An OpenAI-compatible model streaming `TOKENS` words `GAP` seconds apart, recording when it
    wrote each request's first token (keyed by the `cardbench-N` tag in the last user message)."""

    def __init__(self) -> None:
        self.first_token_at: dict[str, float] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> PacedModel:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, 0).start()
        self.url = f"http://{HOST}:{self._runner.addresses[0][1]}/v1"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        content = body["messages"][-1]["content"]
        found = _TAG.search(content if isinstance(content, str) else "")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        started = time.monotonic()
        for i in range(TOKENS):
            if i:  # token i at i * GAP after the first, without drift: the pace is what is measured
                await asyncio.sleep(max(0.0, started + i * GAP - time.monotonic()))
            delta = {"content": f"word{i}" if i == 0 else f" word{i}"}
            choice = {"index": 0, "delta": delta}
            chunk = {"id": "c", "object": "chat.completion.chunk", "model": "bench", "choices": [choice]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if i == 0 and found:
                self.first_token_at.setdefault(found.group(), time.monotonic())
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def _until(done: Callable[[], bool], what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            raise BenchError(f"card streaming: {what} not within {within:.0f} s")
        await asyncio.sleep(0.05)


def _rows(platform: str, latencies: list[float], calls: float, count: int) -> list[Row]:
    ms = [x * 1000 for x in latencies]
    what = "model's first token -> first visible card text"
    note = (
        f"{count} messages, {1 / ARRIVAL_GAP:.0f} a second, each answered by {TOKENS} tokens {GAP:g} s apart; "
        f"shipped cadence (stream_interval 1.0 s, first update at once); mean {statistics.mean(ms):.1f} ms, "
        f"max {max(ms):.1f} ms"
    )
    return [
        Row(S9, f"{platform}: {what}, p50", percentile(ms, 0.5), "ms", note=note),
        Row(
            S9,
            f"{platform}: {what}, p99",
            percentile(ms, 0.99),
            "ms",
            target="p99 < 300 ms",
            check=at_most(300.0),
            gap="the first text waits for the card's store record (one commit) and its calls (Feishu: create, "
            "then the reply that shows it), each behind the gateway's own rate limiter",
        ),
        Row(
            S9,
            f"{platform}: API calls per answered message, card path, 5 s streamed answer",
            calls,
            "calls",
            target="<= 8",
            check=at_most(8.0),
            note="every card call (create/show, updates, final text, close), no token calls; at 1 update/s",
            gap="an update is due every stream_interval while tokens arrive: a longer answer or a shorter "
            "interval costs more",
        ),
    ]


async def _dingtalk(ctx: Context, model: PacedModel, count: int) -> list[Row]:
    double = await DingTalkDouble().start()
    try:
        sections = gateway_sections(free_port(), model.url, store_url("sqlite"))
        sections["dingtalk"] = {
            **dingtalk_section(double.api_base, double.sink.server.url),
            "card_template_id": "bench-ai.schema",
        }
        async with gateway(ctx.cores, ctx.workdir, sections, "gateway-cards-dingtalk"):
            await asyncio.wait_for(double.connected.wait(), 15)
            for i in range(count):
                _, _, frame = double.callback_frame(f"cb{i}", f"cardbench-{i} stream an answer")
                await double.push(frame)
                await asyncio.sleep(ARRIVAL_GAP)

            def finished() -> set[str]:
                return {
                    str(body["outTrackId"])
                    for _, path, body in double.card_calls
                    if path == "/v1.0/card/instances"
                }

            await _until(lambda: len(finished()) >= count, "every DingTalk card finished", 60)
    finally:
        await double.stop()
    visible: dict[str, float] = {}
    for at, path, body in double.card_calls:
        if path.endswith("/createAndDeliver"):
            staff = str(body["openSpaceId"]).rsplit(".", 1)[-1]  # dtv1.card//IM_ROBOT.staffcb<i>
            visible[f"cardbench-{staff.removeprefix('staffcb')}"] = at
    latencies = [visible[tag] - first for tag, first in model.first_token_at.items() if tag in visible]
    if len(latencies) != count:
        raise BenchError(f"DingTalk cards: {len(latencies)} of {count} first texts matched their model answers")
    return _rows("DingTalk (card template set)", latencies, len(double.card_calls) / count, count)


async def _feishu(ctx: Context, model: PacedModel, count: int) -> list[Row]:
    double = await FeishuDouble().start()
    calls: list[tuple[float, str, bytes]] = []
    double.sink.reply_paths = (b"/open-apis/im/v1/messages", b"/open-apis/cardkit/")
    double.sink.on_reply = lambda path, body: calls.append((time.monotonic(), path.decode(), body))
    try:
        sections = gateway_sections(free_port(), model.url, store_url("sqlite"))
        sections["feishu"] = feishu_section(double.domain)
        async with gateway(ctx.cores, ctx.workdir, sections, "gateway-cards-feishu"):
            await asyncio.wait_for(double.connected.wait(), 15)
            message_ids = []
            for i in range(count):
                frame_id, frame = double.event_frame(f"cb{i}", f"cardbench-{i} stream an answer")
                message_ids.append(f"om_{int(frame_id.removeprefix('fm')):09d}")  # event_frame numbers both alike
                await double.push(frame)
                await asyncio.sleep(ARRIVAL_GAP)
            def closed() -> int:
                return sum(path.endswith("/settings") for _, path, _ in calls)

            await _until(lambda: closed() >= count, "every Feishu card closed", 60)
    finally:
        await double.stop()
    visible: dict[str, float] = {}
    for at, path, body in calls:
        if path.endswith("/reply") and b'\\"type\\":\\"card\\"' in body:
            message_id = path.split("/")[-2]
            if message_id in message_ids:
                visible.setdefault(f"cardbench-{message_ids.index(message_id)}", at)
    latencies = [visible[tag] - first for tag, first in model.first_token_at.items() if tag in visible]
    if len(latencies) != count:
        raise BenchError(f"Feishu cards: {len(latencies)} of {count} first texts matched their model answers")
    return _rows("Feishu", latencies, len(calls) / count, count)


async def run(ctx: Context) -> list[Row]:
    count = ctx.pick(40, 4)
    rows: list[Row] = []
    for scenario in (_dingtalk, _feishu):
        model = await PacedModel().start()
        try:
            rows += await scenario(ctx, model, count)
        finally:
            await model.stop()
    return rows
