"""Scenario 8: what single hot-path steps cost, timed in-process on the server core, so the
explanations of missed targets (bench/findings.py) rest on numbers from the same run."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import timeit
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

# Gateway internals, as few names as the rows need (each row names what it times).
from gateway.channel import ChannelState, ChannelStatus, StatusTracker
from gateway.config import DispatcherConfig
from gateway.dispatcher import Dispatcher
from gateway.messages import InboundMessage, new_request_id
from gateway.metrics import Metrics
from gateway.store import open_store
from handlers.dingtalk.parse import Filters, parse_message
from handlers.dingtalk.webhook import signature_problem

from .context import Context
from .dingtalk import chatbot_payload, sign
from .report import Row
from .servers import SECRET

S8 = "8. Hot-path costs"
FILTERS = Filters("dingbench")
TEXT = "How do I file my travel expenses?"
WEBHOOK = "https://oapi.dingtalk.com/robot/sendBySession?x=1"


class Parked:
    """A responder that never finishes, so submit() is measured alone."""

    async def handle(self, message: InboundMessage, ready_at: float) -> None:
        await asyncio.Event().wait()

    async def notice(self, message: InboundMessage, text: str, outcome: object) -> None:
        return None


def message(i: int) -> InboundMessage:
    """Message i of 1,000 DM conversations, as the DingTalk adapter makes it from a Stream callback."""
    parsed = parse_message(chatbot_payload(f"msg{i}", f"c{i % 1000}", TEXT, WEBHOOK), FILTERS, "stream")
    if not isinstance(parsed, InboundMessage):
        raise RuntimeError(f"parse_message dropped the bench message: {parsed}")
    return parsed


def per_call_us(fn: Callable[[], Any], seconds: float) -> float:
    number = max(1, int(seconds / max(1e-7, timeit.timeit(fn, number=50) / 50)))
    return timeit.timeit(fn, number=number) / number * 1e6


async def submit_us(store_url: str, count: int, concurrent: bool) -> float:
    """Mean microseconds per submit(): one at a time (latency) or all at once (throughput)."""
    with tempfile.TemporaryDirectory() as state:
        store = open_store(store_url, Path(state))
        await store.open()
        dispatcher = Dispatcher(
            DispatcherConfig(max_concurrency=1, max_queue=10**7), store, Metrics(), Parked()
        )
        messages = [message(i) for i in range(count)]
        started = time.perf_counter()
        if concurrent:
            await asyncio.gather(*(dispatcher.submit(m) for m in messages))
        else:
            for m in messages:
                await dispatcher.submit(m)
        elapsed = time.perf_counter() - started
        await dispatcher.drain(0.0)
        await store.close()
    return elapsed / count * 1e6


async def run(ctx: Context) -> list[Row]:
    seconds = ctx.pick(0.3, 0.02)
    count = ctx.pick(2000, 100)
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, ctx.cores.server)  # the core the gateway runs on in the other scenarios
    try:
        body = chatbot_payload("msg1", "c1", TEXT, WEBHOOK)
        raw = orjson.dumps(body)
        base = per_call_us(lambda: orjson.loads(raw), seconds)
        m = message(1)
        metrics = Metrics()
        tracker = StatusTracker(ChannelStatus("dingtalk", ChannelState.CONNECTED))
        ts = str(int(time.time() * 1000))
        steps: list[tuple[str, Callable[[], Any], str]] = [
            ("new_request_id() (InboundMessage.request_id)", new_request_id, "one per message: a counter"),
            ("uuid.uuid4().hex (what request ids cost before)", lambda: uuid.uuid4().hex, "for comparison"),
            (
                "InboundMessage.to_dict()",
                m.to_dict,
                "the SQLite/Redis inbox serializes every message with it",
            ),
            (
                "StatusTracker.event_seen()",
                tracker.event_seen,
                "adapters call it per event",
            ),
            (
                "Counter.labels(...).inc()",
                lambda: metrics.messages_received.labels("dingtalk", "stream", "dm").inc(),
                "per message, several families",
            ),
            (
                "DingTalk webhook signature check",
                lambda: signature_problem(ts, sign(ts), SECRET, int(time.time() * 1000)),
                "HMAC-SHA256; the bare reference does the same",
            ),
            (
                "DingTalk parse_message(body)",
                lambda: parse_message(body, FILTERS, "stream"),
                "the body's dict read once (no SDK ChatbotMessage) + InboundMessage",
            ),
        ]
        rows = [Row(S8, "orjson.loads(callback body) (reference)", base, "us")]
        rows += [
            Row(S8, name, per_call_us(fn, seconds), "us", "orjson.loads", base, note=why)
            for name, fn, why in steps
        ]
        rows.append(
            Row(
                S8,
                "Dispatcher.submit(), memory store",
                await submit_us("memory://", count, False),
                "us",
                "orjson.loads",
                base,
                note="dedup + inbox (one atomic admit) + enqueue, one at a time",
            )
        )
        for concurrent in (True, False):
            name = (
                "all at once (group commit)"
                if concurrent
                else "one at a time (awaited in turn, as within one conversation)"
            )
            value = await submit_us(
                "sqlite:///micro.sqlite3", count if concurrent else max(20, count // 20), concurrent
            )
            rows.append(
                Row(
                    S8,
                    f"Dispatcher.submit(), SQLite, {name}",
                    value,
                    "us",
                    "orjson.loads",
                    base,
                    note="mean per message; one at a time it is the commit latency, "
                    "which caps one conversation's intake",
                )
            )
    finally:
        os.sched_setaffinity(0, saved)
    return rows
