"""Scenarios 5 (RSS idle with the channels connected, and after 10,000 conversations x 20 turns)
and 7 (`python run.py` to /readyz 200)."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time

from .context import BenchError, Context, channel_doubles, gateway_for
from .doubles import ANSWER, instant_model
from .drivers import Driver, WebChatDriver
from .report import Row, at_most
from .servers import reference

S5 = "5. Memory"
S7 = "7. Startup"
STORES = (("memory", "memory store"), ("sqlite", "SQLite store"))
_salt = itertools.count()


def peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def converse(
    driver: Driver, total: int, turns: int, concurrency: int, budget: float
) -> tuple[int, int, float]:
    """`total` conversations of `turns` question/answer turns, `concurrency` conversations at a time,
    each turn waiting for its answer (as a person does). Stops early at `budget` seconds."""
    tag = f"mem{next(_salt)}x"
    numbers = iter(range(total))
    counts = [0, 0]  # conversations finished, messages answered
    started = time.monotonic()
    deadline = started + budget

    async def worker() -> None:
        for i in numbers:
            if time.monotonic() > deadline:
                return
            conversation = f"{tag}{i:06d}"
            await driver.open([conversation])
            for turn in range(turns):
                _, reply = await driver.send(
                    conversation, f"Question {turn} in conversation {i}: how do I file my travel expenses?"
                )
                try:
                    await asyncio.wait_for(reply, 30)
                except TimeoutError:
                    raise BenchError(f"no answer within 30 s in conversation {conversation}") from None
                counts[1] += 1
            await driver.close_some([conversation])
            counts[0] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts[0], counts[1], time.monotonic() - started


async def memory(ctx: Context) -> list[Row]:
    total, turns, concurrency = ctx.pick((10_000, 20, 200), (30, 20, 30))
    budget = ctx.pick(300.0, 60.0)
    rows: list[Row] = []
    model = await instant_model().start()
    try:
        for store, label in STORES:
            name = f"after {total:,} conversations x {turns} turns, {label}"
            async with channel_doubles() as channels:
                proc = gateway_for(ctx, model.url + "/v1", channels, store, name=f"gateway-memory-{store}")
                async with proc:
                    await asyncio.sleep(ctx.pick(1.0, 0.3))
                    idle = proc.rss_mb()
                    # Web chat, not DingTalk Stream: 200 web chat sockets are 200 independent senders
                    # with their own flow control; scenario 2 measures the Stream path.
                    driver = WebChatDriver(proc.url, proc.admin_headers())
                    try:
                        done, messages, elapsed = await converse(driver, total, turns, concurrency, budget)
                    finally:
                        await driver.close()
                    await asyncio.sleep(ctx.pick(1.0, 0.3))
                    rss, peak = proc.rss_mb(), peak_mb(proc.pid)
                    db_mb = (
                        sum(f.stat().st_size for f in proc.state_dir.glob("*.sqlite3*")) / 2**20
                        if proc.state_dir
                        else 0.0
                    )
            held = (
                "everything is still held in the process: dedup keys (TTL 600 s), model cache entries "
                f"(TTL 300 s), {turns}-turn contexts"
                if store == "memory"
                else f"dedup keys, cache and contexts live in the SQLite file ({db_mb:.0f} MB incl. WAL)"
            )
            bounded = (
                "" if done == total else f" STOPPED at the {budget:.0f} s bound after {done:,} conversations;"
            )
            note = (
                f"{messages:,} messages answered in {elapsed:.0f} s ({messages / elapsed:,.0f}/s) "
                f"over {driver.path}, "
                f"{concurrency} conversations at a time (channels connected: {channels.names()});{bounded} "
                f"peak RSS {peak:.0f} MB; {held}; answers {len(ANSWER)} characters"
            )
            rows.append(Row(S5, name, rss, "MB", "same process idle", idle, note=note))
    finally:
        await model.stop()
    return rows


async def startup(ctx: Context) -> list[Row]:
    rounds = ctx.pick(5, 1)
    ref_times, times = [], []
    ref_rss = rss = 0.0
    for _ in range(rounds):
        bare = reference(ctx.cores, ctx.workdir, "bare")
        ref_times.append(await bare.start())
        try:
            await asyncio.sleep(ctx.pick(1.0, 0.3))
            ref_rss = bare.rss_mb()
        finally:
            await bare.stop()
    model = await instant_model().start()
    try:
        async with channel_doubles() as channels:
            for _ in range(rounds):
                proc = gateway_for(ctx, model.url + "/v1", channels, name="gateway-startup")
                times.append(await proc.start())
                try:
                    await asyncio.sleep(ctx.pick(1.0, 0.3))
                    rss = proc.rss_mb()
                finally:
                    await proc.stop()
    finally:
        await model.stop()
    names = channels.names()
    return [
        Row(
            S7,
            f"python run.py -> /readyz 200 (channels: {names})",
            statistics.median(times),
            "s",
            "bare aiohttp app",
            statistics.median(ref_times),
            note=f"median of {rounds}; reference: `python -m bench.references bare` to its first 200",
        ),
        Row(
            S5,
            f"idle, channels: {names}",
            rss,
            "MB",
            "bare aiohttp app",
            ref_rss,
            "< 200 MB",
            at_most(200.0),
            note="RSS 1 s after /readyz 200 (0.3 s in --quick)",
        ),
    ]
