"""Why a missed target was missed and what would close the gap, from the hot-path costs that
scenario 8 measures in the same run."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .report import Row


def _value(rows: Sequence[Row], prefix: str) -> float | None:
    return next((r.value for r in rows if r.name.startswith(prefix) and r.value is not None), None)


def _us(rows: Sequence[Row], prefix: str) -> str:
    value = _value(rows, prefix)
    return f"{value:,.0f} µs" if value is not None else "n/a"


def _ratio(rows: Sequence[Row], a: str, b: str) -> float | None:
    va, vb = _value(rows, a), _value(rows, b)
    return va / vb if va and vb else None


def _per_request_us(rows: Sequence[Row], name: str) -> float | None:
    """CPU µs per request of a scenario 1 row: how busy the server core was / the rate."""
    row = next((r for r in rows if r.name == name and r.value), None)
    busy = re.search(r"server core busy (\d+)%", row.note) if row is not None else None
    if row is None or row.value is None or busy is None:
        return None
    return int(busy.group(1)) / 100 / row.value * 1e6


def _intake(rows: Sequence[Row], row: Row | None = None) -> str:
    ours = _per_request_us(rows, row.name) if row is not None else None
    reference = "bare aiohttp handler on uvloop" if row is not None and "uvloop" in row.name else None
    bare = _per_request_us(rows, reference or "bare aiohttp handler (ceiling)")
    cpu = (
        f"Per request the gateway's core spent {ours:,.0f} µs of CPU, the bare handler's {bare:,.0f} µs "
        f"(busy / rate, same loop). "
        if ours and bare
        else ""
    )
    return (
        cpu + "The bare handler's cost is aiohttp's own (parse the request, read the body, build and write "
        "the response) plus the HMAC and the JSON parse, and the gateway pays all of it too. On top, per "
        f"request (scenario 8, same run): DingTalk parse_message {_us(rows, 'DingTalk parse_message')} "
        "(the body's dict read once, no SDK ChatbotMessage any more; most of what is left is building the "
        f"frozen 18-field InboundMessage), a request id {_us(rows, 'new_request_id')} (was a uuid4, "
        f"{_us(rows, 'uuid.uuid4')}), Dispatcher.submit {_us(rows, 'Dispatcher.submit(), memory')} on the "
        "memory store (dedup + inbox + enqueue, a gauge, a counter, the status counters), and with SQLite "
        f"InboundMessage.to_dict {_us(rows, 'InboundMessage.to_dict')} plus the group commit, whose SQL (two "
        "B-tree inserts into dedup, three into the inbox and its indexes: 15-30 µs a message) runs on the "
        "writer thread but on the same core; then three middlewares (errors + metrics, the admin guard, the "
        "send-API guard) plus aiohttp's own per-app one, and the security-header hook on every response. "
        "docs/benchmarks.md (Profiles) has the py-spy breakdown. uvloop (its own row) takes a part off "
        "aiohttp's share, which the bare handler has as well, so the ratio hardly moves. "
        "What would close the gap on this stack: a second process (several "
        "instances on one Redis store), one middleware instead of three, and a "
        "lighter message type than a frozen dataclass; a ratio of 0.7 leaves about 40 % of the bare "
        "handler's own cost for dedup, a durable write and the dispatcher, which Python does not reach."
    )


def _answer_cpu(rows: Sequence[Row], name: str) -> float | None:
    """µs of server CPU per answer from a scenario 12 row's note."""
    row = next((r for r in rows if r.scenario.startswith("12.") and name in r.name), None)
    found = re.search(r"([\d,]+) µs of CPU per answer", row.note) if row is not None else None
    return float(found.group(1).replace(",", "")) if found else None


def _per_answer(rows: Sequence[Row]) -> str:
    """Where an answered message's CPU goes, from scenario 12 of the same run."""
    relay, sqlite, memory = (_answer_cpu(rows, n) for n in ("relay", "sqlite store", "memory store"))
    if relay is None or sqlite is None or memory is None:
        return "Scenario 12 (answers per core) did not run, so the per-answer split is not known here. "
    return (
        f"Per answered message (scenario 12, same run) the gateway spends {sqlite:,.0f} µs of CPU on the "
        f"SQLite store and {memory:,.0f} µs on the memory store, the bare relay {relay:,.0f} µs. The relay's "
        "part is the same code in both: the frame's parse and ACK, the model request and the reply POST "
        f"through aiohttp's client. Of the rest, ~{sqlite - memory:,.0f} µs is the durable state (about a "
        "dozen SQLite statements an answer on the writer and reader threads, on the same core: the admit's "
        "dedup and inbox rows, the context read, the cache lookup, the usage counters, the cache and "
        f"context writes, the inbox delete), and ~{memory - relay:,.0f} µs the gateway's own Python work: "
        "the dispatcher and the 21 responder steps, the cyclic collector walking every answer's objects "
        "(~7 % of the CPU since the collector is tuned, ~20 % before), the summary log line (~3 %), "
        "metrics and status counters, markdown rendering and the image scan of the answer "
        "(docs/benchmarks.md, Profiles). No single step is left that is worth more than a few per cent. "
    )


def _high_rate(rows: Sequence[Row], row: Row) -> str:
    """The 1,000 msg/s overhead row: CPU per answered message against the relay's."""
    noted = next((r for r in rows if r.scenario == row.scenario and "1,000 msg/s" in r.name and r.note), None)
    busy = re.findall(r"server core busy (\d+)%", noted.note) if noted is not None else []
    load = (
        f"The server core was {busy[0]}% busy at 1,000 msg/s ({int(busy[0]) * 10} µs of CPU per answered "
        f"message; the relay: {busy[1]}%, {int(busy[1]) * 10} µs). "
        if len(busy) >= 2
        else ""
    )
    return (
        load + "The overhead is queueing for the one core, not a slow step: past about 70 % busy every "
        "message waits behind the others, so 1,000 msg/s on one core needs at most ~0.7 ms of CPU per "
        "answered message. " + _per_answer(rows) + "What would close it: a second instance on a second "
        "core (scenario 11), or an answer path without Python's per-object costs."
    )
def _scale_out(rows: Sequence[Row], row: Row) -> str:
    """Scenario 11's two instances: where the cores went, and the scaling per gateway CPU-second."""
    busy = re.search(r"gateway cores busy (\d+)% and (\d+)%", row.note)
    waited = re.search(r"waiting for a CPU (\d+)% and (\d+)%", row.note)
    redis = re.search(r"Redis (\d+)%", row.note)
    bench = re.search(r"bench process\) (\d+)%", row.note)
    helpers = sum(int(v) for v in re.findall(r"(?:wrk|nginx) (\d+)%", row.note))
    efficiency = next((r for r in rows if r.name == f"{row.name}, answers per gateway CPU-second"), None)
    split = (
        f"The two gateways kept their cores {busy.group(1)}% and {busy.group(2)}% busy; on the second "
        f"instance's core Redis took {redis.group(1)}% of a core, the doubles and the frame pump (the bench "
        f"process) {bench.group(1)}%" + (f", wrk and nginx {helpers}%" if helpers else "") + ". "
        + (
            f"The gateways waited for a CPU {waited.group(1)}% and {waited.group(2)}% of the time (work "
            "outside the gateway on their cores: the second's load side, and on a shared machine "
            "other processes). "
            if waited
            else ""
        )
        if busy and redis and bench
        else ""
    )
    per_cpu = (
        f"Per gateway CPU-second two instances answered {efficiency.ratio:.2f}x what one did "
        f"({efficiency.value:,.0f} against {efficiency.ref_value:,.0f} answers, "
        f"{1000 / efficiency.ref_value:.1f} ms of gateway CPU per answer with one instance): "
        if efficiency is not None and efficiency.ratio is not None and efficiency.ref_value
        else ""
    )
    below = (
        "Below 0.9, as here, part of the gap is in the gateways themselves or the CPU they waited for "
        "(other work on their cores), not only the missing core. "
        if efficiency is not None and efficiency.ratio is not None and efficiency.ratio < 0.9
        else ""
    )
    return (
        split + per_cpu + "a per-CPU ratio near 1 means sharing one Redis costs the instances nothing, and "
        "the gap is the core the second instance shares with the load side: a 2-core machine has no third "
        "core for Redis, the doubles and the load generator (one instance had a core to itself and the rest "
        "had the other). Were each instance's core its own, two would answer about twice that per-CPU ratio "
        "times one instance's rate. " + below + _redis_cost(rows, row)
    )


def _redis_cost(rows: Sequence[Row], row: Row) -> str:
    sqlite = next((r for r in rows if r.scenario == row.scenario and "SQLite store" in r.name), None)
    commands = re.search(r"([\d.]+) Redis commands per answered message", row.note)
    cost = (
        f"Per answer one instance on Redis spends {sqlite.ratio:.1f}x the gateway CPU it spends on "
        "SQLite (the SQLite row, same load, same run)"
        if sqlite is not None and sqlite.ratio
        else "Per answer the Redis store costs more gateway CPU than SQLite"
    )
    return (
        cost + (f", with {commands.group(1)} Redis commands per answered message" if commands else "")
        + " (those inside Lua scripts counted), in 11 round trips (claim + inbox, the lease with the "
        "conversation's pending messages, the two rate-limit buckets, context, cache, the usage counters, "
        "the cache write, the context write, inbox done, lease release; docs/state.md), every one through "
        "redis-py's asyncio client costing ~100-200 µs of CPU on this machine. What would take a few more "
        "off: inbox done with the lease release, both buckets in one script, the cache write with the "
        "context write."
    )


def explain(rows: Sequence[Row]) -> None:
    """Fill `gap` of every missed row from what this run measured."""
    for row in rows:
        if row.met is not False:
            continue
        if row.scenario.startswith("1.") and row.name.endswith("vs FastAPI"):
            ratio = _ratio(rows, "FastAPI + uvicorn handler", "bare aiohttp handler")
            row.gap = "The same per-request costs as the row above." + (
                f" In this run 2.5x FastAPI = {2.5 * ratio:.2f}x bare (FastAPI ran on uvloop + httptools): "
                "this target asks for nearly the speed of a handler that stores nothing."
                if ratio
                else ""
            )
        elif row.scenario.startswith("1."):
            row.gap = _intake(rows, row)
        elif row.scenario.startswith("2.") and "sqlite" in row.name:
            row.gap = (
                "Stream sessions hand each message frame to gateway/intake.py OrderedIntake (concurrent "
                "across conversations, in order within one, <= 1024 in flight), so submits share the "
                f"group commit: {_us(rows, 'Dispatcher.submit(), SQLite, all at once')} per message "
                f"against {_us(rows, 'Dispatcher.submit(), SQLite, one at a time')} one at a time. A miss "
                "here is CPU on one core: " + _intake(rows)
            )
        elif row.scenario.startswith("2."):
            row.gap = "Intake is CPU-bound on one core. " + _intake(rows)
        elif row.scenario.startswith("3.") and "1,000 msg/s" in row.name:
            row.gap = _high_rate(rows, row)
        elif row.scenario.startswith("11."):
            row.gap = _scale_out(rows, row)
        elif row.scenario.startswith("4."):
            row.gap = (
                "The model time is 1 s; the rest of both times is CPU on one core, 2,000 answers in a row, so "
                "the ratio is the one of CPU per answer (the same run's scenario 12) diluted by the model's "
                "second. " + _per_answer(rows) + "The connector is no longer a limit (sized 2 x [dispatcher] "
                "max_concurrency + 64), an unshared store (SQLite, memory) skips the lease and inbox re-read, "
                "and a burst's reads share the reader thread's turns. What would close the gap: a second "
                "instance for a second core (scenario 11)."
            )
        elif row.scenario.startswith("12."):
            row.gap = (
                _per_answer(rows) + "At 0.5x the gateway would have as much again as the relay's whole cost "
                "for everything it adds, the durable state alone takes about half of that."
            )
