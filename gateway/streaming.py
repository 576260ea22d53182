"""Throttled card streaming shared by the adapters (DingTalk AI card, Feishu card / CardKit).

A subclass says how to create the card and how to push text into it; this base decides when:
updates no faster than `interval` (a trailing update is carried by the next one or by `finish`),
nothing but the final text when the API budget is nearly spent, and on any card failure one plain
message instead (`fallback`), so the user gets exactly one complete answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from .errors import PlatformError

log = logging.getLogger(__name__)


class CardStream:
    def __init__(
        self,
        interval: float,
        fallback: Callable[[str], Awaitable[None]],
        final_only: bool = False,
    ) -> None:
        self._interval = interval
        self._fallback = fallback
        self._final_only = final_only
        self._opened = False
        self._broken = False
        self._last_push = 0.0
        self._last_text = ""

    async def _open(self, text: str) -> None:
        """Create and deliver the card showing `text`."""
        raise NotImplementedError

    async def _push(self, text: str, final: bool) -> None:
        """Replace the card's text (`final` closes the stream)."""
        raise NotImplementedError

    async def update(self, text: str) -> None:
        if self._broken or self._final_only or text == self._last_text:
            return
        now = time.monotonic()
        if self._opened and now - self._last_push < self._interval:
            return
        try:
            if not self._opened:
                await self._open(text)
                self._opened = True
            else:
                await self._push(text, final=False)
        except PlatformError as e:
            log.warning("card streaming failed, the answer will be sent as a message: %s", e)
            self._broken = True
            return
        self._last_push, self._last_text = now, text

    async def finish(self, text: str) -> None:
        if not self._broken:
            try:
                if not self._opened:
                    await self._open(text)
                    self._opened = True
                await self._push(text, final=True)
                return
            except PlatformError as e:
                log.warning("card final update failed, sending the answer as a message: %s", e)
        await self._fallback(text)
