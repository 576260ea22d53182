"""SQLite store (`sqlite:///PATH`): the default, durable state of a single gateway process.

Every write (dedup claim, inbox entry, context, backend session, cache, bucket, outbox) joins a group
commit on the file's writer thread (see `sqlfile`), so the event loop never blocks and a burst
costs one fsync. Times are wall-clock (`time.time()`) because they outlive the process. One
gateway process owns the file: several instances need the Redis backend, so no leases here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import orjson

from ..errors import StoreError
from ..messages import InboundMessage
from ..tasks import stop_task
from .base import (
    CardRecord,
    OutboxEntry,
    Turn,
    UsageCount,
    decode_cards,
    decode_kept,
    decode_messages,
    decode_outbox,
    encode_message,
    top_usage,
    trim_turns,
)
from .sqlfile import SqliteFile, release_free_pages

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# `user_version` rises only for a change a file's older readers could not live with; a table added
# for something new (`cards`, `backend_sessions`, `outbox`) is created in an existing file when it is opened
# (`IF NOT EXISTS`), and a botgate from before it still opens the file, ignoring the table.
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    conversation TEXT NOT NULL,
    message BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_by_conversation ON inbox (conversation, seq);
CREATE TABLE IF NOT EXISTS dedup (key TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS context (
    conversation TEXT PRIMARY KEY, turns BLOB NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
-- The sweep finds idle contexts by this index: without it, it reads every context's turns (overflow
-- pages: `expires` comes after them), each sweep.
CREATE INDEX IF NOT EXISTS context_by_expiry ON context (expires);
CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS buckets (bucket TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cards (key TEXT PRIMARY KEY, record BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backend_sessions (
    key TEXT PRIMARY KEY, session TEXT NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
    messages INTEGER NOT NULL, tokens INTEGER NOT NULL, estimated INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (day, kind, subject)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,  -- NULL: none (NULLs never collide)
    created_at REAL NOT NULL,
    expires REAL,  -- NULL while queued; once done, forgotten (with its key) after this
    entry BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_queue ON outbox (created_at) WHERE expires IS NULL;
"""


class SqliteStore:
    backend = "sqlite"
    shared = False

    def __init__(
        self, path: Path, window: float = 0.001, sweep_interval: float = 60.0, durability: str = "power"
    ) -> None:
        self.path = path
        self.db = SqliteFile(path, SCHEMA, SCHEMA_VERSION, window, durability)
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def open(self) -> None:
        await self.db.open()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="sqlite-sweep")
        log.info("store opened", extra={"backend": "sqlite", "path": str(self.path)})

    async def close(self) -> None:
        if self._sweeper is not None:
            await stop_task(self._sweeper)
            self._sweeper = None
        await self.db.close()

    async def ping(self) -> None:
        await self.db.ping()

    @property
    def commits(self) -> int:
        return self.db.commits

    async def _sweep_loop(self) -> None:
        """Delete expired rows now and then, so the file does not grow without bound."""
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                removed = await self.db.write(_sweep)
            except StoreError as e:
                log.warning("sqlite sweep failed: %s", e)
                continue
            if removed:
                log.debug("sqlite sweep", extra={"removed": removed})

    # -- dedup --------------------------------------------------------------------------------
    async def claim(self, key: str, ttl: float) -> bool:
        return bool(await self.db.write(lambda conn, now: _claim(conn, now, key, ttl)))

    # -- inbox --------------------------------------------------------------------------------
    async def admit(self, message: InboundMessage, ttl: float) -> bool:
        # One transaction (the group commit's): a failed commit undoes the claim too. The admits of
        # one commit run as one group: a few statements per commit, not two per message.
        row = (message.request_id, message.conversation_key, encode_message(message))
        return bool(await self.db.write_grouped(_admit_all, _Admit(message.dedup_key, ttl, row)))

    async def inbox_done(self, message: InboundMessage) -> None:
        request_id = message.request_id
        await self.db.write(
            lambda conn, now: conn.execute("DELETE FROM inbox WHERE request_id = ?", (request_id,))
        )

    async def inbox_pending(self, conversation: str | None = None) -> list[InboundMessage]:
        def fn(conn: sqlite3.Connection) -> list[bytes]:
            if conversation is None:
                rows = conn.execute("SELECT message FROM inbox ORDER BY seq")
            else:
                rows = conn.execute(
                    "SELECT message FROM inbox WHERE conversation = ? ORDER BY seq", (conversation,)
                )
            return [row[0] for row in rows]

        return decode_messages(await self.db.read(fn))

    # -- context ------------------------------------------------------------------------------
    async def context(self, conversation: str) -> list[Turn]:
        now = time.time()
        row = await self.db.read(
            lambda conn: conn.execute(
                "SELECT turns FROM context WHERE conversation = ? AND expires > ?",
                (conversation, now),
            ).fetchone()
        )
        return _turns(row[0]) if row else []

    async def append_turns(
        self, conversation: str, turns: list[Turn], max_turns: int, max_chars: int, idle_ttl: float
    ) -> None:
        def op(conn: sqlite3.Connection, now: float) -> None:
            row = conn.execute(
                "SELECT turns FROM context WHERE conversation = ? AND expires > ?",
                (conversation, now),
            ).fetchone()
            kept = trim_turns((_turns(row[0]) if row else []) + turns, max_turns, max_chars)
            conn.execute(
                "INSERT INTO context (conversation, turns, expires) VALUES (?, ?, ?)"
                " ON CONFLICT (conversation) DO UPDATE SET turns = excluded.turns,"
                " expires = excluded.expires",
                (conversation, orjson.dumps([[t.role, t.content] for t in kept]), now + idle_ttl),
            )

        await self.db.write(op)

    async def reset(self, conversation: str) -> None:
        def op(conn: sqlite3.Connection, now: float) -> None:
            conn.execute("DELETE FROM context WHERE conversation = ?", (conversation,))
            conn.execute("DELETE FROM backend_sessions WHERE key = ?", (conversation,))

        await self.db.write(op)

    # -- backend sessions -------------------------------------------------------------------------
    async def backend_session(self, key: str) -> str | None:
        now = time.time()
        row = await self.db.read(
            lambda conn: conn.execute(
                "SELECT session FROM backend_sessions WHERE key = ? AND expires > ?", (key, now)
            ).fetchone()
        )
        return str(row[0]) if row else None

    async def set_backend_session(self, key: str, session: str, ttl: float) -> None:
        await self.db.write(
            lambda conn, now: conn.execute(
                "INSERT INTO backend_sessions (key, session, expires) VALUES (?, ?, ?) ON CONFLICT (key)"
                " DO UPDATE SET session = excluded.session, expires = excluded.expires",
                (key, session, now + ttl),
            )
        )

    # -- model cache ----------------------------------------------------------------------------
    async def cache_get(self, key: str) -> str | None:
        now = time.time()
        row = await self.db.read(
            lambda conn: conn.execute(
                "SELECT value FROM cache WHERE key = ? AND expires > ?", (key, now)
            ).fetchone()
        )
        return str(row[0]) if row else None

    async def cache_put(self, key: str, value: str, ttl: float) -> None:
        await self.db.write(
            lambda conn, now: conn.execute(
                "INSERT INTO cache (key, value, expires) VALUES (?, ?, ?) ON CONFLICT (key)"
                " DO UPDATE SET value = excluded.value, expires = excluded.expires",
                (key, value, now + ttl),
            )
        )

    # -- rate limit -----------------------------------------------------------------------------
    async def take_token(self, bucket: str, per_minute: int) -> bool:
        capacity = float(per_minute)

        def op(conn: sqlite3.Connection, now: float) -> bool:
            row = conn.execute(
                "SELECT tokens, updated FROM buckets WHERE bucket = ?", (bucket,)
            ).fetchone()
            tokens = capacity if row is None else row[0] + max(0.0, now - row[1]) * capacity / 60.0
            tokens = min(capacity, tokens)
            allowed = tokens >= 1.0
            conn.execute(
                "INSERT INTO buckets (bucket, tokens, updated) VALUES (?, ?, ?) ON CONFLICT (bucket)"
                " DO UPDATE SET tokens = excluded.tokens, updated = excluded.updated",
                (bucket, tokens - 1.0 if allowed else tokens, now),
            )
            return allowed

        return bool(await self.db.write(op))

    # -- usage accounting -------------------------------------------------------------------------
    async def add_usage(
        self, day: str, subjects: Sequence[tuple[str, str]], tokens: int, estimated: bool, ttl: float
    ) -> None:
        guessed = tokens if estimated else 0

        def op(conn: sqlite3.Connection, now: float) -> None:
            conn.executemany(
                "INSERT INTO usage (day, kind, subject, messages, tokens, estimated, expires)"
                " VALUES (?, ?, ?, 1, ?, ?, ?) ON CONFLICT (day, kind, subject) DO UPDATE SET"
                " messages = messages + 1, tokens = tokens + excluded.tokens,"
                " estimated = estimated + excluded.estimated, expires = excluded.expires",
                [(day, kind, subject, tokens, guessed, now + ttl) for kind, subject in subjects],
            )

        await self.db.write(op)

    async def usage(self, days: Sequence[str], kind: str, subject: str) -> UsageCount:
        now, wanted = time.time(), list(days)
        marks = ", ".join("?" * len(wanted))

        def fn(conn: sqlite3.Connection) -> tuple[int, int, int]:
            if not wanted:
                return (0, 0, 0)
            row = conn.execute(
                "SELECT COALESCE(SUM(messages), 0), COALESCE(SUM(tokens), 0), COALESCE(SUM(estimated), 0)"
                f" FROM usage WHERE kind = ? AND subject = ? AND expires > ? AND day IN ({marks})",
                (kind, subject, now, *wanted),
            ).fetchone()
            return (int(row[0]), int(row[1]), int(row[2]))

        return UsageCount(*await self.db.read(fn))

    async def usage_top(self, day: str, kind: str, limit: int) -> list[tuple[str, UsageCount]]:
        now = time.time()
        rows = await self.db.read(
            lambda conn: conn.execute(
                "SELECT subject, messages, tokens, estimated FROM usage"
                " WHERE day = ? AND kind = ? AND expires > ? ORDER BY tokens DESC, messages DESC, subject"
                " LIMIT ?",
                (day, kind, now, max(0, limit)),
            ).fetchall()
        )
        return top_usage([(str(r[0]), UsageCount(int(r[1]), int(r[2]), int(r[3]))) for r in rows], limit)

    # -- outbox ---------------------------------------------------------------------------------
    async def outbox_add(self, entry: OutboxEntry, keep: float) -> OutboxEntry:
        key = entry.idempotency_key or None
        row = (entry.id, key, entry.created_at, entry.encode())

        def op(conn: sqlite3.Connection, now: float) -> bytes | None:
            # One transaction (the group commit's): the key is checked and taken together. An entry
            # past its keep time that the sweep has not reached yet no longer holds its id or key.
            conn.execute(
                "DELETE FROM outbox WHERE (id = ? OR idempotency_key = ?) AND expires <= ?", (entry.id, key, now)
            )
            if key is not None:
                found = conn.execute("SELECT entry FROM outbox WHERE idempotency_key = ?", (key,)).fetchone()
                if found is not None:
                    return bytes(found[0])
            cur = conn.execute(
                "INSERT INTO outbox (id, idempotency_key, created_at, expires, entry) VALUES (?, ?, ?, NULL, ?)"
                " ON CONFLICT (id) DO NOTHING",
                row,
            )
            if cur.rowcount == 0:  # the same id again (a retried add): already written
                return bytes(conn.execute("SELECT entry FROM outbox WHERE id = ?", (entry.id,)).fetchone()[0])
            return None

        raw = await self.db.write(op)
        return entry if raw is None else decode_kept(raw, entry)

    async def outbox_get(self, entry_id: str) -> OutboxEntry | None:
        now = time.time()
        row = await self.db.read(
            lambda conn: conn.execute(
                "SELECT entry FROM outbox WHERE id = ? AND (expires IS NULL OR expires > ?)", (entry_id, now)
            ).fetchone()
        )
        found = decode_outbox([row[0]]) if row else []
        return found[0] if found else None

    async def outbox_update(self, entry: OutboxEntry, keep: float) -> None:
        done, raw = entry.done, entry.encode()
        await self.db.write(
            lambda conn, now: conn.execute(
                "UPDATE outbox SET entry = ?, expires = ? WHERE id = ? AND (expires IS NULL OR expires > ?)",
                (raw, now + keep if done else None, entry.id, now),
            )
        )

    async def outbox_queued(self, limit: int = 1000) -> list[OutboxEntry]:
        rows = await self.db.read(
            lambda conn: [
                row[0]
                for row in conn.execute(
                    "SELECT entry FROM outbox WHERE expires IS NULL ORDER BY created_at, rowid LIMIT ?",
                    (max(0, limit),),
                )
            ]
        )
        return decode_outbox(rows)

    # -- open streaming cards -----------------------------------------------------------------
    async def card_open(self, record: CardRecord) -> None:
        row = (record.key, record.encode())
        await self.db.write(
            lambda conn, now: conn.execute(
                "INSERT INTO cards (key, record) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET record = excluded.record",
                row,
            )
        )

    async def card_update(self, record: CardRecord) -> None:
        row = (record.encode(), record.key)
        await self.db.write(lambda conn, now: conn.execute("UPDATE cards SET record = ? WHERE key = ?", row))

    async def card_done(self, key: str) -> None:
        await self.db.write(lambda conn, now: conn.execute("DELETE FROM cards WHERE key = ?", (key,)))

    async def cards_open(self) -> list[CardRecord]:
        rows = await self.db.read(lambda conn: [row[0] for row in conn.execute("SELECT record FROM cards")])
        return decode_cards(rows)


def _claim(conn: sqlite3.Connection, now: float, key: str, ttl: float) -> bool:
    cur = conn.execute(
        "INSERT INTO dedup (key, expires) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
        " SET expires = excluded.expires WHERE dedup.expires <= ?",
        (key, now + ttl, now),
    )
    return cur.rowcount == 1


@dataclass(frozen=True, slots=True)
class _Admit:
    key: str  # the dedup key
    ttl: float  # seconds it stays claimed
    row: tuple[str, str, bytes]  # the inbox row: request_id, conversation, message


def _admit_all(conn: sqlite3.Connection, now: float, admits: list[_Admit]) -> list[bool]:
    """`_claim` then the inbox row, for every admit in order, in a few multi-row statements: the
    same answers as one claim and one insert after another (a key twice in the group: the
    first one wins while its claim lasts)."""
    keys = list(dict.fromkeys(a.key for a in admits))
    taken: set[str] = set()
    for chunk in _chunks(keys):
        taken.update(key for (key,) in conn.execute(_select_claimed(len(chunk)), (*chunk, now)))
    claims: dict[str, float] = {}  # key -> its new expiry
    fresh = []
    for a in admits:
        ok = a.key not in taken and claims.get(a.key, now) <= now
        if ok:
            claims[a.key] = now + a.ttl
        fresh.append(ok)
    for some_claims in _chunks(list(claims.items())):
        conn.execute(_upsert_claims(len(some_claims)), [v for claim in some_claims for v in claim])
    rows = [a.row for a, ok in zip(admits, fresh, strict=True) if ok]
    for some_rows in _chunks(rows):
        conn.execute(_insert_inbox(len(some_rows)), [v for row in some_rows for v in row])
    return fresh


_CHUNK_MAX = 128  # rows per statement: 3 x 128 parameters stay under SQLite's old limit of 999


def _chunks(items: list[_T]) -> Iterator[list[_T]]:
    """`items` in slices of power-of-two lengths (the largest first), so that each multi-row
    statement is compiled once per length (sqlite3's statement cache), not once per batch size."""
    start, size = 0, _CHUNK_MAX
    while start < len(items):
        while size > len(items) - start:
            size //= 2
        yield items[start : start + size]
        start += size


def _rows(n: int, marks: str) -> str:
    return ", ".join([marks] * n)


@functools.cache
def _select_claimed(n: int) -> str:
    return f"SELECT key FROM dedup WHERE key IN ({_rows(n, '?')}) AND expires > ?"


@functools.cache
def _upsert_claims(n: int) -> str:
    return (
        f"INSERT INTO dedup (key, expires) VALUES {_rows(n, '(?, ?)')}"
        " ON CONFLICT (key) DO UPDATE SET expires = excluded.expires"
    )


@functools.cache
def _insert_inbox(n: int) -> str:
    return (
        f"INSERT INTO inbox (request_id, conversation, message) VALUES {_rows(n, '(?, ?, ?)')}"
        " ON CONFLICT (request_id) DO NOTHING"
    )


def _turns(raw: bytes) -> list[Turn]:
    return [Turn(role, content) for role, content in orjson.loads(raw)]


def _sweep(conn: sqlite3.Connection, now: float) -> int:
    """Delete expired rows, then hand the pages they freed beyond a spare back to the file system
    (`sqlfile.release_free_pages`): a burst's rows do not keep the file large for ever."""
    removed = 0
    for sql, args in (
        ("DELETE FROM dedup WHERE expires <= ?", (now,)),
        ("DELETE FROM cache WHERE expires <= ?", (now,)),
        ("DELETE FROM context WHERE expires <= ?", (now,)),
        ("DELETE FROM backend_sessions WHERE expires <= ?", (now,)),
        # Only the oldest day's figures: a day's rows expire after every earlier day's (each one
        # `USAGE_TTL` after its last message), so the primary key finds them without a scan of 40
        # days of figures (an index on `expires` would be as large as the table). The next day
        # follows once this one is gone.
        ("DELETE FROM usage WHERE day = (SELECT min(day) FROM usage) AND expires <= ?", (now,)),
        ("DELETE FROM outbox WHERE expires <= ?", (now,)),  # done and past its keep time, key with it
        # A bucket untouched for a minute has refilled completely: same as no row.
        ("DELETE FROM buckets WHERE updated <= ?", (now - 60.0,)),
    ):
        removed += conn.execute(sql, args).rowcount
    release_free_pages(conn)  # also what an earlier sweep freed beyond its share
    return removed
