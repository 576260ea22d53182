"""In-process store for tests and single-process runs without durability (`memory://`)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

from ..messages import InboundMessage
from .base import CardRecord, OutboxEntry, Turn, UsageCount, top_usage, trim_turns

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class _Expiring(Generic[_K, _V]):
    """Entries with an expiry time, in the order they were last set. Each kind of entry is set with
    one TTL (the config's), so that is also the order they expire in, and `sweep` pops only the
    expired ones off the front: no pass over everything kept (with 100,000 dedup keys such a pass
    once a second was a 20 ms stall of every message in flight). An entry set with a shorter TTL
    than one before it leaves with that one, at most the longer TTL late; reads never see it."""

    def __init__(self) -> None:
        self._items: OrderedDict[_K, tuple[float, _V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: _K, now: float) -> _V | None:
        entry = self._items.get(key)
        return entry[1] if entry is not None and entry[0] > now else None

    def set(self, key: _K, value: _V, expires: float) -> None:
        self._items[key] = (expires, value)
        self._items.move_to_end(key)

    def pop(self, key: _K) -> None:
        self._items.pop(key, None)

    def live(self, now: float) -> list[tuple[_K, _V]]:
        return [(k, v) for k, (until, v) in self._items.items() if until > now]

    def sweep(self, now: float) -> None:
        items = self._items
        while items:
            key = next(iter(items))
            if items[key][0] > now:
                return
            del items[key]


class MemoryStore:
    backend = "memory"
    shared = False

    def __init__(self) -> None:
        self._seen: _Expiring[str, bool] = _Expiring()
        self._inbox: OrderedDict[str, InboundMessage] = OrderedDict()
        self._context: _Expiring[str, list[Turn]] = _Expiring()
        self._sessions: _Expiring[str, str] = _Expiring()  # context key -> backend's id
        self._cache: _Expiring[str, str] = _Expiring()
        # bucket -> (tokens, last take); a bucket untouched for a minute has refilled: same as none.
        self._buckets: _Expiring[str, tuple[float, float]] = _Expiring()
        self._cards: dict[str, CardRecord] = {}
        self._usage: _Expiring[tuple[str, str, str], UsageCount] = _Expiring()  # (day, kind, subject)
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
        """Drop what has expired, so memory stays bounded (`_Expiring.sweep`: the expired only)."""
        for kept in (self._seen, self._cache, self._context, self._sessions, self._buckets, self._usage):
            kept.sweep(now)
        if now >= self._next_sweep:  # the outbox is small and its keep times vary: a pass a second
            self._next_sweep = now + 1.0
            for entry_id in [i for i, (until, _) in self._outbox.items() if until is not None and until <= now]:
                self._outbox_forget(entry_id)

    async def claim(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        self._sweep(now)
        if self._seen.get(key, now):
            return False
        self._seen.set(key, True, now + ttl)
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
        return list(self._context.get(conversation, time.monotonic()) or ())

    async def append_turns(
        self, conversation: str, turns: list[Turn], max_turns: int, max_chars: int, idle_ttl: float
    ) -> None:
        history = await self.context(conversation)
        kept = trim_turns(history + turns, max_turns, max_chars)
        self._context.set(conversation, kept, time.monotonic() + idle_ttl)

    async def reset(self, conversation: str) -> None:
        self._context.pop(conversation)
        self._sessions.pop(conversation)

    async def backend_session(self, key: str) -> str | None:
        return self._sessions.get(key, time.monotonic())

    async def set_backend_session(self, key: str, session: str, ttl: float) -> None:
        self._sessions.set(key, session, time.monotonic() + ttl)

    async def cache_get(self, key: str) -> str | None:
        return self._cache.get(key, time.monotonic())

    async def cache_put(self, key: str, value: str, ttl: float) -> None:
        self._cache.set(key, value, time.monotonic() + ttl)

    async def take_token(self, bucket: str, per_minute: int) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.get(bucket, now) or (float(per_minute), now)
        tokens = min(float(per_minute), tokens + (now - last) * per_minute / 60.0)
        taken = tokens >= 1.0
        self._buckets.set(bucket, (tokens - 1.0 if taken else tokens, now), now + 60.0)
        return taken

    async def add_usage(
        self, day: str, subjects: Sequence[tuple[str, str]], tokens: int, estimated: bool, ttl: float
    ) -> None:
        now = time.monotonic()
        self._sweep(now)
        added = UsageCount(1, tokens, tokens if estimated else 0)
        for kind, subject in subjects:
            key = (day, kind, subject)
            count = self._usage.get(key, now) or UsageCount()
            self._usage.set(key, count + added, now + ttl)

    async def usage(self, days: Sequence[str], kind: str, subject: str) -> UsageCount:
        now = time.monotonic()
        total = UsageCount()
        for day in days:
            total += self._usage.get((day, kind, subject), now) or UsageCount()
        return total

    async def usage_top(self, day: str, kind: str, limit: int) -> list[tuple[str, UsageCount]]:
        now = time.monotonic()
        rows = [(k[2], count) for k, count in self._usage.live(now) if k[0] == day and k[1] == kind]
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
