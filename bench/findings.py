"""Why a missed target was missed and what would close the gap, from the hot-path costs that
scenario 8 measures in the same run."""

from __future__ import annotations

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


def _intake(rows: Sequence[Row]) -> str:
    return (
        "Per request the gateway spends about twice the bare handler's CPU (compare the rates and how busy "
        "the server core was). aiohttp's own HTTP handling is most of the bare handler's cost; the gateway "
        f"adds DingTalk parse_message {_us(rows, 'DingTalk parse_message')} (incl. a uuid4 request id, "
        f"{_us(rows, 'uuid.uuid4')}), StatusTracker.event_seen {_us(rows, 'StatusTracker.event_seen')} "
        f"(an attribute write), Dispatcher.submit {_us(rows, 'Dispatcher.submit(), memory')} "
        f"(memory store), Counter.labels().inc() {_us(rows, 'Counter.labels')} per metric family touched, "
        "a task per new conversation, and with SQLite InboundMessage.to_dict "
        f"{_us(rows, 'InboundMessage.to_dict')} (hand-written; dataclasses.asdict took 24-34 µs) "
        "plus the group commit, whose writer thread shares the core; the rest is spread thinly over "
        "aiohttp's middleware and response-signal machinery (one middleware, a security-header hook) and "
        "the dispatcher's per-conversation task. What would close part of the gap: request ids from a "
        "per-process counter, parsing the callback body without building the SDK's ChatbotMessage "
        "first, and running the webhook on a second process (several instances on one store)."
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
            row.gap = _intake(rows)
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
        elif row.scenario.startswith("4."):
            row.gap = (
                "The model time is 1 s, and the relay reference in the same row, which does nothing but "
                "relay, already needs more than 2 s on one core; the gateway's extra time is CPU per answer "
                "on that one core: per answer a context read and a cache lookup (SQLite reader thread), the "
                "context write and the inbox delete (group commits), the reply POST, metrics and the summary "
                "log line, about 0.5 ms more than the relay per answer. The connector is no longer a limit "
                "(sized 2 x [dispatcher] max_concurrency + 64; with limit 200 this took 11 s), and an "
                "unshared store (SQLite, memory) skips the lease and inbox re-read (this took 4.06 s before). "
                "What would close the gap: read context and cache in one query, and run a second instance on "
                "Redis for a second core."
            )
