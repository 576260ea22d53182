"""Why a missed target was missed and what would close the gap, from profiles (py-spy, see
bench/profile.py) and the hot-path costs that scenario 8 measures in the same run."""

from __future__ import annotations

from collections.abc import Sequence

from .report import Row


def _value(rows: Sequence[Row], prefix: str) -> float | None:
    return next((r.value for r in rows if r.name.startswith(prefix) and r.value is not None), None)


def _us(rows: Sequence[Row], prefix: str) -> str:
    value = _value(rows, prefix)
    return f"{value:.0f} µs" if value is not None else "n/a"


def explain(rows: Sequence[Row]) -> None:
    """Fill `gap` of every missed row from what this run measured."""
    costs = (
        f"per message: DingTalk parse_message {_us(rows, 'DingTalk parse_message')} (it includes a uuid4 request id, "
        f"{_us(rows, 'uuid.uuid4')}), StatusTracker.event_seen {_us(rows, 'StatusTracker.event_seen')} "
        f"(dataclasses.replace), Dispatcher.submit {_us(rows, 'Dispatcher.submit(), memory')} on the memory store, "
        f"Counter.labels().inc() {_us(rows, 'Counter.labels')} for each of several metric families"
    )
    fixes = (
        "request ids from a per-process counter instead of uuid4; event_seen as a plain attribute write (or at most "
        "once a second); labelled metric children looked up once and kept; for the SQLite store a hand-written "
        f"InboundMessage.to_dict (dataclasses.asdict costs {_us(rows, 'InboundMessage.to_dict')} per message and was "
        "~12 % of the busy samples) and claim + inbox_add as ONE group-commit write instead of two"
    )
    for row in rows:
        if row.met is not False:
            continue
        if row.scenario.startswith("1.") and "intake only" in row.name:
            ratio_fastapi = _ratio(rows, "FastAPI + uvicorn handler", "bare aiohttp handler")
            row.gap = (
                "The gateway's intake costs about twice the bare handler's CPU per request. aiohttp's own request "
                "handling is most of the bare handler's time, and the gateway adds, " + costs + ". What would close "
                "(part of) it: " + fixes + "."
                + (f" Note that 2.5x FastAPI equals {2.5 * ratio_fastapi:.2f}x bare in this run (FastAPI ran on uvloop + "
                   "httptools): both targets together ask the gateway to be as fast as a handler that stores nothing."
                   if ratio_fastapi and "FastAPI" in row.name else "")
            )  # fmt: skip
        elif row.scenario.startswith("2.") and "sqlite" in row.name:
            row.gap = (
                "The Stream session awaits dispatcher.submit() for each frame before it reads the next one, and with "
                "the SQLite store a submit is two group commits in turn (claim, then inbox_add: "
                f"{_us(rows, 'Dispatcher.submit(), SQLite, one at a time')} per message one at a time versus "
                f"{_us(rows, 'Dispatcher.submit(), SQLite, all at once')} when they overlap). Throughput is then "
                "1 / commit latency with the core mostly idle. To close: handle each CALLBACK frame in its own tracked "
                "task (bounded, ACK when its submit returns; order per conversation is the dispatcher's job) so one "
                "commit carries many messages, and make claim + inbox one write."
            )
        elif row.scenario.startswith("2."):
            row.gap = "Intake is CPU-bound on one core; " + costs + ". To close: " + fixes + "."
        elif row.scenario.startswith("3."):
            row.gap = (
                "At 200 msg/s with a 1 s model about 200 model calls are in flight, plus the reply POSTs, and the "
                "gateway's shared ClientSession (gateway/app.py) has TCPConnector(limit=200): requests wait for a free "
                "connection. Measured while building the bench (web chat path, same machine): limit 200 -> p50 74 ms, "
                "p99 267 ms at 24 % CPU; limit=0 -> p50 1.5 ms, p99 12.6 ms. To close: size the connector from "
                "[dispatcher] max_concurrency (e.g. 2 x max_concurrency + 64) or use limit=0."
            )
        elif row.scenario.startswith("4."):
            row.gap = (
                "2,000 model calls at once queue behind the connector limit of 200 in gateway/app.py: 2000/200 x 1 s "
                "~ 10 s. Measured while building the bench: 11.0 s with limit 200, 4.6 s with limit=0 (relay 3.0 s on "
                "the same noisy machine). To close: the connector fix of scenario 3; the rest is opening 2,000 "
                "connections to the model at once on one core."
            )


def _ratio(rows: Sequence[Row], a: str, b: str) -> float | None:
    va, vb = _value(rows, a), _value(rows, b)
    return va / vb if va and vb else None
