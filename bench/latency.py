"""Scenarios 3 (gateway overhead at a steady 200 msg/s, and at 1,000 msg/s on the SQLite store,
model 1 s) and 4 (burst of 2,000 conversations at once, model 1 s), against the gateway and the
minimal relay (the floor) at the same rates."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .context import BenchError, Channels, Context, channel_doubles, gateway_for
from .doubles import TimedModel
from .drivers import DingTalkStreamDriver, Driver, WebChatDriver
from .env import HOST
from .report import Row, at_most, at_most_ratio
from .servers import ServerProcess, reference

RATE = 200  # messages per second
HIGH_RATE = 1000  # the second load point, on the default (SQLite) store
MODEL_DELAY = 1.0
S3 = "3. Gateway overhead"
S4 = "4. Burst"
_salt = itertools.count()


@dataclass(frozen=True, slots=True)
class Overhead:
    p50_ms: float
    p99_ms: float
    max_ms: float
    count: int


@dataclass(frozen=True, slots=True)
class Burst:
    seconds: float
    count: int


async def serve_model(model: TimedModel) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(model.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0, backlog=4096).start()
    return runner, f"http://{HOST}:{runner.addresses[0][1]}/v1"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]


async def steady(driver: Driver, model: TimedModel, seconds: float, tag: str, rate: int = RATE) -> Overhead:
    """`rate` msg/s for `seconds`; each conversation has at most one message in flight, as people do."""
    pool = int(rate * (model.delay + 1.0)) + 1
    conversations = [f"{tag}{i:06d}" for i in range(pool)]
    await driver.open(conversations)
    total = int(rate * seconds)
    sent: list[tuple[str, float, asyncio.Future[float]]] = []
    start = time.monotonic()
    for k in range(total):
        delay = start + k / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        text = f"{tag}-{k}"
        at, future = await driver.send(conversations[k % pool], text)
        sent.append((text, at, future))
    await wait_all([f for _, _, f in sent], model.delay + 30)
    overheads = []
    for text, at, future in sent:
        key = text
        if key not in model.arrived_at or key not in model.last_byte_at:
            raise BenchError(f"the model double never saw {key!r}")
        overheads.append((model.arrived_at[key] - at) + (future.result() - model.last_byte_at[key]))
    ms = [o * 1000 for o in overheads]
    return Overhead(percentile(ms, 0.5), percentile(ms, 0.99), max(ms), len(ms))


async def burst(driver: Driver, count: int, tag: str, model_delay: float) -> Burst:
    conversations = [f"{tag}{i:06d}" for i in range(count)]
    await driver.open(conversations)
    start = time.monotonic()
    sends = await asyncio.gather(*(driver.send(c, f"{tag}-{i}") for i, c in enumerate(conversations)))
    done = await wait_all([f for _, f in sends], model_delay * count / 32 + 60)
    return Burst(max(done) - start, count)


async def wait_all(futures: list[asyncio.Future[float]], within: float) -> list[float]:
    try:
        async with asyncio.timeout(within):
            return list(await asyncio.gather(*futures))
    except TimeoutError:
        missing = sum(not f.done() for f in futures)
        raise BenchError(f"{missing} of {len(futures)} replies never arrived within {within:.0f} s") from None


async def measure(
    ctx: Context, proc: ServerProcess, driver: Driver, model: TimedModel
) -> tuple[Overhead, Burst, str]:
    """Steady overhead, then the burst; plus how busy the server was during the steady part."""
    try:
        result, usage = await steady_load(ctx, proc, driver, model, RATE)
        shot = await burst(driver, ctx.pick(2000, 200), f"b{next(_salt)}x", model.delay)
    finally:
        await driver.close()
    return result, shot, usage


async def steady_load(
    ctx: Context, proc: ServerProcess, driver: Driver, model: TimedModel, rate: int
) -> tuple[Overhead, str]:
    """Steady overhead at `rate` after a warm-up, and how busy the server was meanwhile."""
    tag = f"s{next(_salt)}x"
    if not ctx.quick:
        await steady(driver, model, 1.0, tag + "w", rate)  # warm-up: pooled connections
    start = proc.usage_start()
    result = await steady(driver, model, ctx.pick(20.0, 0.5), tag + "s", rate)
    return result, proc.usage_since(start)


async def high_rate(ctx: Context, proc: ServerProcess, driver: Driver, model: TimedModel) -> tuple[Overhead, str]:
    try:
        return await steady_load(ctx, proc, driver, model, HIGH_RATE)
    finally:
        await driver.close()


def stream_driver(channels: Channels) -> DingTalkStreamDriver:
    """Messages travel as DingTalk Stream CALLBACK frames; replies arrive at the sessionWebhook sink."""
    assert channels.dingtalk is not None
    return DingTalkStreamDriver(channels.dingtalk)


async def default_burst(ctx: Context, model: TimedModel, model_url: str) -> Burst:
    """The same burst against the shipped `[dispatcher] max_concurrency` (64)."""
    async with channel_doubles(feishu=False) as channels:
        proc = gateway_for(
            ctx, model_url, channels, name="gateway-defaults", dispatcher={"max_concurrency": 64}
        )
        async with proc:
            driver = stream_driver(channels)
            try:
                return await burst(driver, ctx.pick(2000, 200), f"d{next(_salt)}x", model.delay)
            finally:
                await driver.close()


async def gateway_histogram_p99(proc: ServerProcess) -> str:
    """The gateway's own botgate_gateway_overhead_seconds histogram, for comparison."""
    async with aiohttp.ClientSession() as http, http.get(proc.url + "/metrics") as resp:
        text = await resp.text()
    buckets = [
        (float(le), float(v))
        for le, v in re.findall(r'botgate_gateway_overhead_seconds_bucket\{le="([^"+]+)"\} ([\d.e+]+)', text)
    ]
    total = (
        float(m.group(1))
        if (m := re.search(r"botgate_gateway_overhead_seconds_count ([\d.e+]+)", text))
        else 0.0
    )
    if not total:
        return "gateway histogram: no observations"
    p99 = next((le for le, v in buckets if v >= 0.99 * total), math.inf)
    return f"gateway's own histogram: p99 <= {p99 * 1000:g} ms over {total:.0f} answers"


async def run(ctx: Context) -> list[Row]:
    model = TimedModel(delay=ctx.pick(MODEL_DELAY, 0.3))
    runner, model_url = await serve_model(model)
    try:
        async with reference(ctx.cores, ctx.workdir, "relay", "--upstream", model_url) as relay:
            ref_overhead, ref_burst, ref_usage = await measure(ctx, relay, WebChatDriver(relay.url), model)
            ref_high, ref_high_usage = await high_rate(ctx, relay, WebChatDriver(relay.url), model)
        async with channel_doubles(feishu=False) as channels:
            proc = gateway_for(ctx, model_url, channels)
            async with proc:
                driver = stream_driver(channels)
                overhead, shot, usage = await measure(ctx, proc, driver, model)
                histogram = await gateway_histogram_p99(proc)
        async with channel_doubles(feishu=False) as channels:
            proc = gateway_for(ctx, model_url, channels, "sqlite", "gateway-latency-sqlite")
            async with proc:
                high, high_usage = await high_rate(ctx, proc, stream_driver(channels), model)
                high_histogram = await gateway_histogram_p99(proc)
        shipped = await default_burst(ctx, model, model_url)
    finally:
        await runner.cleanup()
    steady_note = (
        f"{overhead.count} messages at {RATE}/s over {driver.path}, model double answers after "
        f"{model.delay:g} s; overhead = (model request received - message sent) + (reply received - "
        f"model's last byte); max {overhead.max_ms:.1f} ms; {usage}; {histogram}. "
        "Reference: a minimal aiohttp relay "
        "(web chat socket -> model -> socket, no dispatcher/store/metrics/logs): "
        f"p99 {ref_overhead.p99_ms:.1f} ms, {ref_usage}"
    )
    high_note = (
        f"{high.count} messages at {HIGH_RATE:,}/s over {driver.path}, SQLite store (the default; the "
        f"row above runs on the memory store), model {model.delay:g} s, overhead as above; max "
        f"{high.max_ms:.1f} ms; {high_usage}; {high_histogram}. Reference: the same relay at {HIGH_RATE:,}/s: "
        f"p99 {ref_high.p99_ms:.1f} ms, {ref_high_usage}"
    )
    high_name = f"at {HIGH_RATE:,} msg/s, SQLite store"
    rows = [
        Row(S3, "overhead p50", overhead.p50_ms, "ms", "relay p50", ref_overhead.p50_ms, note=steady_note),
        Row(
            S3,
            "overhead p99",
            overhead.p99_ms,
            "ms",
            "relay p99",
            ref_overhead.p99_ms,
            "p99 < 20 ms",
            at_most(20.0),
        ),
        Row(S3, f"overhead p50 {high_name}", high.p50_ms, "ms", "relay p50", ref_high.p50_ms, note=high_note),
        Row(
            S3,
            f"overhead p99 {high_name}",
            high.p99_ms,
            "ms",
            "relay p99",
            ref_high.p99_ms,
            "p99 < 20 ms",
            at_most(20.0),
        ),
        Row(
            S4,
            f"{shot.count} conversations, 1 message each at once",
            shot.seconds,
            "s",
            "relay",
            ref_burst.seconds,
            "<= 1.15x relay",
            at_most_ratio(1.15),
            note=f"time from the first send to the last reply, model {model.delay:g} s, over {driver.path}; "
            "bench config raises [dispatcher] max_concurrency to 4096",
        ),
    ]
    rows.append(
        Row(
            S4,
            "the same with the shipped max_concurrency = 64",
            shipped.seconds,
            "s",
            "relay",
            ref_burst.seconds,
            note=f"{shipped.count}/64 = {shipped.count / 64:.0f} model-times in a row: the default caps a burst",
        )
    )
    return rows
