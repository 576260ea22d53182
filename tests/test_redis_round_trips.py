"""What one answered message costs on Redis, counted by the server (INFO): round trips (read events
on the gateway's connections) and commands (those a Lua script runs included). Each round trip
through redis-py's asyncio client costs the gateway ~0.2 ms of CPU, so these counts are its
Redis overhead per answer, free of machine noise (docs/state.md, "Round trips per answer")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.keys import DISPATCHER
from tests.conftest import make_config
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.openai import OpenAIDouble
from tests.helpers import DingTalkEnv, dingtalk_section, serve

pytestmark = pytest.mark.redis

MESSAGES = 20
ROUND_TRIPS = 11  # per answered message, default config (rate limits and cache on)
COMMANDS = 55  # those Lua scripts run included


async def _counters(client: aioredis.Redis) -> tuple[int, dict[str, int]]:
    """(read events, calls per command) so far; the INFO calls themselves are two reads."""
    stats = await client.info("stats")
    commands = await client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in commands.items()}
    return int(stats["total_reads_processed"]), calls


async def test_one_answer_costs_few_round_trips(
    aiohttp_server: Callable[..., Any],
    gateway: Callable[..., Any],
    openai_double: tuple[OpenAIDouble, str],
    redis_url: str,
) -> None:
    double = DingTalkDouble()
    await serve(aiohttp_server, double)
    _, model_url = openai_double
    config = make_config(
        dingtalk=dingtalk_section(double), model={"base_url": model_url}, store={"url": redis_url}
    )
    env = DingTalkEnv(double, await gateway(config))
    await env.connected()
    client = aioredis.Redis.from_url(redis_url)
    try:
        dispatcher = env.client.app[DISPATCHER]
        await double.push(double.message("warm up", staff_id="warm"))  # scripts loaded
        await env.answers(1)
        await dispatcher.wait_idle()  # its usage and turns written, its lease released
        reads, before = await _counters(client)
        for n in range(MESSAGES):  # one at a time, each answer done before the next
            await double.push(double.message(f"question {n}", staff_id=f"s{n}"))
            await env.answers(n + 2)
            await dispatcher.wait_idle()
        reads_after, after = await _counters(client)
    finally:
        await client.aclose()
    round_trips = (reads_after - reads - 2) / MESSAGES
    commands = {name: (calls - before.get(name, 0)) / MESSAGES for name, calls in after.items()}
    commands = {name: n for name, n in commands.items() if n and name != "info"}
    # admit; lease + pending; 2 rate-limit buckets; context; cache read; usage; cache write;
    # context swap; inbox done; lease release (15 round trips before issue 21).
    # Background looks (the outbox every 5 s, orphans every 30 s) add 1/MESSAGES each if they fall
    # into the run: half a round trip of slack per answer, one more per answer fails.
    assert round_trips <= ROUND_TRIPS + 0.5, commands
    assert sum(commands.values()) <= COMMANDS + 0.5, commands
    assert "watch" not in commands, commands  # no transaction holding a connection over round trips
