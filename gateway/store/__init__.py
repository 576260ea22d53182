"""State stores behind one interface; `open_store(url)` picks the backend from `[store] url`."""

from __future__ import annotations

from pathlib import Path

from ..errors import StoreError
from .base import (
    FAILED,
    QUEUED,
    SENT,
    USAGE_KINDS,
    CardRecord,
    LeaseStore,
    OutboxEntry,
    Store,
    Turn,
    UsageCount,
    lease_store,
    trim_turns,
)
from .memory import MemoryStore
from .redis import RedisStore
from .sqlite import SqliteStore

__all__ = [
    "FAILED",
    "QUEUED",
    "SENT",
    "USAGE_KINDS",
    "CardRecord",
    "LeaseStore",
    "MemoryStore",
    "OutboxEntry",
    "RedisStore",
    "SqliteStore",
    "Store",
    "Turn",
    "UsageCount",
    "lease_store",
    "open_store",
    "sqlite_path",
    "trim_turns",
]

SQLITE = "sqlite:///"


def sqlite_path(url: str, state_dir: Path) -> Path:
    """`sqlite:///name.sqlite3` -> `state_dir/name.sqlite3`; `sqlite:////abs/path` -> `/abs/path`."""
    rest = url[len(SQLITE) :]
    if not url.startswith(SQLITE) or not rest.strip("/"):
        raise StoreError(
            f"store url {url!r}: expected sqlite:///FILE (under the state directory) "
            "or sqlite:////ABSOLUTE/PATH"
        )
    path = Path(rest)
    return path if path.is_absolute() else state_dir / path


def open_store(url: str, state_dir: Path, durability: str = "power") -> Store:
    """Build (not yet open) the store for `url`; relative SQLite paths live under `state_dir`;
    `durability` is `[store] durability` (SQLite only: see `sqlfile.SYNCHRONOUS`).

    Raises `StoreError` for an unsupported URL."""
    if url.startswith("memory://"):
        return MemoryStore()
    if url.startswith("sqlite:"):
        return SqliteStore(sqlite_path(url, state_dir), durability=durability)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    scheme = url.partition("://")[0] or url
    raise StoreError(
        f"store url scheme {scheme!r} is not supported: use sqlite:///FILE, redis://HOST:PORT/DB "
        "or memory://"
    )
