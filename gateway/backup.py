"""`run.py backup FILE`: a consistent copy of the SQLite store, taken while the gateway runs.

SQLite's online backup (`sqlite3.Connection.backup`, all pages in one step) copies the file inside
one read transaction: in WAL mode the gateway goes on committing meanwhile, and the copy is the
state of one moment, never half a group commit. Copying the file with `cp` instead can catch a
commit half written and misses whatever still sits in the `-wal` file.

The copy is written next to FILE under a temporary name (mode 0600: it holds conversations), turned
into a self-contained file (rollback journal, no `-wal`), checked with `PRAGMA integrity_check`,
synced, and only then given its name, so FILE is either a complete, checked copy or not there.

The source is opened read-write with `query_only` on, not read-only: a read-only connection to a
WAL file leaves `-wal`/`-shm` files behind when the gateway is stopped (owned by whoever ran the
backup), while a read-write one removes them when it closes. Nothing is written to the store.

Redis is not copied here: its own snapshot (BGSAVE, the RDB file, or AOF) is the consistent copy
(docs/deploy.md, "Backups").
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .config import Config
from .errors import StoreError
from .store import sqlite_path

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
REDIS_ADVICE = (
    "run.py backup copies a SQLite store only; this one is Redis (store.url). Back Redis up on its "
    "server: `redis-cli BGSAVE`, wait until `redis-cli LASTSAVE` changes, then copy the RDB file "
    "(`CONFIG GET dir` and `dbfilename`; Debian: /var/lib/redis/dump.rdb); with appendonly yes, "
    "copy the append-only files too (docs/deploy.md, Backups)"
)


class BackupRefused(Exception):
    """The backup was not attempted: nothing to copy, or the target exists (the message says why)."""


class BackupFailed(Exception):
    """The copy was attempted and failed (I/O, a damaged source); no target file is left."""


@dataclass(frozen=True)
class BackupResult:
    source: Path
    target: Path
    size: int  # bytes of the copy
    pending: int  # inbox entries in the copy: accepted, not yet answered when it was taken
    schema_version: int  # the store's PRAGMA user_version


def store_file(config: Config) -> Path:
    """The SQLite file of `config`'s store; `BackupRefused` for a store that has none."""
    url = config.store.url
    if url.startswith(REDIS_SCHEMES):
        raise BackupRefused(REDIS_ADVICE)
    if url.startswith("memory://"):
        raise BackupRefused("store.url is memory://: its state lives in the process only, there is no file to back up")
    try:
        return sqlite_path(url, config.state_dir)
    except StoreError as e:
        raise BackupRefused(str(e)) from None


def target_for(dest: Path, now: float | None = None) -> Path:
    """`dest` itself, or for an existing directory a new file in it named by the UTC time."""
    if dest.is_dir():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        return dest / f"botgate-{stamp}.sqlite3"
    return dest


def backup(config: Config, dest: str, overwrite: bool = False) -> BackupResult:
    """Copy `config`'s SQLite store to `dest` (a file, or an existing directory; `dir/` must exist)."""
    source = store_file(config)
    if dest.endswith("/") and not Path(dest).is_dir():
        raise BackupRefused(f"{dest}: no such directory")
    return copy_sqlite(source, Path(dest), overwrite)


def copy_sqlite(source: Path, dest: Path, overwrite: bool = False) -> BackupResult:
    if not source.is_file():
        raise BackupRefused(f"{source}: no such store file (has the gateway run with this config and state directory?)")
    target = target_for(dest)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise BackupRefused(f"{target}: already exists; choose another name, or pass --force to replace it")
        if target.resolve() == source.resolve():
            raise BackupRefused(f"{target}: is the store itself")
    if not target.parent.is_dir():
        raise BackupRefused(f"{target.parent}: no such directory")
    partial = target.parent / f".{target.name}.{os.getpid()}.partial"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise BackupFailed(f"{partial}: cannot create: {e.strerror or e}") from None
    os.close(fd)
    try:
        pending, version = _copy(source, partial)
        _fsync(partial)
        if overwrite:
            os.replace(partial, target)
        else:
            os.link(partial, target)  # fails if the name was taken meanwhile; never replaces
            partial.unlink()
        _fsync(target.parent)
    except FileExistsError:
        partial.unlink(missing_ok=True)
        raise BackupRefused(f"{target}: already exists; choose another name, or pass --force to replace it") from None
    except (OSError, sqlite3.Error) as e:
        partial.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BackupFailed(f"backup of {source} to {target} failed: {why}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return BackupResult(source, target, target.stat().st_size, pending, version)


def _copy(source: Path, partial: Path) -> tuple[int, int]:
    """Copy `source` into the empty file `partial` and check it: (inbox entries, user_version)."""
    src = sqlite3.connect(f"file:{quote(str(source.absolute()))}?mode=rw", uri=True, timeout=10.0)
    try:
        src.execute("PRAGMA query_only=1")
        dst = sqlite3.connect(partial, isolation_level=None)
        try:
            src.backup(dst)  # pages=-1: every page in one step, one read transaction
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            check = [row[0] for row in dst.execute("PRAGMA integrity_check")]
            if check != ["ok"]:
                problems = "; ".join(check[:3])
                raise BackupFailed(f"backup of {source}: the copy fails SQLite's integrity check: {problems}")
            version = int(dst.execute("PRAGMA user_version").fetchone()[0])
            has_inbox = dst.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'inbox'").fetchone()
            pending = int(dst.execute("SELECT count(*) FROM inbox").fetchone()[0]) if has_inbox else 0
        finally:
            dst.close()
    finally:
        src.close()
    return pending, version


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
