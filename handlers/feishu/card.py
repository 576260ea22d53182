"""Answers streamed into a Feishu CardKit card, on the shared `CardStream`.

The card is created and sent as a reply on the first text, then its markdown element replaced,
each call with a higher `sequence`. The final text follows `render`: if it needs several parts,
the card ends with the first and the rest follow as replies; if it needs a post (too many tables),
the card ends with a pointer to it. Replies go out through `deliver` (the adapter's reply path,
idempotent per part), never through the adapter itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from gateway.errors import PlatformError
from gateway.render import Part
from gateway.streaming import CardStream

from .api import FeishuApi
from .render import MANY_TABLES_NOTE, render, stream_view, streaming_card

log = logging.getLogger(__name__)

# Send these parts in order as replies to the message: (parts, idempotency kind, index of the first).
Deliver = Callable[[Sequence[Part], str, int], Awaitable[None]]


class FeishuCardStream(CardStream):
    def __init__(self, api: FeishuApi, deliver: Deliver, interval: float) -> None:
        super().__init__(interval, fallback=self._deliver_rest)
        self._api, self._deliver = api, deliver
        self._card_id = ""
        self._sequence = 0
        self._shown = ""
        self._rest: list[Part] | None = None  # set once the card holds its final text
        self._rest_from = 0

    async def _open(self, text: str) -> None:
        view = stream_view(text)
        self._card_id = await self._api.create_card(streaming_card(view))
        card = Part(view, "interactive", {"type": "card", "data": {"card_id": self._card_id}})
        # Idempotent per card, not per message: a card made after a restart must still be shown.
        await self._deliver([card], f"card:{self._card_id}", 0)
        self._shown = view

    async def _set(self, text: str) -> None:
        if text != self._shown:
            self._sequence += 1
            await self._api.set_card_text(self._card_id, text, self._sequence)
            self._shown = text

    async def _push(self, text: str, final: bool) -> None:
        if not final:
            await self._set(stream_view(text))
            return
        parts = render(text)
        in_card = parts[0].msg_type == "interactive"
        await self._set(parts[0].text if in_card else MANY_TABLES_NOTE)
        self._rest, self._rest_from = (parts[1:], 1) if in_card else (parts, 0)
        self._sequence += 1
        try:
            await self._api.close_card(self._card_id, text, self._sequence)
        except PlatformError as e:
            # The text is complete; the card merely keeps its "generating" look until Feishu
            # closes streaming itself (after 10 minutes). Not worth a second answer.
            log.warning("could not close the streaming card: %s", e, extra={"platform": "feishu"})
        await self._deliver_rest(text)

    async def _deliver_rest(self, text: str) -> None:
        """Send what the card does not show: all of `text` when the card broke before its final
        text, else the parts not delivered yet (so a failure halfway never repeats a part)."""
        if self._rest is None:
            self._rest, self._rest_from = render(text), 0
        while self._rest:
            await self._deliver(self._rest[:1], "answer", self._rest_from)
            self._rest, self._rest_from = self._rest[1:], self._rest_from + 1
