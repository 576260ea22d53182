"""SQLite housekeeping on a real file: the sweep deletes expired rows and hands the pages they
freed back to the file system (incremental auto-vacuum), an older file is converted to that mode
once, and usage figures leave day by day."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.store import SqliteStore, Turn
from gateway.store.sqlfile import SPARE
from tests.test_store_sqlite import SCHEMA_BEFORE_BACKEND_SESSIONS

ANSWER = "An answer long enough to take most of a page of its own. " * 60  # ~3.4 KB


def pages(path: Path) -> tuple[int, int]:
    """(page_count, freelist_count) through a connection of the test's own."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA page_count").fetchone()[0], conn.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        conn.close()


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(250):  # the sweep has no event to await: look until it has run (bounded)
        if await condition():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"{what} within 5 s")


async def test_the_sweep_hands_the_pages_of_expired_rows_back_to_the_file_system(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path, sweep_interval=0.05)
    await store.open()
    try:
        await store.cache_put("kept", "a cached answer", ttl=600)
        # A burst: 3,000 cached answers that expire right away (~12 MB of pages).
        await asyncio.gather(*(store.cache_put(f"burst{i}", ANSWER, ttl=0.01) for i in range(3000)))
        full, _ = pages(path)
        assert full > 2500

        async def released() -> bool:
            total, free = pages(path)
            return total < full / 4 and free <= total * SPARE + 1

        await until(released, "the freed pages were not released")
        assert await store.cache_get("kept") == "a cached answer"
    finally:
        await store.close()  # checkpoints the WAL: the file itself is now as small as its pages
    total, _ = pages(path)
    assert path.stat().st_size == total * 4096
    assert path.stat().st_size < full * 4096 / 4


async def test_a_file_from_an_earlier_release_is_converted_once_and_keeps_its_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA_BEFORE_BACKEND_SESSIONS)
    conn.execute(
        "INSERT INTO context (conversation, turns, expires) VALUES ('dingtalk:c1', ?, 1e12)",
        (b'[["user", "hello"], ["assistant", "hi"]]',),
    )
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0  # NONE: freed pages only reused
    conn.close()
    converted = []
    for _ in range(2):
        caplog.clear()
        store = SqliteStore(path)
        with caplog.at_level(logging.INFO, "gateway.store.sqlfile"):
            await store.open()
        try:
            assert await store.context("dingtalk:c1") == [Turn("user", "hello"), Turn("assistant", "hi")]
        finally:
            await store.close()
        converted.append(any("converted to incremental auto-vacuum" in r.getMessage() for r in caplog.records))
    assert converted == [True, False]  # the VACUUM (a rewrite of the file) happens at the first open only
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    finally:
        conn.close()


async def test_expired_usage_figures_are_swept_day_by_day_and_current_ones_kept(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "usage.sqlite3", sweep_interval=0.05)
    subjects = [("user", "dingtalk:alice"), ("bot", "dingtalk/default")]
    await store.open()
    try:
        await store.add_usage("2026-01-01", subjects, 10, False, ttl=0.01)
        await store.add_usage("2026-01-02", subjects, 20, False, ttl=0.01)
        await store.add_usage("2026-01-03", subjects, 30, False, ttl=600)

        async def swept() -> bool:
            days = await store.db.read(lambda conn: [r[0] for r in conn.execute("SELECT DISTINCT day FROM usage")])
            return bool(days == ["2026-01-03"])

        await until(swept, "the expired days were not swept")
        assert (await store.usage(["2026-01-03"], "user", "dingtalk:alice")).tokens == 30
    finally:
        await store.close()
