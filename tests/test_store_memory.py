"""The memory store forgets what expired as it goes, without a pass over everything it keeps."""

from __future__ import annotations

from gateway.store import MemoryStore
from gateway.store.memory import _Expiring


async def test_expired_dedup_keys_and_contexts_are_dropped_by_later_writes() -> None:
    store = MemoryStore()
    for i in range(5000):
        assert await store.claim(f"k{i}", 0.0)  # expired as soon as it is written
    assert await store.claim("fresh", 600.0)
    assert len(store._seen) == 1
    assert await store.claim("k1", 600.0)  # expired keys are claimable again


def test_a_renewed_entry_moves_behind_the_others() -> None:
    kept: _Expiring[str, int] = _Expiring()
    kept.set("a", 1, expires=10.0)
    kept.set("b", 2, expires=20.0)
    kept.set("a", 3, expires=30.0)  # renewed: now the last to expire
    kept.sweep(now=25.0)
    assert kept.get("a", now=25.0) == 3 and kept.get("b", now=25.0) is None and len(kept) == 1


def test_a_shorter_ttl_behind_a_longer_one_is_never_read_and_leaves_with_it() -> None:
    kept: _Expiring[str, int] = _Expiring()
    kept.set("long", 1, expires=100.0)
    kept.set("short", 2, expires=10.0)
    kept.sweep(now=50.0)
    assert kept.get("short", now=50.0) is None  # expired, though still held
    kept.sweep(now=101.0)
    assert len(kept) == 0
