"""SQLite reads: the ones that arrive while the reader thread is busy go over together, each still
with its own answer or its own error."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.store import SqliteStore, Turn


async def test_concurrent_reads_share_reader_turns_and_each_gets_its_own_answer(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    try:
        conversations = [f"c{i}" for i in range(300)]
        await asyncio.gather(
            *(store.append_turns(c, [Turn("user", f"asked in {c}")], 20, 10_000, 3600) for c in conversations)
        )
        before = store.db.read_batches
        contexts = await asyncio.gather(*(store.context(c) for c in conversations))
        assert [t[0].content for t in contexts] == [f"asked in {c}" for c in conversations]
        turns = store.db.read_batches - before
        assert turns <= 30, f"{turns} reader turns for 300 reads: no batching"
    finally:
        await store.close()


async def test_a_failing_read_fails_alone(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    try:
        await store.append_turns("c", [Turn("user", "hello")], 20, 10_000, 3600)

        def broken(conn: sqlite3.Connection) -> object:
            return conn.execute("SELECT * FROM no_such_table").fetchall()

        results = await asyncio.gather(
            store.context("c"), store.db.read(broken), store.context("c"), return_exceptions=True
        )
        assert isinstance(results[1], StoreError) and "no such table" in str(results[1])
        assert results[0] == results[2] == [Turn("user", "hello")]
    finally:
        await store.close()


async def test_reads_after_close_are_refused(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.context("c")
