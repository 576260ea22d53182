"""Access-token cache shared by the platform clients: fetched once, refreshed before expiry,
evicted and the call retried once when the platform rejects it, forgotten when the app secret
that fetched it is replaced (a reload)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .errors import TokenRejected
from .logs import register_secret

T = TypeVar("T")

# (token, lifetime in seconds) as the platform's token endpoint returns them.
Fetch = Callable[[], Awaitable[tuple[str, float]]]


class TokenCache:
    def __init__(self, fetch: Fetch, refresh_margin: float = 300.0) -> None:
        self._fetch = fetch
        self._margin = refresh_margin
        self._token = ""
        self._expires_at = 0.0
        self._generation = 0  # moves on with `forget`: a fetch begun before it is not kept
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        """A valid token; one fetch at a time however many callers wait (single flight)."""
        if self._token and time.monotonic() < self._expires_at:
            return self._token
        async with self._lock:
            if self._token and time.monotonic() < self._expires_at:
                return self._token
            generation = self._generation
            token, lifetime = await self._fetch()
            register_secret(token)  # never shown in logs or on the status pages
            if generation == self._generation:  # else fetched with a secret replaced meanwhile
                # Refresh `margin` early, but never treat a short-lived token as already expired.
                margin = min(self._margin, lifetime / 2)
                self._token, self._expires_at = token, time.monotonic() + lifetime - margin
            return token

    def evict(self, token: str) -> None:
        """Forget `token` unless a newer one already replaced it."""
        if self._token == token:
            self._token, self._expires_at = "", 0.0

    def forget(self) -> None:
        """Forget the token whatever it is: the app secret changed, so the next call fetches one
        with the new secret (a fetch still running with the old one is used once, not kept)."""
        self._token, self._expires_at = "", 0.0
        self._generation += 1

    async def call(self, fn: Callable[[str], Awaitable[T]]) -> T:
        """Run `fn(token)`; on `TokenRejected` evict the token and retry exactly once."""
        token = await self.get()
        try:
            return await fn(token)
        except TokenRejected:
            self.evict(token)
            return await fn(await self.get())
