"""SQLite store (`sqlite:///PATH`): one WAL file, written by one thread in group commits.

The event loop never touches SQLite. Writes go through a queue to a dedicated writer thread with
its own connection; a flusher collects whatever arrives within `window` seconds (plus whatever
arrives while the previous commit is still running) and commits it as ONE transaction, then resolves
every waiter. So many webhooks accepted at once cost one fsync, not one each. Reads run on a second
thread with a read-only connection, which WAL lets proceed while the writer commits.

One gateway process owns the file (an exclusive `flock` on `<file>.lock`): several instances need
the Redis backend. That is also why leases live in memory here.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from ..errors import StoreError
from ..messages import InboundMessage
from .base import Turn, trim_turns
from .memory import LocalLeases

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS buckets (bucket TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""

# A write operation runs inside the batch transaction on the writer thread: (connection, now).
WriteOp = Callable[[sqlite3.Connection, float], Any]


class SqliteStore:
    backend = "sqlite"

    def __init__(self, path: Path, window: float = 0.001, sweep_interval: float = 60.0) -> None:
        self.path = path
        self.commits = 0  # write transactions committed; far fewer than `writes` under load
        self.writes = 0  # write operations committed
        self._window = window
        self._sweep_interval = sweep_interval
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._wconn: sqlite3.Connection | None = None  # used on the writer thread only
        self._rconn: sqlite3.Connection | None = None  # used on the reader thread only
        self._lock_fd: int | None = None
        self._pending: list[tuple[WriteOp, asyncio.Future[Any]]] = []
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._open = False
        # Why the last write batch failed; cleared by the next successful one. `ping()` reports it.
        self._failure: str | None = None
        self._leases = LocalLeases()

    # -- lifecycle ----------------------------------------------------------------------------
    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        try:
            await loop.run_in_executor(self._writer, self._open_writer)
            await loop.run_in_executor(self._reader, self._open_reader)
        except (OSError, sqlite3.Error) as e:
            await self._stop_threads()
            raise StoreError(f"sqlite {self.path}: cannot open: {e}") from e
        except StoreError:
            await self._stop_threads()
            raise
        self._open = True
        self._wakeup = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="sqlite-flush"),
            asyncio.create_task(self._sweep_loop(), name="sqlite-sweep"),
        ]
        log.info("store opened", extra={"backend": "sqlite", "path": str(self.path)})

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False  # refuse new writes; the flusher commits what is queued, then exits
        flusher, sweeper = self._tasks
        sweeper.cancel()
        assert self._wakeup is not None
        self._wakeup.set()
        await asyncio.gather(flusher, sweeper, return_exceptions=True)
        self._tasks = []
        await self._stop_threads()

    async def _stop_threads(self) -> None:
        loop = asyncio.get_running_loop()
        for pool, closer in ((self._reader, self._close_reader), (self._writer, self._close_writer)):
            if pool is not None:
                await loop.run_in_executor(pool, closer)
                pool.shutdown(wait=False)
        self._reader = self._writer = None

    def _open_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"sqlite {self.path}: in use by another botgate process "
                "(one process per SQLite file; run several instances on redis://)"
            ) from None
        self._lock_fd = fd
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        self._wconn = conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"sqlite {self.path}: WAL mode unavailable (journal_mode={mode})")
        # FULL: a commit is on disk before the platform gets its ACK, even across a power cut;
        # group commit keeps that affordable.
        conn.execute("PRAGMA synchronous=FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"sqlite {self.path}: schema version {version} is newer than this botgate "
                f"({SCHEMA_VERSION}); upgrade botgate or use another file"
            )
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        # Proves the file is writable now rather than at the first message.
        _heartbeat(conn, time.time())

    def _open_reader(self) -> None:
        self._rconn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        self._rconn.execute("PRAGMA query_only=1")

    def _close_reader(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    def _close_writer(self) -> None:
        if self._wconn is not None:
            try:
                self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("sqlite checkpoint at close failed: %s", e)
            self._wconn.close()
            self._wconn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    async def ping(self) -> None:
        if not self._open:
            raise StoreError("store is closed")
        if self._failure is not None:
            # Only a write shows whether e.g. a full disk has room again.
            await self._write(_probe)
        else:
            await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- the writer: group commit -----------------------------------------------------------
    async def _write(self, op: WriteOp) -> Any:
        if not self._open:
            raise StoreError("store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    async def _flush_loop(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        while self._open or self._pending:
            await wakeup.wait()
            if self._open:
                await asyncio.sleep(self._window)  # let concurrent writers join this commit
            wakeup.clear()
            batch, self._pending = self._pending, []
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[tuple[WriteOp, asyncio.Future[Any]]]) -> None:
        loop = asyncio.get_running_loop()
        assert self._writer is not None
        try:
            results = await loop.run_in_executor(self._writer, self._run_batch, [op for op, _ in batch])
        except BaseException as e:
            reason = str(e) if isinstance(e, StoreError) else f"sqlite {self.path}: write: {e!r}"
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreError(reason))
            if not isinstance(e, Exception):
                raise  # cancellation: the waiters have their error
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _run_batch(self, ops: list[WriteOp]) -> list[Any]:
        conn = self._wconn
        assert conn is not None
        now = time.time()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                results = [op(conn, now) for op in ops]
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            self._failure = f"sqlite {self.path}: write failed: {e}"
            log.error("%s", self._failure)
            raise StoreError(self._failure) from e
        if self._failure is not None:
            log.info("sqlite writes work again", extra={"path": str(self.path)})
        self._failure = None
        self.commits += 1
        self.writes += len(ops)
        return results

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if not self._open or self._reader is None:
            raise StoreError("store is closed")

        def run() -> Any:
            assert self._rconn is not None
            return fn(self._rconn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, run)
        except sqlite3.Error as e:
            raise StoreError(f"sqlite {self.path}: read failed: {e}") from e

    async def _sweep_loop(self) -> None:
        """Delete expired rows now and then, so the file does not grow without bound."""
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                removed = await self._write(_sweep)
            except StoreError as e:
                log.warning("sqlite sweep failed: %s", e)
                continue
            if removed:
                log.debug("sqlite sweep", extra={"removed": removed})

    # -- dedup --------------------------------------------------------------------------------
    async def claim(self, key: str, ttl: float) -> bool:
        def op(conn: sqlite3.Connection, now: float) -> bool:
            cur = conn.execute(
                "INSERT INTO dedup (key, expires) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
                " SET expires = excluded.expires WHERE dedup.expires <= ?",
                (key, now + ttl, now),
            )
            return cur.rowcount == 1

        return bool(await self._write(op))

    # -- inbox --------------------------------------------------------------------------------
    async def inbox_add(self, message: InboundMessage) -> None:
        row = (message.request_id, message.conversation_key, orjson.dumps(message.to_dict()))

        def op(conn: sqlite3.Connection, now: float) -> None:
            conn.execute(
                "INSERT INTO inbox (request_id, conversation, message) VALUES (?, ?, ?)"
                " ON CONFLICT (request_id) DO NOTHING",
                row,
            )

        await self._write(op)

    async def inbox_done(self, message: InboundMessage) -> None:
        request_id = message.request_id
        await self._write(
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

        return [InboundMessage.from_dict(orjson.loads(raw)) for raw in await self._read(fn)]

    # -- context ------------------------------------------------------------------------------
    async def context(self, conversation: str) -> list[Turn]:
        now = time.time()
        row = await self._read(
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

        await self._write(op)

    async def reset(self, conversation: str) -> None:
        await self._write(
            lambda conn, now: conn.execute(
                "DELETE FROM context WHERE conversation = ?", (conversation,)
            )
        )

    # -- model cache ----------------------------------------------------------------------------
    async def cache_get(self, key: str) -> str | None:
        now = time.time()
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT value FROM cache WHERE key = ? AND expires > ?", (key, now)
            ).fetchone()
        )
        return str(row[0]) if row else None

    async def cache_put(self, key: str, value: str, ttl: float) -> None:
        await self._write(
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

        return bool(await self._write(op))

    # -- leases (one process per file, see the module docstring) -------------------------------
    async def acquire_lease(self, conversation: str, owner: str, ttl: float) -> bool:
        return self._leases.acquire(conversation, owner, ttl)

    async def release_lease(self, conversation: str, owner: str) -> None:
        self._leases.release(conversation, owner)


def _turns(raw: bytes) -> list[Turn]:
    return [Turn(role, content) for role, content in orjson.loads(raw)]


def _heartbeat(conn: sqlite3.Connection, now: float) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('heartbeat', ?) ON CONFLICT (key)"
        " DO UPDATE SET value = excluded.value",
        (repr(now),),
    )


def _probe(conn: sqlite3.Connection, now: float) -> None:
    """Write (and drop) a row the size of a large message: room for it means room for messages."""
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', zeroblob(16384))")
    conn.execute("DELETE FROM meta WHERE key = 'probe'")


def _sweep(conn: sqlite3.Connection, now: float) -> int:
    removed = 0
    for sql, args in (
        ("DELETE FROM dedup WHERE expires <= ?", (now,)),
        ("DELETE FROM cache WHERE expires <= ?", (now,)),
        ("DELETE FROM context WHERE expires <= ?", (now,)),
        # A bucket untouched for a minute has refilled completely: same as no row.
        ("DELETE FROM buckets WHERE updated <= ?", (now - 60.0,)),
    ):
        removed += conn.execute(sql, args).rowcount
    return removed
