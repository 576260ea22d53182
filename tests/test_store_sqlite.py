"""SQLite specifics: group commit, file location, single-process lock, write failures and recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.errors import StoreError
from gateway.keys import STORE
from gateway.store import SENT, OutboxEntry, SqliteStore, Turn, open_store
from gateway.store.base import encode_message
from tests.conftest import make_config
from tests.helpers import msg
from tests.process import ROOT

# The schema (user_version 1) of the release before backend sessions, as its files are on disk.
SCHEMA_BEFORE_BACKEND_SESSIONS = """
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
CREATE TABLE IF NOT EXISTS cards (key TEXT PRIMARY KEY, record BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
PRAGMA user_version=1;
"""


async def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    try:
        before = store.commits
        messages = [msg(i, f"c{i % 7}") for i in range(200)]
        await asyncio.gather(*(store.admit(m, 60) for m in messages))
        claims = await asyncio.gather(*(store.claim(f"k{i % 50}", 60) for i in range(200)))
        commits = store.commits - before
        assert commits <= 20, f"{commits} commits for 400 writes: no group commit"
        assert claims.count(True) == 50
        assert await store.inbox_pending() == messages  # every waiter's write landed, in order
    finally:
        await store.close()


async def test_relative_url_lives_under_state_dir_in_wal_mode(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    store = open_store("sqlite:///sub/bot.sqlite3", state)
    await store.open()
    await store.admit(msg(1), 60)
    await store.close()
    path = state / "sub" / "bot.sqlite3"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM inbox").fetchone()[0] == 1
    conn.close()


async def test_absolute_url(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/abs.sqlite3", Path("/nonexistent"))
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "abs.sqlite3"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://db/x", "scheme 'postgres' is not supported"),
        ("sqlite://", "expected sqlite:///FILE"),
        ("sqlite://host/x", "expected sqlite:///FILE"),
    ],
)
def test_unsupported_urls_are_refused_clearly(url: str, expected: str) -> None:
    with pytest.raises(StoreError, match=expected):
        open_store(url, Path("state"))


async def test_unwritable_location_fails_at_open(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = open_store("sqlite:///sub/bot.sqlite3", blocker)
    with pytest.raises(StoreError, match=r"sqlite .*file/sub/bot.sqlite3: cannot open"):
        await store.open()


async def test_second_process_on_one_file_is_refused(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "one.sqlite3")
    await first.open()
    try:
        with pytest.raises(StoreError, match=r"in use by another botgate process.*redis"):
            await SqliteStore(tmp_path / "one.sqlite3").open()
    finally:
        await first.close()
    second = SqliteStore(tmp_path / "one.sqlite3")  # free again after close
    await second.open()
    await second.close()


async def test_full_disk_is_reported_and_recovers(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "full.sqlite3")
    await store.open()
    try:
        # A real SQLITE_FULL: cap the file at its current size, as a full disk would.
        pages = await store.db.write(lambda conn, now: conn.execute("PRAGMA page_count").fetchone()[0])
        await store.db.write(lambda conn, now: conn.execute(f"PRAGMA max_page_count = {pages}"))
        big = msg(1, reply_handle={"blob": "x" * 20_000})
        with pytest.raises(StoreError, match="database or disk is full"):
            await store.admit(big, 60)
        with pytest.raises(StoreError, match="database or disk is full"):
            await store.ping()  # readiness shows it, and keeps showing it
        with pytest.raises(StoreError, match="database or disk is full"):
            await store.ping()
        assert await store.inbox_pending() == []  # reads still work
        await store.db.write(lambda conn, now: conn.execute("PRAGMA max_page_count = 1073741823"))
        assert await store.admit(big, 60) is True  # the failed attempt left no claim behind
        await store.ping()
        assert [m.request_id for m in await store.inbox_pending()] == [big.request_id]
    finally:
        await store.close()


async def test_an_unreadable_inbox_entry_does_not_block_the_others(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "odd.sqlite3")
    await store.open()
    try:
        await store.admit(msg(1), 60)
        # As if written by another botgate version with a field this one does not know.
        await store.db.write(
            lambda conn, now: conn.execute(
                "INSERT INTO inbox (request_id, conversation, message) VALUES ('x', 'dingtalk:c1', ?)",
                (b'{"platform": "dingtalk", "unknown_field": 1}',),
            )
        )
        await store.admit(msg(2), 60)
        assert [m.text for m in await store.inbox_pending()] == ["message 1", "message 2"]
    finally:
        await store.close()


async def test_a_file_from_before_backend_sessions_opens_keeps_its_state_and_gains_them(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    pending = msg(1)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA_BEFORE_BACKEND_SESSIONS)
    conn.execute(
        "INSERT INTO inbox (request_id, conversation, message) VALUES (?, ?, ?)",
        (pending.request_id, pending.conversation_key, encode_message(pending)),
    )
    conn.execute(
        "INSERT INTO context (conversation, turns, expires) VALUES ('web:s', ?, ?)",
        (orjson.dumps([["user", "q"], ["assistant", "a"]]), time.time() + 600),
    )
    conn.close()

    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.inbox_pending() == [pending]
        assert await store.context("web:s") == [Turn("user", "q"), Turn("assistant", "a")]
        assert await store.backend_session("web:s") is None
        await store.set_backend_session("web:s", "conv-1", ttl=600)
        assert await store.backend_session("web:s") == "conv-1"
        await store.set_backend_session("web:t", "conv-2", ttl=600)
        await store.reset("web:s")
        assert await store.backend_session("web:s") is None and await store.context("web:s") == []
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        # Still version 1: the table is an addition the previous release opens and ignores.
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()
    reopened = SqliteStore(path)
    await reopened.open()
    try:
        assert await reopened.backend_session("web:t") == "conv-2"
        assert await reopened.inbox_pending() == [pending]
    finally:
        await reopened.close()


async def test_expired_backend_sessions_are_swept_from_the_file(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "sweep.sqlite3", sweep_interval=0.05)
    await store.open()
    try:
        await store.set_backend_session("web:gone", "conv-1", ttl=0.05)
        await store.set_backend_session("web:kept", "conv-2", ttl=600)

        def rows(conn: sqlite3.Connection) -> list[str]:
            return [row[0] for row in conn.execute("SELECT key FROM backend_sessions ORDER BY key")]

        for _ in range(250):  # the sweep has no event to await: look until it has run (bounded)
            if await store.db.read(rows) == ["web:kept"]:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the expired row was not swept within 5 s")
    finally:
        await store.close()


def outgoing(i: int, key: str = "") -> OutboxEntry:
    return OutboxEntry(
        f"o{i}", "dingtalk", "default", "user", "staff1", f"notice {i}", False, "token:ops", 1000.0 + i,
        idempotency_key=key,
    )


async def test_a_file_from_before_the_outbox_opens_and_gains_it(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA_BEFORE_BACKEND_SESSIONS)
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        await store.outbox_add(outgoing(1, "token:ops:k"), 60)
    finally:
        await store.close()
    reopened = SqliteStore(path)
    await reopened.open()
    try:
        assert await reopened.outbox_queued() == [outgoing(1, "token:ops:k")]
    finally:
        await reopened.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1  # an addition older releases ignore
    conn.close()


async def test_done_outbox_entries_are_swept_from_the_file_with_their_keys(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "sweep.sqlite3", sweep_interval=0.05)
    await store.open()
    try:
        for i in (1, 2, 3):
            await store.outbox_add(outgoing(i, f"k{i}"), 60)
        await store.outbox_update(dataclasses.replace(outgoing(1, "k1"), state=SENT), keep=0.05)
        await store.outbox_update(dataclasses.replace(outgoing(2, "k2"), state=SENT), keep=600)

        def rows(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            return list(conn.execute("SELECT id, idempotency_key FROM outbox ORDER BY id"))

        for _ in range(250):  # the sweep has no event to await: look until it has run (bounded)
            if await store.db.read(rows) == [("o2", "k2"), ("o3", "k3")]:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the done entry was not swept within 5 s")
    finally:
        await store.close()


async def test_an_unreadable_outbox_entry_is_logged_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStore(tmp_path / "odd.sqlite3")
    await store.open()
    try:
        await store.outbox_add(outgoing(1), 60)
        # As if written by another botgate version with a field this one does not know.
        await store.db.write(
            lambda conn, now: conn.execute(
                "INSERT INTO outbox (id, idempotency_key, created_at, entry) VALUES ('x', 'token:ops:x', 1001.5, ?)",
                (b'{"id": "x", "unknown_field": 1}',),
            )
        )
        await store.outbox_add(outgoing(2), 60)
        with caplog.at_level(logging.ERROR, "gateway.store.base"):
            assert await store.outbox_queued() == [outgoing(1), outgoing(2)]
            assert await store.outbox_get("x") is None
        skipped = [r for r in caplog.records if r.getMessage().startswith("unreadable outbox entry skipped")]
        assert len(skipped) == 2
        # Its key is still taken: a new request under it is refused, not queued as a duplicate.
        with pytest.raises(StoreError, match="outbox entry kept for 'token:ops:x' is unreadable"):
            await store.outbox_add(outgoing(3, "token:ops:x"), 60)
        assert await store.outbox_get("o3") is None
    finally:
        await store.close()


# Adds an entry, says so once `outbox_add` returned (the 202 of the send API), then waits to be killed.
CHILD = """
import asyncio, sys
from pathlib import Path
from gateway.store import OutboxEntry, SqliteStore

async def main() -> None:
    store = SqliteStore(Path(sys.argv[1]))
    await store.open()
    entry = OutboxEntry("o1", "dingtalk", "default", "user", "staff1", "notice", False, "token:ops", 1.0,
                        idempotency_key="token:ops:k")
    await store.outbox_add(entry, 60)
    print("added", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_an_outbox_entry_added_right_before_kill_9_is_there_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite3"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(path), cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(20):
            assert await child.stdout.readline() == b"added\n"
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    store = SqliteStore(path)  # the killed process's lock went with it
    await store.open()
    try:
        [entry] = await store.outbox_queued()
        assert (entry.id, entry.idempotency_key) == ("o1", "token:ops:k")
        assert (await store.outbox_add(dataclasses.replace(outgoing(2), idempotency_key="token:ops:k"), 60)).id == "o1"
    finally:
        await store.close()


@pytest.mark.parametrize(("durability", "synchronous"), [("power", 2), ("process", 1)])
async def test_durability_is_the_sync_of_every_commit(
    gateway: Callable[..., Any], tmp_path: Path, durability: str, synchronous: int
) -> None:
    """`[store] durability` picks PRAGMA synchronous on the connection that commits: FULL (2)
    syncs every group commit to disk, NORMAL (1) leaves it to the OS until a checkpoint."""
    url = f"sqlite:///{tmp_path}/d.sqlite3"
    client = await gateway(make_config(store={"url": url, "durability": durability}))
    store = client.app[STORE]
    assert await store.db.write(lambda conn, now: conn.execute("PRAGMA synchronous").fetchone()[0]) == synchronous
    message = msg(1)
    assert await store.admit(message, 60) is True
    assert await store.inbox_pending() == [message]  # committed and readable at either setting


def test_default_durability_is_power() -> None:
    """An ACKed message survives a power cut unless the operator chose otherwise."""
    assert make_config().store.durability == "power"
    assert SqliteStore(Path("unused.sqlite3")).db.synchronous == "FULL"
