"""`ConnectionHolder`: WeCom allows one long connection per bot (a new subscribe kicks the old one
off), so instances sharing a store take turns instead of kicking each other.

* On a shared store (Redis) the instance that holds the lease `wecom-connection:<bot>` connects;
  the others stand by (`standby`, shown so on the status page) and look again every third of
  the lease, so one takes over within about `1⅓ × lease` of the holder's death. The holder
  renews the lease every third of it; a renewal refused (another instance has it) ends its
  connection. Messages do not depend on who holds it: they go through the shared inbox.
* When WeCom says another connection took the bot over (`disconnected_event`), someone outside
  this lease did (another deployment, a developer's laptop): the kicked instance marks the bot
  kicked in the store for `kicked_retry` seconds, so no instance of ours subscribes again and
  kicks it back before then. Unless the lease says it was one of ours (this one's lapsed and
  another took it): then this one just stands by. A lease is renewed once more between opening
  the socket and subscribing, so a connect slower than the lease never kicks its new holder.
* On a store only this process uses (SQLite, memory) there is nobody to take turns with: no lease,
  but the kicked mark still holds back this process's own retries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.errors import StoreError
from gateway.i18n import N_
from gateway.store import LeaseStore, Store, lease_store

log = logging.getLogger(__name__)

# Reports why this instance is not connecting ("" once it may): the status page's detail,
# translated there (`translate`).
Report = Callable[[str], None]
HELD_ELSEWHERE = N_("another instance holds this bot's connection")
KICKED = N_("another connection took this bot over; waiting before subscribing again")


class LeaseLost(ConnectionError):
    """Another instance holds the bot's connection lease now: this connection must end."""


class ConnectionHolder:
    def __init__(self, store: Store, bot: str, owner: str, ttl: float, kicked_for: float) -> None:
        self._store = store
        self._leases: LeaseStore | None = lease_store(store)
        self.key = f"wecom-connection:{bot}"
        self._kicked_key = f"wecom-kicked:{bot}"
        self.owner = owner
        self.ttl = ttl
        self._kicked_for = kicked_for
        self.holding = False

    async def acquire(self, report: Report) -> None:
        """Until this instance may connect: no other instance holds the lease (it is ours now) and
        the bot is not marked kicked by someone else's connection (our own mark is ours to lift:
        we get here after waiting it out, or on an admin's reconnect)."""
        waiting = ""
        while True:
            why = await self._why_not()
            if not why:
                if waiting:
                    log.info("connection lease taken over", extra={"platform": "wecom", "lease": self.key})
                report("")
                return
            if why != waiting:
                log.info("standing by: %s", why, extra={"platform": "wecom", "lease": self.key})
                report(why)
                waiting = why
            await asyncio.sleep(self.ttl / 3)

    async def _why_not(self) -> str:
        try:
            kicked_by = await self._store.cache_get(self._kicked_key)
            if kicked_by and kicked_by != self.owner:
                return KICKED
            if self._leases is None:
                return ""
            if await self._leases.acquire_lease(self.key, self.owner, self.ttl):
                self.holding = True
                return ""
        except StoreError as e:
            return f"store unavailable, cannot tell who holds the connection: {e}"
        return HELD_ELSEWHERE

    async def renew(self) -> bool:
        """Renew the lease now; False when another instance holds it. A store that cannot be
        reached keeps it (True): nobody else can take the lease either."""
        if self._leases is None:
            return True
        try:
            if not await self._leases.acquire_lease(self.key, self.owner, self.ttl):
                self.holding = False
                return False
        except StoreError as e:
            log.warning("connection lease not renewed: %s", e, extra={"platform": "wecom"})
        return True

    async def renew_until_lost(self) -> None:
        """Renew the lease every third of it; returns when another instance holds it."""
        if self._leases is None:
            await asyncio.Event().wait()  # nothing to renew: runs until cancelled
            return
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not await self.renew():
                return

    async def release(self) -> None:
        """Give the lease up (shutdown): a standby instance takes over at its next look."""
        if self._leases is None or not self.holding:
            return
        self.holding = False
        try:
            await self._leases.release_lease(self.key, self.owner)
        except StoreError as e:
            log.warning("connection lease not released, it expires by itself: %s", e, extra={"platform": "wecom"})

    async def kicked(self) -> bool:
        """Another connection took the bot over: hold every instance of ours back for a while.
        False (nothing marked) when it was another instance of ours, which holds the lease now
        (this one's lapsed: a stalled loop, a store that lost its keys): that one is the bot's
        connection, this one stands by."""
        if not await self.renew():
            return False
        try:
            await self._store.cache_put(self._kicked_key, self.owner, self._kicked_for)
        except StoreError as e:
            log.warning("kicked mark not stored: %s", e, extra={"platform": "wecom"})
        await self.release()
        return True
