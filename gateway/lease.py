"""Per-conversation leases on a store several instances share: whoever holds a conversation's
lease answers it, so two instances never answer one conversation at the same time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .backoff import Backoff
from .errors import StoreError
from .store import LeaseStore
from .tasks import stop_task

log = logging.getLogger(__name__)


class Leases:
    def __init__(self, store: LeaseStore | None, owner: str, ttl: float) -> None:
        self._store = store  # None: only this process uses the store, its workers already order it
        self._owner = owner
        self._ttl = ttl

    @property
    def shared(self) -> bool:
        return self._store is not None

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold the conversation's lease (waiting while another instance has it), renewed."""
        store = self._store
        if store is None:
            yield
            return
        backoff = Backoff(first=0.02, cap=1.0)
        while True:
            try:
                if await store.acquire_lease(key, self._owner, self._ttl):
                    break
            except StoreError as e:
                if backoff.attempt == 0:
                    log.error("store unavailable, conversation waits: %s", e, extra={"conversation": key})
            await asyncio.sleep(backoff.next())
        renewer = asyncio.create_task(self._renew(store, key), name=f"lease:{key}")
        try:
            yield
        finally:
            await stop_task(renewer)
            try:
                await store.release_lease(key, self._owner)
            except StoreError as e:
                log.warning("lease not released, it expires by itself: %s", e, extra={"conversation": key})

    async def _renew(self, store: LeaseStore, key: str) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                if not await store.acquire_lease(key, self._owner, self._ttl):
                    log.error("lease lost to another instance", extra={"conversation": key})
            except StoreError as e:
                log.warning("lease renewal failed: %s", e, extra={"conversation": key})
