"""State stores behind one interface; `open_store(url)` picks the backend from `[store] url`."""

from __future__ import annotations

from pathlib import Path

from .base import Store, Turn, trim_turns
from .memory import MemoryStore

__all__ = ["MemoryStore", "Store", "Turn", "open_store", "trim_turns"]


def open_store(url: str, state_dir: Path) -> Store:
    """Build (not yet open) the store for `url`; relative SQLite paths live under `state_dir`.

    Raises `StoreError` for an unsupported URL."""
    from ..errors import StoreError

    if url.startswith("memory://"):
        return MemoryStore()
    raise StoreError(f"store url {url!r}: backend not available")
