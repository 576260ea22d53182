"""Per-conversation leases on a store several instances share: whoever holds a conversation's
lease answers it, so two instances never answer one conversation at the same time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .backoff import Backoff
from .errors import StoreError
from .messages import InboundMessage
from .store import LeaseStore
from .tasks import stop_task

log = logging.getLogger(__name__)


class Leases:
    def __init__(self, store: LeaseStore | None, owner: str, ttl: float) -> None:
        self._store = store  # None: only this process uses the store, its workers already order it
        self._owner = owner
        self._ttl = ttl

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[list[InboundMessage] | None]:
        """Hold the conversation's lease (waiting while another instance has it), renewed. Yields
        the conversation's pending inbox entries as read with the lease (one store round trip);
        None when the store is not shared."""
        store = self._store
        if store is None:
            yield None
            return
        backoff = Backoff(first=0.02, cap=1.0)
        while True:
            try:
                pending = await store.lease_pending(key, self._owner, self._ttl)
                if pending is not None:
                    break
            except StoreError as e:
                if backoff.attempt == 0:
                    log.error("store unavailable, conversation waits: %s", e, extra={"conversation": key})
            await asyncio.sleep(backoff.next())
        # The renewing task starts only once a renewal is due: most answers end before that,
        # and a timer costs a fifth of a task started and stopped around every answer.
        renewer: asyncio.Task[None] | None = None

        def renew() -> None:
            nonlocal renewer
            renewer = asyncio.create_task(self._renew(store, key), name=f"lease:{key}")

        due = asyncio.get_running_loop().call_later(self._ttl / 3, renew)
        try:
            yield pending
        finally:
            due.cancel()
            await stop_task(renewer)
            try:
                await store.release_lease(key, self._owner)
            except StoreError as e:
                log.warning("lease not released, it expires by itself: %s", e, extra={"conversation": key})

    async def _renew(self, store: LeaseStore, key: str) -> None:
        """Renew now (a third of the TTL after taking it), then every third of the TTL."""
        while True:
            try:
                if not await store.acquire_lease(key, self._owner, self._ttl):
                    log.error("lease lost to another instance", extra={"conversation": key})
            except StoreError as e:
                log.warning("lease renewal failed: %s", e, extra={"conversation": key})
            await asyncio.sleep(self._ttl / 3)
