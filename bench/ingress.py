"""Scenarios 1 (signed DingTalk webhook events/s) and 2 (DingTalk Stream / Feishu ws events/s),
each next to its reference: the bare aiohttp handler and FastAPI for webhooks, bare protocol
clients (parse + ACK, nothing else) for the long connections."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson

from .context import (
    MISSING_DINGTALK,
    MISSING_FEISHU,
    MISSING_SQLITE,
    BenchError,
    Channels,
    Context,
    adapter,
    gateway_for,
    sqlite_store,
)
from .dingtalk import WEBHOOK_PATH, DingTalkDouble, chatbot_payload
from .doubles import Sink, instant_model, parked_model
from .feishu import FeishuDouble
from .load import CONNECTIONS, LoadResult, run_load
from .report import Row, at_least, at_least_ratio
from .servers import ServerProcess, dingtalk_section, reference

S1 = "1. Webhook ingress"
S2 = "2. Stream ingress"
PATH = "/dingtalk/webhook"
STORES = (("memory", "memory store"), ("sqlite", "SQLite store"))
QUICK_SKIP = "informational run, left out of --quick"
# One worker, parked on a model that never answers; stopping does not wait for it.
PARKED = {"max_concurrency": 1, "drain_timeout": 0.2}
INTAKE_ONLY = "max_concurrency 1 and a model double that never answers, so the core does nothing but intake"
__all__ = ["CONNECTIONS", "stream", "webhook"]


def _load_note(r: LoadResult, usage: str) -> str:
    return (
        f"{r.requests:,} requests in {r.seconds:.1f} s by {r.tool}, latency p50 {r.p50_ms or 0:.1f} ms / "
        f"p99 {r.p99_ms or 0:.1f} ms, {usage}"
    )


async def _hammer(ctx: Context, proc: ServerProcess, webhook: str) -> tuple[LoadResult, str]:
    seconds = ctx.pick(10.0, 1.0)
    if not ctx.quick:
        await run_load(proc.url, PATH, webhook, 2.0, ctx.cores, ctx.workdir)  # warm-up
    start = proc.usage_start()
    result = await run_load(proc.url, PATH, webhook, seconds, ctx.cores, ctx.workdir)
    usage = proc.usage_since(start)
    if result.non_2xx:
        raise BenchError(f"{proc.name}: {result.non_2xx} of {result.requests} webhook requests were not 2xx")
    return result, usage


async def _expect_401(proc: ServerProcess) -> None:
    """A bad signature must be refused, or the measurement would be of the wrong path."""
    body = orjson.dumps(chatbot_payload("probe", "probe", "probe", "http://127.0.0.1:9/x"))
    async with (
        aiohttp.ClientSession() as http,
        http.post(proc.url + PATH, data=body, headers={"timestamp": "1", "sign": "x"}) as resp,
    ):
        if resp.status != 401:
            raise BenchError(f"{proc.name}: a badly signed webhook got {resp.status}, expected 401")


async def replies_delivered(proc: ServerProcess, platform: str) -> int:
    """Replies the gateway counted (botgate_replies_total, ok or failed) for `platform`."""
    async with aiohttp.ClientSession() as http, http.get(proc.url + "/metrics") as resp:
        text = await resp.text()
    pattern = rf'^botgate_replies_total\{{[^}}]*platform="{platform}"[^}}]*\}} ([\d.e+]+)$'
    return int(sum(float(v) for v in re.findall(pattern, text, re.M)))


async def _drain(proc: ServerProcess, platform: str, expected: int, within: float) -> float | None:
    """Seconds until the gateway delivered `expected` replies (None if not `within` seconds)."""
    started = time.monotonic()
    while await replies_delivered(proc, platform) < expected:
        if time.monotonic() - started > within:
            return None
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def _accepted(proc: ServerProcess) -> int:
    """Messages the gateway accepted so far (botgate_messages_received_total, all platforms)."""
    async with aiohttp.ClientSession() as http, http.get(proc.url + "/metrics") as resp:
        text = await resp.text()
    return int(
        sum(
            float(v) for v in re.findall(r"^botgate_messages_received_total\{[^}]*\} ([\d.e+]+)$", text, re.M)
        )
    )


async def webhook(ctx: Context) -> list[Row]:
    model = await instant_model().start()
    parked = await parked_model().start()
    sink = Sink({WEBHOOK_PATH.encode(): b'{"errcode":0,"errmsg":"ok"}'}, (WEBHOOK_PATH.encode(),))
    await sink.server.start()
    hook = sink.server.url + WEBHOOK_PATH
    rows: list[Row] = []
    try:
        async with reference(ctx.cores, ctx.workdir, "bare") as bare:
            await _expect_401(bare)
            ceiling, usage = await _hammer(ctx, bare, hook)
        rows.append(
            Row(
                S1,
                "bare aiohttp handler (ceiling)",
                ceiling.rate,
                "events/s",
                note="read body, check HMAC, parse JSON, 200; " + _load_note(ceiling, usage),
            )
        )
        fastapi: float | None = None
        if importlib.util.find_spec("fastapi") and importlib.util.find_spec("uvicorn"):
            async with reference(ctx.cores, ctx.workdir, "fastapi") as proc:
                await _expect_401(proc)
                result, usage = await _hammer(ctx, proc, hook)
            fastapi = result.rate
            rows.append(
                Row(
                    S1,
                    "FastAPI + uvicorn handler",
                    fastapi,
                    "events/s",
                    "bare",
                    ceiling.rate,
                    note="same handler; " + _load_note(result, usage),
                )
            )
        else:
            rows.append(
                Row(
                    S1,
                    "FastAPI + uvicorn handler",
                    skipped="fastapi/uvicorn not installed (pip install -r bench/requirements.txt)",
                )
            )
        for store, label in STORES:
            name = f"gateway, {label}, intake only"
            if not adapter("dingtalk") or (store == "sqlite" and not sqlite_store()):
                why = MISSING_DINGTALK if not adapter("dingtalk") else MISSING_SQLITE
                rows += [
                    Row(S1, name, target=">= 0.7x bare", skipped=why),
                    Row(S1, f"{name} vs FastAPI", target=">= 2.5x FastAPI", skipped=why),
                    Row(S1, f"gateway, {label}, intake + answers", skipped=why),
                ]
                continue
            section = dingtalk_section("http://127.0.0.1:9", sink.server.url, "webhook")
            # Intake only: answering parked (one worker waits on a model that never answers).
            proc = gateway_for(
                ctx,
                parked.url + "/v1",
                Channels(),
                store,
                f"gateway-webhook-{store}-intake",
                dingtalk=section,
                dispatcher=PARKED,
            )
            async with proc:
                await _expect_401(proc)
                result, usage = await _hammer(ctx, proc, hook)
            note = f"verify, dedup, inbox write, 200 (answers parked: {INTAKE_ONLY}); " + _load_note(
                result, usage
            )
            rows.append(
                Row(
                    S1,
                    name,
                    result.rate,
                    "events/s",
                    "bare",
                    ceiling.rate,
                    ">= 0.7x bare",
                    at_least_ratio(0.7),
                    note=note,
                )
            )
            rows.append(
                Row(
                    S1,
                    f"{name} vs FastAPI",
                    result.rate,
                    "events/s",
                    "FastAPI",
                    fastapi,
                    ">= 2.5x FastAPI",
                    at_least_ratio(2.5) if fastapi else None,
                )
            )
            # Intake + answers: every message also gets its model call and reply on the same core.
            if ctx.quick:
                rows.append(Row(S1, f"gateway, {label}, intake + answers", skipped=QUICK_SKIP))
                continue
            proc = gateway_for(
                ctx, model.url + "/v1", Channels(), store, f"gateway-webhook-{store}", dingtalk=section
            )
            async with proc:
                result, usage = await _hammer(ctx, proc, hook)
                answered = await replies_delivered(proc, "dingtalk")
                drained = await _drain(proc, "dingtalk", await _accepted(proc), ctx.pick(120.0, 30.0))
            note = (
                "the same, while every message is also answered on the same core (instant model double, "
                f"markdown reply POSTed to the sessionWebhook sink); {_load_note(result, usage)}; "
                f"{answered:,} answered by the end of the load, "
                + (f"all {drained:.1f} s later" if drained is not None else "NOT all answered")
            )
            rows.append(
                Row(
                    S1,
                    f"gateway, {label}, intake + answers",
                    result.rate,
                    "events/s",
                    "bare",
                    ceiling.rate,
                    note=note,
                )
            )
    finally:
        await model.stop()
        await parked.stop()
        await sink.server.stop()
    return rows


Pump = Callable[[int], Awaitable[asyncio.Future[float]]]


async def pump(send_one: Pump, count: int, window: int, seconds: float) -> float:
    """Push up to `count` events (stopping after `seconds`), keeping at most `window` un-ACKed;
    events/s from the first push to the last ACK."""
    slots = asyncio.Semaphore(window)
    acks: list[asyncio.Future[float]] = []
    started = time.monotonic()
    for i in range(count):
        if time.monotonic() - started > seconds:
            break
        await slots.acquire()
        future = await send_one(i)
        future.add_done_callback(lambda _: slots.release())
        acks.append(future)
    try:
        async with asyncio.timeout(30):
            done = await asyncio.gather(*acks)
    except TimeoutError:
        raise BenchError(f"{sum(not f.done() for f in acks)} of {len(acks)} events never ACKed") from None
    return len(acks) / (max(done) - started)


def _dingtalk_sender(double: DingTalkDouble, tag: str) -> Pump:
    async def send(i: int) -> asyncio.Future[float]:
        frame_id, _, frame = double.callback_frame(f"{tag}{i % 1000}", f"stream message {tag} {i}")
        future = double.expect_ack(frame_id)
        await double.push(frame)
        return future

    return send


def _feishu_sender(double: FeishuDouble, tag: str) -> Pump:
    async def send(i: int) -> asyncio.Future[float]:
        frame_id, frame = double.event_frame(f"{tag}{i % 1000}", f"stream message {tag} {i}")
        future = double.expect_ack(frame_id)
        await double.push(frame)
        return future

    return send


async def _connected(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), 15)
    except TimeoutError:
        raise BenchError(f"{what} never connected to the double") from None


# (store, answers?) per gateway run; the first (the shipped default store) is the one the target is
# about and the only one in --quick.
STREAM_VARIANTS = (("sqlite", False), ("memory", False), ("sqlite", True))


async def stream(ctx: Context) -> list[Row]:
    count, window, seconds = ctx.pick(50_000, 2_000), ctx.pick(500, 100), ctx.pick(10.0, 1.0)
    rows: list[Row] = []
    model = await instant_model().start()
    parked = await parked_model().start()
    try:
        for platform, label, target in (
            ("dingtalk", "DingTalk Stream", 5000.0),
            ("feishu", "Feishu ws", None),
        ):
            double: DingTalkDouble | FeishuDouble = await (
                DingTalkDouble() if platform == "dingtalk" else FeishuDouble()
            ).start()
            sender = _dingtalk_sender if platform == "dingtalk" else _feishu_sender
            upstream = double.api_base if isinstance(double, DingTalkDouble) else double.domain
            try:
                async with reference(ctx.cores, ctx.workdir, platform, "--upstream", upstream) as ref:
                    await _connected(double.connected, f"bare {label} client")
                    start = ref.usage_start()
                    ceiling = await pump(sender(double, "r"), count, window, seconds)  # type: ignore[arg-type]
                    ref_usage = ref.usage_since(start)
                rows.append(
                    Row(
                        S2,
                        f"bare {label} client (ceiling)",
                        ceiling,
                        "events/s",
                        note=f"up to {count:,} events or {seconds:g} s, <= {window} un-ACKed; "
                        f"parse frame + event JSON, send ACK; {ref_usage}",
                    )
                )
                for store, answers in STREAM_VARIANTS:
                    name = f"gateway, {label}, {store} store, " + (
                        "intake + answers" if answers else "intake only"
                    )
                    tgt = f">= {target:,.0f} events/s" if target and not answers else ""
                    if ctx.quick and (answers or store != "sqlite"):
                        rows.append(Row(S2, name, skipped=QUICK_SKIP))
                        continue
                    if not adapter(platform) or (store == "sqlite" and not sqlite_store()):
                        why = (
                            (MISSING_DINGTALK if platform == "dingtalk" else MISSING_FEISHU)
                            if not adapter(platform)
                            else MISSING_SQLITE
                        )
                        rows.append(Row(S2, name, target=tgt, skipped=why))
                        continue
                    channels = (
                        Channels(dingtalk=double)
                        if isinstance(double, DingTalkDouble)
                        else Channels(feishu=double)
                    )
                    extra = {} if answers else {"dispatcher": PARKED}
                    proc = gateway_for(
                        ctx,
                        (model if answers else parked).url + "/v1",
                        channels,
                        store,
                        f"gateway-{platform}-{store}",
                        **extra,
                    )
                    async with proc:
                        await _connected(double.connected, name)
                        await pump(sender(double, "w"), ctx.pick(2000, 200), window, ctx.pick(2.0, 0.2))  # type: ignore[arg-type]
                        start = proc.usage_start()
                        rate = await pump(sender(double, "g"), count, window, seconds)  # type: ignore[arg-type]
                        usage = proc.usage_since(start)
                        drained = (
                            await _drain(proc, platform, await _accepted(proc), ctx.pick(120.0, 30.0))
                            if answers
                            else None
                        )
                    note = (
                        f"up to {count:,} events or {seconds:g} s, <= {window} un-ACKed, ACK/response frame "
                        "once "
                        f"the dispatcher accepted; {usage}; "
                    )
                    if answers:
                        note += (
                            "every message also answered on the same core (instant model, reply to the "
                            "sink), "
                            + (
                                f"all delivered {drained:.1f} s after the last ACK"
                                if drained is not None
                                else "NOT all delivered"
                            )
                        )
                    else:
                        note += f"answers parked ({INTAKE_ONLY})"
                    rows.append(
                        Row(
                            S2,
                            name,
                            rate,
                            "events/s",
                            f"bare {label} client",
                            ceiling,
                            tgt,
                            at_least(target) if tgt and target else None,
                            note=note,
                        )
                    )
                    if double.bad_acks:
                        raise BenchError(f"{name}: {double.bad_acks} ACKs without code 200")
            finally:
                await double.stop()
    finally:
        await model.stop()
        await parked.stop()
    return rows
