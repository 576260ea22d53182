"""Scenario 1: signed DingTalk webhook events/s next to the bare aiohttp handler and FastAPI, with
the answering side parked (intake only, what the targets are about) and live (intake + answers)."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import time

import aiohttp
import orjson

from .context import BenchError, Channels, Context, gateway_for
from .dingtalk import WEBHOOK_PATH, chatbot_payload
from .doubles import Sink, instant_model, parked_model
from .load import CONNECTIONS, LoadResult, run_load
from .report import Row, at_least_ratio
from .servers import ServerProcess, dingtalk_section, reference

S1 = "1. Webhook ingress"
PATH = "/dingtalk/webhook"
STORES = (("memory", "memory store"), ("sqlite", "SQLite store"))
NO_FASTAPI = "fastapi/uvicorn not installed: the optional extra, pip install -r bench/requirements.txt"
# One worker, parked on a model that never answers; stopping does not wait for it.
PARKED = {"max_concurrency": 1, "drain_timeout": 0.2}
INTAKE_ONLY = "max_concurrency 1 and a model double that never answers, so the core does nothing but intake"
__all__ = ["CONNECTIONS", "webhook"]


def _load_note(r: LoadResult, usage: str) -> str:
    return (
        f"{r.requests:,} requests in {r.seconds:.1f} s by wrk, latency p50 {r.p50_ms or 0:.1f} ms / "
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


async def drain(proc: ServerProcess, platform: str, expected: int, within: float) -> float | None:
    """Seconds until the gateway delivered `expected` replies (None if not `within` seconds)."""
    started = time.monotonic()
    while await replies_delivered(proc, platform) < expected:
        if time.monotonic() - started > within:
            return None
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def accepted(proc: ServerProcess) -> int:
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
            rows.append(Row(S1, "FastAPI + uvicorn handler", skipped=NO_FASTAPI, optional=True))
        for store, label in STORES:
            name = f"gateway, {label}, intake only"
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
                Row(S1, f"{name} vs FastAPI", target=">= 2.5x FastAPI", skipped=NO_FASTAPI, optional=True)
                if fastapi is None
                else Row(
                    S1,
                    f"{name} vs FastAPI",
                    result.rate,
                    "events/s",
                    "FastAPI",
                    fastapi,
                    ">= 2.5x FastAPI",
                    at_least_ratio(2.5),
                )
            )
            # Intake + answers: every message also gets its model call and reply on the same core.
            proc = gateway_for(
                ctx, model.url + "/v1", Channels(), store, f"gateway-webhook-{store}", dingtalk=section
            )
            async with proc:
                result, usage = await _hammer(ctx, proc, hook)
                answered = await replies_delivered(proc, "dingtalk")
                drained = await drain(proc, "dingtalk", await accepted(proc), ctx.pick(120.0, 30.0))
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
