"""Scenario 6: the DingTalk double drops the Stream socket (no close frame); time until the next
event is answered. Reference: the bare Stream client, which reconnects at once without backoff."""

from __future__ import annotations

import asyncio
import statistics
import time

from .context import BenchError, Channels, Context, gateway_for
from .dingtalk import DingTalkDouble
from .doubles import instant_model
from .report import Row, at_most
from .servers import reference

S6 = "6. Recovery"


async def _once(double: DingTalkDouble, tag: str, reply: bool) -> tuple[float, float | None]:
    """Drop the socket, queue one event for the next connection: (seconds to ACK, to reply)."""
    await asyncio.wait_for(double.connected.wait(), 15)
    await asyncio.sleep(0.2)  # a settled connection, not one still in its handshake
    frame_id, msg_id, frame = double.callback_frame(tag, f"after the drop {tag}")
    ack = double.expect_ack(frame_id)
    answered = double.expect_reply(msg_id) if reply else None
    dropped = time.monotonic()
    double.drop()
    await double.push(frame)  # kept in the backlog until the client is back
    try:
        async with asyncio.timeout(30):
            acked = await ack - dropped
            replied = (await answered - dropped) if answered is not None else None
    except TimeoutError:
        raise BenchError("no event answered within 30 s of a dropped stream socket") from None
    return acked, replied


async def run(ctx: Context) -> list[Row]:
    rounds = ctx.pick(5, 1)
    double = await DingTalkDouble().start()
    model = await instant_model().start()
    try:
        async with reference(ctx.cores, ctx.workdir, "dingtalk", "--upstream", double.api_base):
            ref = [(await _once(double, f"ref{i}", reply=False))[0] for i in range(rounds)]
        async with gateway_for(ctx, model.url + "/v1", Channels(dingtalk=double), name="gateway-recovery"):
            results = [await _once(double, f"gw{i}", reply=True) for i in range(rounds)]
    finally:
        await model.stop()
        await double.stop()
    ref_worst = max(ref)
    replies = [r for _, r in results if r is not None]
    acks = [a for a, _ in results]
    note = (
        f"worst of {rounds} drops (TCP closed without a close frame); "
        f"median {statistics.median(replies):.2f} s; "
        f"ACK of that event after {statistics.median(acks):.2f} s median. The gateway's first reconnect "
        "waits a jittered 0.5-1 s backoff by design (the reference reconnects at once)"
    )
    return [
        Row(S6, "bare Stream client: drop -> next event ACKed", ref_worst, "s", note=f"worst of {rounds}"),
        Row(
            S6,
            "gateway: drop -> next event answered",
            max(replies),
            "s",
            "bare client",
            ref_worst,
            "< 2 s",
            at_most(2.0),
            note=note,
        ),
    ]
