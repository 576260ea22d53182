"""Scenario 1: signed DingTalk webhook events/s next to the bare aiohttp handler and FastAPI, with
the answering side parked (intake only, what the targets are about) and live (intake + answers)."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import time
from dataclasses import dataclass

import aiohttp
import orjson

from .context import BenchError, Channels, Context, gateway_for, store_url
from .dingtalk import WEBHOOK_PATH, chatbot_payload
from .doubles import Sink, instant_model, parked_model
from .env import free_port
from .load import CONNECTIONS, LoadResult, run_load
from .report import Row, at_least_ratio
from .servers import ServerProcess, dingtalk_section, gateway, gateway_sections, reference, uvloop_installed

S1 = "1. Webhook ingress"
PATH = "/dingtalk/webhook"
STORES = (("memory", "memory store"), ("sqlite", "SQLite store"))
NO_FASTAPI = "fastapi/uvicorn not installed: the optional extra, pip install -r bench/requirements.txt"
NO_UVLOOP = "uvloop not installed: the optional extra, pip install -r bench/requirements.txt"
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
    return int(sum(float(v) for v in re.findall(r"^botgate_messages_received_total\{[^}]*\} ([\d.e+]+)$", text, re.M)))


async def _bare(ctx: Context, hook: str, loop: str) -> tuple[LoadResult, str]:
    async with reference(ctx.cores, ctx.workdir, "bare", loop=loop) as bare:
        await _expect_401(bare)
        return await _hammer(ctx, bare, hook)


@dataclass(frozen=True, slots=True)
class Intake:
    """Where the gateway's intake-only rows send their webhooks."""

    parked_url: str  # the model double that never answers
    sink_url: str  # where sessionWebhooks live
    hook: str  # the sessionWebhook the bodies carry


async def _intake_only(
    ctx: Context, intake: Intake, backend: str, name: str, loop: str = "asyncio", durability: str = ""
) -> tuple[float, str]:
    """events/s of the gateway with its answering side parked (one worker waits on a model that
    never answers), and the note for its row."""
    section = dingtalk_section("http://127.0.0.1:9", intake.sink_url, "webhook")
    sections = gateway_sections(
        free_port(), intake.parked_url + "/v1", store_url(backend), dingtalk=section, dispatcher=PARKED
    )
    if durability:
        sections["store"]["durability"] = durability
    async with gateway(ctx.cores, ctx.workdir, sections, name, loop) as proc:
        await _expect_401(proc)
        result, usage = await _hammer(ctx, proc, intake.hook)
    return result.rate, f"verify, dedup, inbox write, 200 (answers parked: {INTAKE_ONLY}); " + _load_note(result, usage)


async def webhook(ctx: Context) -> list[Row]:
    model = await instant_model().start()
    parked = await parked_model().start()
    sink = Sink({WEBHOOK_PATH.encode(): b'{"errcode":0,"errmsg":"ok"}'}, (WEBHOOK_PATH.encode(),))
    await sink.server.start()
    hook = sink.server.url + WEBHOOK_PATH
    rows: list[Row] = []
    try:
        ceiling, usage = await _bare(ctx, hook, "asyncio")
        rows.append(
            Row(
                S1,
                "bare aiohttp handler (ceiling)",
                ceiling.rate,
                "events/s",
                note="read body, check HMAC, parse JSON, 200; asyncio's event loop; " + _load_note(ceiling, usage),
            )
        )
        # uvloop (bench/requirements.txt) under the bare handler and the gateway's SQLite intake: the
        # gateway itself runs on asyncio's loop (docs/benchmarks.md, Profiles: why).
        uvloop = uvloop_installed()
        bare_uvloop: float | None = None
        if uvloop:
            on_uvloop, usage = await _bare(ctx, hook, "uvloop")
            bare_uvloop = on_uvloop.rate
            rows.append(
                Row(
                    S1,
                    "bare aiohttp handler on uvloop",
                    on_uvloop.rate,
                    "events/s",
                    "bare",
                    ceiling.rate,
                    note="the same handler on uvloop's event loop; " + _load_note(on_uvloop, usage),
                )
            )
        else:
            rows.append(Row(S1, "bare aiohttp handler on uvloop", skipped=NO_UVLOOP, optional=True))
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
                    note="same handler (uvicorn picks uvloop + httptools when installed); " + _load_note(result, usage),
                )
            )
        else:
            rows.append(Row(S1, "FastAPI + uvicorn handler", skipped=NO_FASTAPI, optional=True))
        section = dingtalk_section("http://127.0.0.1:9", sink.server.url, "webhook")
        intake = Intake(parked.url, sink.server.url, hook)
        for store, label in STORES:
            name = f"gateway, {label}, intake only"
            rate, intake_note = await _intake_only(ctx, intake, store, f"gateway-webhook-{store}-intake")
            rows.append(
                Row(
                    S1,
                    name,
                    rate,
                    "events/s",
                    "bare",
                    ceiling.rate,
                    ">= 0.7x bare",
                    at_least_ratio(0.7),
                    note=intake_note,
                )
            )
            rows.append(
                Row(S1, f"{name} vs FastAPI", target=">= 2.5x FastAPI", skipped=NO_FASTAPI, optional=True)
                if fastapi is None
                else Row(
                    S1,
                    f"{name} vs FastAPI",
                    rate,
                    "events/s",
                    "FastAPI",
                    fastapi,
                    ">= 2.5x FastAPI",
                    at_least_ratio(2.5),
                )
            )
            if store == "sqlite":
                process, process_note = await _intake_only(
                    ctx, intake, store, "gateway-webhook-sqlite-process", durability="process"
                )
                rows.append(
                    Row(
                        S1,
                        f"{name}, [store] durability = process",
                        process,
                        "events/s",
                        "bare",
                        ceiling.rate,
                        note="synchronous=NORMAL: no disk sync per group commit (kill -9 safe, not power-cut "
                        f"safe); {process_note}",
                    )
                )
                if bare_uvloop is not None:
                    on_uv, on_uv_note = await _intake_only(
                        ctx, intake, store, "gateway-webhook-sqlite-uvloop", "uvloop"
                    )
                    rows.append(
                        Row(
                            S1,
                            f"{name}, on uvloop",
                            on_uv,
                            "events/s",
                            "bare on uvloop",
                            bare_uvloop,
                            note=f"the same gateway started on uvloop's policy; {on_uv_note}",
                        )
                    )
            # Intake + answers: every message also gets its model call and reply on the same core.
            proc = gateway_for(ctx, model.url + "/v1", Channels(), store, f"gateway-webhook-{store}", dingtalk=section)
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
