"""In-process store for tests and single-process runs without durability (`memory://`)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

from ..messages import InboundMessage
from .base import CardRecord, OutboxEntry, Turn, UsageCount, top_usage, trim_turns


class MemoryStore:
    backend = "memory"
    shared = False

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._inbox: OrderedDict[str, InboundMessage] = OrderedDict()
        self._context: dict[str, tuple[float, list[Turn]]] = {}
        self._sessions: dict[str, tuple[float, str]] = {}  # context key -> (expires, backend's id)
        self._cache: dict[str, tuple[float, str]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}
        self._cards: dict[str, CardRecord] = {}
        self._usage: dict[tuple[str, str, str], tuple[float, UsageCount]] = {}  # (day, kind, subject)
        self._outbox: dict[str, tuple[float | None, OutboxEntry]] = {}  # id -> (forgotten at once done, entry)
        self._outbox_keys: dict[str, str] = {}  # idempotency key -> entry id
        self._next_sweep = 0.0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def _sweep(self, now: float) -> None:
        """Expire TTL'd entries at most once a second, so memory stays bounded."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        self._seen = {k: t for k, t in self._seen.items() if t > now}
        self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._context = {k: v for k, v in self._context.items() if v[0] > now}
        self._sessions = {k: v for k, v in self._sessions.items() if v[0] > now}
        # A bucket untouched for a minute has refilled completely: same as no entry.
        self._buckets = {k: v for k, v in self._buckets.items() if v[1] > now - 60.0}
        self._usage = {k: v for k, v in self._usage.items() if v[0] > now}
        for entry_id in [i for i, (until, _) in self._outbox.items() if until is not None and until <= now]:
            self._outbox_forget(entry_id)

    async def claim(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        self._sweep(now)
        expires = self._seen.get(key)
        if expires is not None and expires > now:
            return False
        self._seen[key] = now + ttl
        return True

    async def admit(self, message: InboundMessage, ttl: float) -> bool:
        if not await self.claim(message.dedup_key, ttl):
            return False
        self._inbox[message.request_id] = message
        return True

    async def inbox_done(self, message: InboundMessage) -> None:
        self._inbox.pop(message.request_id, None)

    async def inbox_pending(self, conversation: str | None = None) -> list[InboundMessage]:
        return [
            m
            for m in self._inbox.values()
            if conversation is None or m.conversation_key == conversation
        ]

    async def context(self, conversation: str) -> list[Turn]:
        entry = self._context.get(conversation)
        if entry is None or entry[0] <= time.monotonic():
            return []
        return list(entry[1])

    async def append_turns(
        self, conversation: str, turns: list[Turn], max_turns: int, max_chars: int, idle_ttl: float
    ) -> None:
        history = await self.context(conversation)
        kept = trim_turns(history + turns, max_turns, max_chars)
        self._context[conversation] = (time.monotonic() + idle_ttl, kept)

    async def reset(self, conversation: str) -> None:
        self._context.pop(conversation, None)
        self._sessions.pop(conversation, None)

    async def backend_session(self, key: str) -> str | None:
        entry = self._sessions.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    async def set_backend_session(self, key: str, session: str, ttl: float) -> None:
        self._sessions[key] = (time.monotonic() + ttl, session)

    async def cache_get(self, key: str) -> str | None:
        entry = self._cache.get(key)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    async def cache_put(self, key: str, value: str, ttl: float) -> None:
        self._cache[key] = (time.monotonic() + ttl, value)

    async def take_token(self, bucket: str, per_minute: int) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.get(bucket, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * per_minute / 60.0)
        if tokens < 1.0:
            self._buckets[bucket] = (tokens, now)
            return False
        self._buckets[bucket] = (tokens - 1.0, now)
        return True

    async def add_usage(
        self, day: str, subjects: Sequence[tuple[str, str]], tokens: int, estimated: bool, ttl: float
    ) -> None:
        now = time.monotonic()
        self._sweep(now)
        added = UsageCount(1, tokens, tokens if estimated else 0)
        for kind, subject in subjects:
            key = (day, kind, subject)
            _, count = self._usage.get(key, (0.0, UsageCount()))
            self._usage[key] = (now + ttl, count + added)

    async def usage(self, days: Sequence[str], kind: str, subject: str) -> UsageCount:
        now = time.monotonic()
        total = UsageCount()
        for day in days:
            entry = self._usage.get((day, kind, subject))
            if entry is not None and entry[0] > now:
                total += entry[1]
        return total

    async def usage_top(self, day: str, kind: str, limit: int) -> list[tuple[str, UsageCount]]:
        now = time.monotonic()
        rows = [(k[2], v[1]) for k, v in self._usage.items() if k[0] == day and k[1] == kind and v[0] > now]
        return top_usage(rows, limit)

    async def outbox_add(self, entry: OutboxEntry, keep: float) -> OutboxEntry:
        now = time.monotonic()
        self._sweep(now)
        key = entry.idempotency_key
        kept_id = self._outbox_keys.get(key) if key else None
        existing = self._outbox_kept(kept_id, now) if kept_id else None
        existing = existing or self._outbox_kept(entry.id, now)  # the same id again: already written
        if existing is not None:
            return existing
        self._outbox[entry.id] = (None, entry)
        if key:
            self._outbox_keys[key] = entry.id
        return entry

    async def outbox_get(self, entry_id: str) -> OutboxEntry | None:
        return self._outbox_kept(entry_id, time.monotonic())

    async def outbox_update(self, entry: OutboxEntry, keep: float) -> None:
        now = time.monotonic()
        if self._outbox_kept(entry.id, now) is not None:
            self._outbox[entry.id] = (now + keep if entry.done else None, entry)

    async def outbox_queued(self, limit: int = 1000) -> list[OutboxEntry]:
        queued = [entry for until, entry in self._outbox.values() if until is None]
        return sorted(queued, key=lambda e: e.created_at)[: max(0, limit)]

    def _outbox_kept(self, entry_id: str, now: float) -> OutboxEntry | None:
        """The entry unless it is unknown or its keep time has passed (then it is forgotten)."""
        found = self._outbox.get(entry_id)
        if found is None:
            return None
        until, entry = found
        if until is not None and until <= now:
            self._outbox_forget(entry_id)
            return None
        return entry

    def _outbox_forget(self, entry_id: str) -> None:
        _, entry = self._outbox.pop(entry_id)
        if self._outbox_keys.get(entry.idempotency_key) == entry_id:
            del self._outbox_keys[entry.idempotency_key]

    async def card_open(self, record: CardRecord) -> None:
        self._cards[record.key] = record

    async def card_update(self, record: CardRecord) -> None:
        if record.key in self._cards:
            self._cards[record.key] = record

    async def card_done(self, key: str) -> None:
        self._cards.pop(key, None)

    async def cards_open(self) -> list[CardRecord]:
        return sorted(self._cards.values(), key=lambda c: c.opened_at)
