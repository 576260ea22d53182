"""Scenario 12: answers per core. Messages arrive as DingTalk Stream CALLBACK frames, the instant
model double answers, the reply is POSTed to the sessionWebhook sink; answers per second from the
first frame to the last reply, and the server's CPU per answer, for the gateway and for a bare relay
(frame -> ACK -> model call -> reply POST, no store, dispatcher, metrics or logs) in the same run."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from .context import BenchError, Channels, Context, gateway_for
from .dingtalk import DingTalkDouble
from .doubles import instant_model
from .env import cpu_seconds
from .report import Row, at_least_ratio
from .servers import ServerProcess, reference
from .stream import pump

S12 = "12. Answer throughput"
CONVERSATIONS = 2000


@dataclass(frozen=True, slots=True)
class Answered:
    per_second: float
    cpu_us: float  # server CPU (user + system, all threads) per answer
    count: int
    usage: str


async def answer_all(double: DingTalkDouble, count: int, window: int, tag: str) -> float:
    """Send `count` messages keeping at most `window` unanswered; answers/s first send -> last reply."""

    async def send(i: int) -> asyncio.Future[float]:
        _, reply = await double.send_message(f"{tag}{i % CONVERSATIONS:05d}", f"answer me {tag} {i}")
        return reply

    return await pump(send, count, window, math.inf, within=60.0, what="answered")


async def measure(ctx: Context, proc: ServerProcess, double: DingTalkDouble, tag: str) -> Answered:
    try:
        await asyncio.wait_for(double.connected.wait(), 15)
    except TimeoutError:
        raise BenchError(f"{proc.name} never connected to the DingTalk double") from None
    count, window = ctx.pick(20_000, 500), ctx.pick(400, 100)
    await answer_all(double, ctx.pick(2_000, 100), window, tag + "w")  # warm-up: pooled connections
    start, cpu = proc.usage_start(), cpu_seconds(proc.pid)
    rate = await answer_all(double, count, window, tag)
    used = cpu_seconds(proc.pid) - cpu
    return Answered(rate, used / count * 1e6, count, proc.usage_since(start))


async def run(ctx: Context) -> list[Row]:
    model = await instant_model().start()
    rows: list[Row] = []
    try:
        double = await DingTalkDouble().start()
        try:
            args = ("--upstream", double.api_base, "--model", model.url + "/v1")
            async with reference(ctx.cores, ctx.workdir, "dingtalk-relay", *args) as relay:
                floor = await measure(ctx, relay, double, "r")
            rows.append(
                Row(
                    S12,
                    "bare DingTalk Stream relay (floor)",
                    floor.per_second,
                    "answers/s",
                    note=f"{floor.count:,} messages, <= {ctx.pick(400, 100)} unanswered, over "
                    f"{CONVERSATIONS:,} conversations; frame -> ACK -> model call -> reply POST, nothing "
                    f"else; {floor.cpu_us:.0f} µs of CPU per answer; {floor.usage}",
                )
            )
            for store in ("sqlite", "memory"):
                proc = gateway_for(ctx, model.url + "/v1", Channels(dingtalk=double), store, f"gateway-answers-{store}")
                async with proc:
                    got = await measure(ctx, proc, double, store[0])
                rows.append(
                    Row(
                        S12,
                        f"gateway, {store} store, DingTalk Stream, instant model",
                        got.per_second,
                        "answers/s",
                        "relay",
                        floor.per_second,
                        ">= 0.5x relay" if store == "sqlite" else "",
                        at_least_ratio(0.5) if store == "sqlite" else None,
                        note=f"the same load; dedup, durable inbox, dispatcher, context, cache, usage, "
                        f"metrics, logs; {got.cpu_us:.0f} µs of CPU per answer (relay {floor.cpu_us:.0f} µs); "
                        f"{got.usage}",
                    )
                )
        finally:
            await double.stop()
    finally:
        await model.stop()
    return rows
