"""A sign of life while an answer is made without a card (docs/chat.md "Working indicator").

With a streaming card the user sees the answer grow; without one (DingTalk without a card template,
Feishu with its API budget nearly spent) they see nothing until it is complete. So, then:

* a channel that can mark the user's message (`Marks`: Feishu's message reaction) marks it while the
  answer is being made and unmarks it when done;
* an answer taking longer than `[chat] long_task_notice` seconds gets one short `STILL_WORKING`
  notice (0: never).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, runtime_checkable

from .capability import supports
from .exchange import Delivery, fields
from .i18n import N_, translator
from .messages import InboundMessage

log = logging.getLogger("gateway.responder")

STILL_WORKING = N_("Still working on it…")


@runtime_checkable
class Marks(Protocol):
    """A channel that can mark a message as being answered (Feishu: a reaction)."""

    async def mark_working(self, message: InboundMessage) -> str:
        """Mark it; returns what `unmark_working` needs ("" when nothing was marked). May raise."""

    async def unmark_working(self, message: InboundMessage, mark: str) -> None:
        """Remove the mark. May raise."""


class Working:
    """While an answer is made without a card: `start` marks the message and sets the notice timer,
    `settle` (before the answer goes out) ends the timer, waiting for a notice being sent so it
    arrives first, and `end` (after it) removes the mark. Failures are logged, never raised."""

    def __init__(self, delivery: Delivery, message: InboundMessage, threshold: float) -> None:
        self._delivery = delivery
        self._message = message
        self._threshold = threshold
        self._mark = ""
        self._timer: asyncio.TimerHandle | None = None
        self._notice: asyncio.Task[None] | None = None

    async def start(self) -> None:
        channel = self._delivery.channel(self._message)
        if supports(channel, Marks):
            try:
                self._mark = await channel.mark_working(self._message)
            except Exception as e:
                log.warning("working mark not set: %s", e, extra=fields(self._message))
        if self._threshold > 0:
            self._timer = asyncio.get_running_loop().call_later(self._threshold, self._nudge)

    def _nudge(self) -> None:
        self._timer = None
        self._notice = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        text = translator(self._message.locale)(STILL_WORKING)
        try:
            await self._delivery.notify(self._message, text)
        except Exception as e:
            log.warning("still-working notice not delivered: %s", e, extra=fields(self._message))

    async def settle(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._notice is not None:
            notice, self._notice = self._notice, None
            await notice

    async def end(self) -> None:
        await self.settle()
        if not self._mark:
            return
        mark, self._mark = self._mark, ""
        channel = self._delivery.channel(self._message)
        if supports(channel, Marks):
            try:
                await channel.unmark_working(self._message, mark)
            except Exception as e:
                log.warning("working mark not removed: %s", e, extra=fields(self._message))
