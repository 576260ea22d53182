"""Scenario 2: DingTalk Stream and Feishu ws events/s from the doubles through the dispatcher and back
as ACK / response frames, next to bare protocol clients (parse + ACK, nothing else)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from .context import BenchError, Channels, Context, gateway_for
from .dingtalk import DingTalkDouble
from .doubles import instant_model, parked_model
from .feishu import FeishuDouble
from .ingress import INTAKE_ONLY, PARKED, accepted, drain
from .report import Row, at_least
from .servers import reference

S2 = "2. Stream ingress"

Pump = Callable[[int], Awaitable[asyncio.Future[float]]]


async def pump(
    send_one: Pump, count: int, window: int, seconds: float, within: float = 30.0, what: str = "ACKed"
) -> float:
    """Push up to `count` events (stopping after `seconds`), keeping at most `window` of the futures
    `send_one` returns (ACKs, or replies) unresolved; events/s from the first push to the last one."""
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
        async with asyncio.timeout(within):
            done = await asyncio.gather(*acks)
    except TimeoutError:
        raise BenchError(f"{sum(not f.done() for f in acks)} of {len(acks)} events never {what}") from None
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


# (store, answers?) per gateway run; the first (the shipped default store) is the one the target is about.
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
                            await drain(proc, platform, await accepted(proc), ctx.pick(120.0, 30.0))
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
