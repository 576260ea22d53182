"""`python run.py backup FILE`: a consistent copy of a SQLite store that is being written, no
clobbering, a clear answer for Redis and memory stores, and a copy that restores."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import run
from gateway.store import SqliteStore
from tests.helpers import msg
from tests.process import ROOT

TIMEOUT = 60.0


def config_file(tmp_path: Path, store: str = "sqlite:///botgate.sqlite3") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n\n[store]\nurl = "{store}"\n')
    return path


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("BOTGATE_", "STATE_DIRECTORY"))}


def run_backup(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "backup", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=TIMEOUT, env=clean_env(), check=False,
    )  # fmt: skip


def rows(path: Path, query: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.execute(query))
    finally:
        conn.close()


async def filled_store(tmp_path: Path, n: int) -> SqliteStore:
    store = SqliteStore(tmp_path / "state" / "botgate.sqlite3")
    await store.open()
    await asyncio.gather(*(store.admit(msg(i, conversation=f"c{i % 50}"), ttl=600) for i in range(n)))
    return store


def stopped_store(tmp_path: Path, n: int) -> None:
    """A store file with `n` pending messages, left as a stopped gateway leaves it."""

    async def fill() -> None:
        await (await filled_store(tmp_path, n)).close()

    asyncio.run(fill())


async def test_copy_taken_while_the_store_is_written_is_consistent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_file(tmp_path)
    # The running gateway: it holds the file's lock and keeps committing. Its 2,000 messages are
    # still in the -wal file (far below SQLite's checkpoint size), so a copy of the database file
    # alone would miss them.
    store = await filled_store(tmp_path, 2000)
    written = 2000
    stop = asyncio.Event()

    async def keep_writing() -> None:
        nonlocal written
        while not stop.is_set():
            # Each admission is one transaction: a dedup key and its inbox entry, both or neither.
            await asyncio.gather(*(store.admit(msg(written + i, conversation="busy"), ttl=600) for i in range(20)))
            written += 20

    writer = asyncio.create_task(keep_writing())
    target = tmp_path / "copy.sqlite3"
    try:
        before = written
        # run.py's own entry point, in a thread so the store goes on writing meanwhile.
        async with asyncio.timeout(TIMEOUT):
            code = await asyncio.to_thread(run.main, ["backup", str(target), "--config", str(config)])
        after = written
    finally:
        stop.set()
        await writer
        await store.close()
    out = capsys.readouterr()
    assert code == 0, out.err
    assert after > before, "the store was not written while the backup ran"
    assert rows(target, "PRAGMA integrity_check") == [("ok",)]
    assert rows(target, "PRAGMA journal_mode") == [("delete",)]
    assert not (tmp_path / "copy.sqlite3-wal").exists()
    ((count, low, high),) = rows(target, "SELECT count(*), min(seq), max(seq) FROM inbox")
    (dedup,) = rows(target, "SELECT count(*) FROM dedup")
    assert isinstance(count, int)
    # A snapshot of one moment: every admission before the backup, none half done, no gaps.
    assert before <= count <= after
    assert (low, high) == (1, count)
    assert dedup == (count,)
    assert rows(target, "PRAGMA user_version") == [(1,)]
    assert f"{count} messages not yet answered" in out.out
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # it holds conversations


def test_restored_copy_answers_what_was_pending(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    stopped_store(tmp_path, 3)  # the gateway is stopped: no -wal/-shm may be left behind by the backup
    target = tmp_path / "copy.sqlite3"
    result = run_backup(config, str(target))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["botgate.sqlite3", "botgate.sqlite3.lock"]

    # Restore (docs/deploy.md): the copy in place of the store file, then the gateway starts on it.
    restored = tmp_path / "restored" / "botgate.sqlite3"
    restored.parent.mkdir()
    restored.write_bytes(target.read_bytes())

    async def reopen() -> tuple[list[str], bool]:
        again = SqliteStore(restored)
        await again.open()
        try:
            pending = [m.text for m in await again.inbox_pending()]
            return pending, await again.admit(msg(1, conversation="c1"), ttl=600)
        finally:
            await again.close()

    pending, redelivery_admitted = asyncio.run(reopen())
    assert pending == ["message 0", "message 1", "message 2"]  # answered again after the restore
    # Their dedup keys came back too: a redelivery of one of them is not answered twice.
    assert not redelivery_admitted


def test_existing_file_is_refused_unless_forced(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    stopped_store(tmp_path, 1)
    target = tmp_path / "copy.sqlite3"
    target.write_text("yesterday's copy")

    refused = run_backup(config, str(target))
    assert refused.returncode == 2
    assert "already exists" in refused.stderr and "--force" in refused.stderr
    assert target.read_text() == "yesterday's copy"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []

    forced = run_backup(config, str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    assert rows(target, "SELECT count(*) FROM inbox") == [(1,)]


def test_a_directory_gets_a_new_file_named_by_the_time(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    stopped_store(tmp_path, 1)
    backups = tmp_path / "backups"
    backups.mkdir()
    result = run_backup(config, str(backups))
    assert result.returncode == 0, result.stderr
    (copy,) = backups.iterdir()
    assert copy.name.startswith("botgate-") and copy.name.endswith("Z.sqlite3")
    assert rows(copy, "PRAGMA integrity_check") == [("ok",)]


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    stopped_store(tmp_path, 1)
    result = run_backup(config, f"{tmp_path / 'nowhere'}/")
    assert result.returncode == 2 and "no such directory" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_redis_store_is_refused_with_what_to_do_instead(tmp_path: Path) -> None:
    config = config_file(tmp_path, store="redis://:hunter2-secret@127.0.0.1:6399/0")
    result = run_backup(config, str(tmp_path / "copy.rdb"))
    assert result.returncode == 2
    assert "BGSAVE" in result.stderr and "dump.rdb" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert not (tmp_path / "copy.rdb").exists()


def test_memory_store_and_a_missing_file_are_refused(tmp_path: Path) -> None:
    memory = run_backup(config_file(tmp_path, store="memory://"), str(tmp_path / "copy.sqlite3"))
    assert memory.returncode == 2 and "memory://" in memory.stderr
    missing = run_backup(config_file(tmp_path), str(tmp_path / "copy.sqlite3"))
    assert missing.returncode == 2
    assert str(tmp_path / "state" / "botgate.sqlite3") in missing.stderr
    assert not (tmp_path / "copy.sqlite3").exists()


def test_backup_needs_a_file() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "backup"], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 2 and "backup needs FILE" in result.stderr
