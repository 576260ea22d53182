"""One SQLite file in WAL mode, off the event loop: a writer thread committing in groups, a reader.

Writes go through a queue to a dedicated writer thread with its own connection; a flusher collects
whatever arrives within `window` seconds (plus whatever arrives while the previous commit is still
running) and commits it as ONE transaction, then resolves every waiter. So many webhooks accepted
at once cost one fsync, not one each. Reads run on a second thread with its own connection, which
WAL lets proceed while the writer commits; the reads that arrive while it is busy go to it
together. An exclusive `flock` on `<file>.lock` keeps a second process off the file.

Writes of one kind queued one after another (the intake's admits) can run as one call over all
their items (`write_grouped`): a few multi-row statements a commit instead of two a message. Every
statement releases and retakes the GIL, and on a core the event loop keeps busy the writer thread
may wait for the loop each time it retakes it.
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

from ..errors import StoreError, StoreInUse

log = logging.getLogger(__name__)

# A write operation runs inside the batch transaction on the writer thread: (connection, now).
WriteOp = Callable[[sqlite3.Connection, float], Any]
# A grouped write runs once for consecutive queued items of its kind: (connection, now, items) ->
# one result per item, in order.
GroupOp = Callable[[sqlite3.Connection, float, list[Any]], list[Any]]
# A queued write: its group (None: `item` is a WriteOp run alone), its item, its waiter.
_Pending = tuple[GroupOp | None, Any, "asyncio.Future[Any]"]
# A queued read and its waiter; what it returned (True, value) or raised (False, exception).
_Read = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
_Outcome = tuple[bool, Any]

META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;"

# `[store] durability` -> PRAGMA synchronous in WAL mode (https://www.sqlite.org/pragma.html#pragma_synchronous):
# FULL syncs the WAL at every commit, so a commit is on disk before the platform gets its ACK, even
# across a power cut (group commit keeps that to one sync per batch); NORMAL syncs only around
# checkpoints: a commit survives a crashed or killed process (it is in the OS's page cache), but the
# last ones may roll back after a power cut or OS crash. The file stays consistent with either.
SYNCHRONOUS = {"power": "FULL", "process": "NORMAL"}

# Housekeeping (https://www.sqlite.org/pragma.html#pragma_auto_vacuum): the file is in incremental
# auto-vacuum mode, so pages freed by deleted rows can be handed back to the file system
# (`release_free_pages`, after each sweep) instead of only being reused.
INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
SPARE = 0.1  # free pages kept for the next inserts, as a fraction of the file: steady churn reuses them
RELEASE_MAX = 2048  # pages released per sweep at most (8 MB of 4 KB pages, ~20 ms): the writer is not held long
# Bytes of WAL kept when it starts over after a checkpoint (PRAGMA journal_size_limit): about what
# the automatic checkpoint lets it reach (1,000 pages). SQLite's default keeps a WAL that a burst
# or a long read once made large at that size for ever.
WAL_KEEP = 4 * 2**20


class SqliteFile:
    def __init__(
        self, path: Path, schema: str, version: int, window: float = 0.001, durability: str = "power"
    ) -> None:
        if durability not in SYNCHRONOUS:
            raise ValueError(f"durability must be one of {', '.join(SYNCHRONOUS)}, got {durability!r}")
        self.path = path
        self.synchronous = SYNCHRONOUS[durability]
        self.commits = 0  # write transactions committed; under load far fewer than writes
        self.read_batches = 0  # turns of the reader thread; under load far fewer than reads
        self._schema = schema
        self._version = version
        self._window = window
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._wconn: sqlite3.Connection | None = None  # used on the writer thread only
        self._rconn: sqlite3.Connection | None = None  # used on the reader thread only
        self._lock_fd: int | None = None
        self._pending: list[_Pending] = []
        self._reads: list[_Read] = []
        self._reading = False  # a batch of reads is on the reader thread
        self._wakeup: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._open = False
        # Why the last write batch failed; cleared by the next successful one. `ping()` reports it.
        self._failure: str | None = None

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
        self._flusher = asyncio.create_task(self._flush_loop(), name="sqlite-flush")

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False  # refuse new writes; the flusher commits what is queued, then exits
        assert self._wakeup is not None and self._flusher is not None
        self._wakeup.set()
        await self._flusher
        self._flusher = None
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
            raise StoreInUse(
                f"sqlite {self.path}: in use by another botgate process "
                "(one process per SQLite file; run several instances on redis://)"
            ) from None
        self._lock_fd = fd
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        self._wconn = conn
        # Takes effect only in a file without tables yet (a new one); an older file is converted
        # below, once.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"sqlite {self.path}: WAL mode unavailable (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")  # see SYNCHRONOUS
        conn.execute(f"PRAGMA journal_size_limit={WAL_KEEP}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > self._version:
            raise StoreError(
                f"sqlite {self.path}: schema version {version} is newer than this botgate "
                f"({self._version}); upgrade botgate or use another file"
            )
        conn.executescript(self._schema + META)
        conn.execute(f"PRAGMA user_version={self._version}")
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
            self._convert_to_incremental(conn)
        # Proves the file is writable now rather than at the first message.
        _heartbeat(conn, time.time())

    def _convert_to_incremental(self, conn: sqlite3.Connection) -> None:
        """A file made before incremental auto-vacuum: switch it over with one VACUUM (a rewrite of
        the whole file, needing as much free disk again; seconds for a few hundred MB). Without
        room for that the file keeps working as before (the sweep's freed pages are reused but
        not handed back to the file system), and the next start tries again."""
        started = time.monotonic()
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        try:
            conn.execute("VACUUM")
        except sqlite3.Error as e:
            log.warning("sqlite %s: not converted to incremental auto-vacuum: %s", self.path, e)
            return
        log.info(
            "sqlite file converted to incremental auto-vacuum (once)",
            extra={"path": str(self.path), "seconds": round(time.monotonic() - started, 3)},
        )

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
            await self.write(_probe)
        else:
            await self.read(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- writes: group commit -----------------------------------------------------------
    async def write(self, op: WriteOp) -> Any:
        """Run `op` in the next group commit; returns its result once that commit is durable."""
        return await self._queue(None, op)

    async def write_grouped(self, group: GroupOp, item: Any) -> Any:
        """Run `group` in the next group commit over `item` and the other items queued for it right
        before or after (nothing else queued in between); returns this item's result once that
        commit is durable. Order against other writes is kept as if each item ran alone."""
        return await self._queue(group, item)

    async def _queue(self, group: GroupOp | None, item: Any) -> Any:
        if not self._open:
            raise StoreError("store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((group, item, future))
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

    async def _commit(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        assert self._writer is not None
        try:
            results = await loop.run_in_executor(self._writer, self._run_batch, batch)
        except BaseException as e:
            reason = str(e) if isinstance(e, StoreError) else f"sqlite {self.path}: write: {e!r}"
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(StoreError(reason))
            if not isinstance(e, Exception):
                raise  # cancellation: the waiters have their error
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _run_batch(self, batch: list[_Pending]) -> list[Any]:
        conn = self._wconn
        assert conn is not None
        now = time.time()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                results = _run_in_order(conn, now, batch)
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
        return results

    async def read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `fn` on the reader thread (sees every write whose `write()` has returned).

        Reads queued while the reader thread is busy go over together in its next turn: one
        thread hand-off (and one wake-up of the loop) for all of them instead of one each."""
        if not self._open or self._reader is None:
            raise StoreError("store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._reads.append((fn, future))
        if not self._reading:
            self._next_reads()
        try:
            return await future
        except sqlite3.Error as e:
            raise StoreError(f"sqlite {self.path}: read failed: {e}") from e

    def _next_reads(self) -> None:
        batch, self._reads = self._reads, []
        if not batch:
            return
        self._reading = True
        try:
            assert self._reader is not None
            done = asyncio.get_running_loop().run_in_executor(self._reader, self._run_reads, batch)
        except (AssertionError, RuntimeError):  # closed meanwhile: the pool takes nothing more
            self._reading = False
            _settle(batch, [(False, StoreError("store is closed"))] * len(batch))
            return
        done.add_done_callback(lambda outcome: self._reads_done(batch, outcome))

    def _reads_done(self, batch: list[_Read], outcome: asyncio.Future[list[_Outcome]]) -> None:
        self._reading = False
        _settle(batch, outcome.result())
        self._next_reads()

    def _run_reads(self, batch: list[_Read]) -> list[_Outcome]:
        conn = self._rconn
        if conn is None:
            return [(False, StoreError("store is closed"))] * len(batch)
        self.read_batches += 1
        outcomes: list[_Outcome] = []
        for fn, _ in batch:
            try:
                outcomes.append((True, fn(conn)))
            except Exception as e:  # this read's own failure, raised to its caller alone
                outcomes.append((False, e))
        return outcomes


def _settle(batch: list[_Read], outcomes: list[_Outcome]) -> None:
    for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future.done():  # its caller was cancelled
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _run_in_order(conn: sqlite3.Connection, now: float, batch: list[_Pending]) -> list[Any]:
    """Every write of `batch` in order; a run of consecutive items of one group in one call."""
    results: list[Any] = []
    start = 0
    while start < len(batch):
        group, item, _ = batch[start]
        if group is None:
            results.append(item(conn, now))
            start += 1
            continue
        end = start + 1
        while end < len(batch) and batch[end][0] is group:
            end += 1
        done = group(conn, now, [entry[1] for entry in batch[start:end]])
        if len(done) != end - start:
            raise RuntimeError(f"grouped write {group!r} gave {len(done)} results for {end - start} items")
        results += done
        start = end
    return results


def release_free_pages(conn: sqlite3.Connection) -> int:
    """Hand free pages beyond `SPARE` of the file back to the file system, at most `RELEASE_MAX`;
    returns how many. Runs inside a write transaction; the file itself shrinks when the WAL is
    next checkpointed. Does nothing in a file not in incremental auto-vacuum mode."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
        return 0
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    surplus = min(free - int(pages * SPARE), RELEASE_MAX)
    if surplus <= 0:
        return 0
    # Each step of the statement frees one page, and sqlite3 steps a statement without result
    # columns once (executescript would run it to the end, but commits the batch first).
    for _ in range(surplus):
        conn.execute("PRAGMA incremental_vacuum")
    return int(surplus)


def _heartbeat(conn: sqlite3.Connection, now: float) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('heartbeat', ?) ON CONFLICT (key)"
        " DO UPDATE SET value = excluded.value",
        (now,),
    )


def _probe(conn: sqlite3.Connection, now: float) -> None:
    """Write (and drop) a row the size of a large message: room for it means room for messages."""
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', zeroblob(16384))")
    conn.execute("DELETE FROM meta WHERE key = 'probe'")
