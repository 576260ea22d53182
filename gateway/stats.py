"""In-process rolling statistics for the status page and the alert notifier.

Prometheus keeps the authoritative counters for scraping; this keeps what a glance needs without
a Prometheus server: counts per wall-clock minute for the last hour (fixed rings), the latest
latency samples for percentiles (a bounded window), and totals. `Metrics` feeds both from the same
calls. Memory is fixed: nothing here grows with users, conversations or time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

MINUTES = 60  # the per-minute series cover the last hour
SAMPLES = 1024  # latency samples kept for percentiles (p99 ~ the 10th largest)
SAMPLE_MAX_AGE = 3600.0  # samples older than an hour do not count


class MinuteCounter:
    """Events per wall-clock minute for the last `MINUTES` minutes, in a fixed ring."""

    __slots__ = ("_count", "_minute")

    def __init__(self) -> None:
        self._minute = [-1] * MINUTES
        self._count = [0] * MINUTES

    def add(self, now: float, n: int = 1) -> None:
        minute = int(now // 60)
        slot = minute % MINUTES
        if self._minute[slot] != minute:  # the slot still holds an hour-old minute: reuse it
            self._minute[slot] = minute
            self._count[slot] = 0
        self._count[slot] += n

    def series(self, now: float) -> list[int]:
        """Counts for the last `MINUTES` minutes, oldest first; the last one is the current minute."""
        last = int(now // 60)
        out = []
        for minute in range(last - MINUTES + 1, last + 1):
            slot = minute % MINUTES
            out.append(self._count[slot] if self._minute[slot] == minute else 0)
        return out

    def recent(self, now: float, minutes: int) -> int:
        """Sum over the current minute and the `minutes - 1` before it."""
        return sum(self.series(now)[-minutes:])


@dataclass(frozen=True, slots=True)
class Percentiles:
    count: int
    p50: float | None
    p95: float | None
    p99: float | None


class LatencyWindow:
    """The most recent `SAMPLES` observations (seconds); percentiles by nearest rank."""

    __slots__ = ("_samples",)

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=SAMPLES)

    def observe(self, now: float, seconds: float) -> None:
        self._samples.append((now, seconds))

    def percentiles(self, now: float) -> Percentiles:
        values = sorted(v for t, v in self._samples if now - t <= SAMPLE_MAX_AGE)
        if not values:
            return Percentiles(0, None, None, None)

        def rank(q: float) -> float:
            return values[max(0, math.ceil(q * len(values)) - 1)]

        return Percentiles(len(values), rank(0.50), rank(0.95), rank(0.99))


class Stats:
    """Rolling counters plus change notification (the status page's live feed and the alert
    evaluator wait on an `asyncio.Event` instead of polling)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.received = MinuteCounter()
        self.replied = MinuteCounter()
        self.failed = MinuteCounter()  # replies that were errors, not answers or notices
        self.overhead = LatencyWindow()
        self.model_time = LatencyWindow()
        self.received_total = 0
        self.replies_total = 0
        self.failed_total = 0
        self.model_calls = 0
        self.model_failures = 0
        self.model_failure_streak = 0
        self.last_model_error = ""
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self._listeners: set[asyncio.Event] = set()

    # -- recording (called through `Metrics`) ------------------------------------------------
    def message_received(self) -> None:
        self.received.add(self.clock())
        self.received_total += 1
        self._changed()

    def reply(self, failed: bool) -> None:
        now = self.clock()
        self.replied.add(now)
        self.replies_total += 1
        if failed:
            self.failed.add(now)
            self.failed_total += 1
        self._changed()

    def model_call(self, seconds: float, error: str | None, settled: bool = True) -> None:
        self.model_calls += 1
        self.model_time.observe(self.clock(), seconds)
        if error is not None:
            self.model_failures += 1
            self.model_failure_streak += 1
            self.last_model_error = error
        elif settled:
            self.model_failure_streak = 0
        self._changed()

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def gateway_overhead(self, seconds: float) -> None:
        self.overhead.observe(self.clock(), seconds)

    def cache_lookup(self, hit: bool) -> None:
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1

    # -- derived -----------------------------------------------------------------------------
    def error_ratio(self, minutes: int) -> tuple[float | None, int]:
        """(failed / replies, replies) over the last `minutes` minutes; None without replies."""
        now = self.clock()
        total = self.replied.recent(now, minutes)
        if not total:
            return None, 0
        return self.failed.recent(now, minutes) / total, total

    @property
    def cache_hit_rate(self) -> float | None:
        lookups = self.cache_hits + self.cache_misses
        return self.cache_hits / lookups if lookups else None

    # -- change notification -----------------------------------------------------------------
    def add_listener(self, event: asyncio.Event) -> None:
        self._listeners.add(event)

    def remove_listener(self, event: asyncio.Event) -> None:
        self._listeners.discard(event)

    def _changed(self) -> None:
        for event in self._listeners:
            event.set()
