"""Answers streamed into a Feishu CardKit card, on the shared `CardStream`.

The card is created and sent as a reply on the first text, then its markdown element replaced. The
final text follows `render`: if it needs several parts, the card ends with the first and the rest
follow as replies; if it needs a post (too many tables), the card ends with a pointer to it.
Replies go out through `deliver` (the adapter's reply path, idempotent per part by its `uuid`),
never through the adapter itself.

Sequence numbers: CardKit refuses an operation on a card whose `sequence` is not above every
earlier one (300317). So a retry takes the next number: repeating a text or settings update that
did arrive is harmless (it sets the same whole text again), while a reused number would be refused.
The numbers handed out are recorded with the card, a block at a time, so after a restart they go
on above every number used before.

A card that takes no more text (Feishu closed its streaming after about 10 minutes, or refuses it
for good) keeps what it shows; what it does not show follows as replies.

The model's thinking (`[model] reasoning = "fold"`) goes into a collapsed panel above the answer,
its own markdown element streamed like the answer's (`render.thinking_panel`). The panel is part of
the card from its creation, so only a card made while the model was already thinking has one (the
thinking comes first); thinking that begins after the answer is left out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

from gateway.errors import PlatformError
from gateway.i18n import translator
from gateway.messages import InboundMessage
from gateway.metrics import Metrics
from gateway.render import Part
from gateway.store import CardRecord
from gateway.streaming import SENT_AS_MESSAGE, CardBook, CardStream

from .api import FeishuApi, StreamingClosed
from .images import Uploaded, card_images, with_images
from .render import (
    MANY_TABLES_NOTE,
    THINKING_ID,
    THINKING_PENDING,
    folded,
    render,
    stream_view,
    streaming_card,
)

log = logging.getLogger(__name__)

# Send these parts in order as replies to the message: (parts, idempotency kind, index of the first).
Deliver = Callable[[Sequence[Part], str, int], Awaitable[None]]

SEQUENCE_BLOCK = 100  # sequence numbers recorded ahead at a time (one store write per block)
CONTINUED = "…"  # starts the reply that continues a card cut short


class FeishuCardStream(CardStream):
    folds = True

    def __init__(
        self,
        api: FeishuApi,
        book: CardBook,
        message: InboundMessage,
        deliver: Deliver,
        interval: float,
        metrics: Metrics,
        record: CardRecord | None = None,
        mention: str = "",
        images: Callable[[], Uploaded | None] = lambda: None,
    ) -> None:
        super().__init__(book, message, interval, metrics, record=record)
        self._api, self._deliver_parts = api, deliver
        self._mention = mention  # the asker's open_id in a group: the card (or first reply) @mentions them
        self._images = images  # the answer's images uploaded for it (`images.upload_images`), if any
        self._card_id = record.card_id if record else ""
        self._sequence = self._reserved = record.sequence if record else 0
        self._streaming = True  # False once Feishu closed the card's streaming mode
        self._rest: list[Part] | None = None  # the parts not delivered yet, once known
        self._rest_kind, self._rest_from = "answer", 0
        self._panel = False  # the card has the thinking panel
        self._thinking_shown = ""

    # -- CardKit calls -----------------------------------------------------------------------------
    async def _next_sequence(self) -> int:
        self._sequence += 1
        if self._sequence > self._reserved:  # recorded before it is used
            self._reserved = self._sequence + SEQUENCE_BLOCK - 1
            await self._recorded(sequence=self._reserved)
        return self._sequence

    async def _call(self, what: str, op: Callable[[int], Awaitable[None]]) -> None:
        async def attempt() -> None:
            await op(await self._next_sequence())

        try:
            await self._retry(what, attempt)
        except StreamingClosed:
            self._streaming = False
            raise

    async def _set(self, text: str) -> None:
        if text != self.shown:
            await self._call("feishu card update", partial(self._api.set_card_text, self._card_id, text))
            self.shown = text

    async def _close(self, text: str) -> None:
        await self._call("feishu card close", partial(self._api.close_card, self._card_id, text))

    async def _fold(self) -> None:
        """The newest thinking into the panel, when the card has one and it changed."""
        thinking = folded(self.thinking)
        if self._panel and thinking != self._thinking_shown:
            set_text = partial(self._api.set_card_text, self._card_id, thinking, element=THINKING_ID)
            await self._call("feishu card thinking", set_text)
            self._thinking_shown = thinking

    # -- the stream --------------------------------------------------------------------------------
    async def _create(self, text: str) -> None:
        thinking = folded(self.thinking)
        view = stream_view(text) or THINKING_PENDING
        body = streaming_card(view, thinking, self._mention)
        self._card_id = await self._retry("feishu card create", partial(self._api.create_card, body))
        self._panel, self._thinking_shown = bool(thinking), thinking
        self._reserved = SEQUENCE_BLOCK
        await self._opened(self._book.new(self._card_id, self._message, self._reserved))
        card = Part(view, "interactive", {"type": "card", "data": {"card_id": self._card_id}})
        # Idempotent per card, not per message: a card made after a restart must still be shown.
        await self._deliver_parts([card], f"card:{self._card_id}", 0)
        self.shown = view

    async def _update(self, text: str) -> None:
        await self._fold()
        await self._set(stream_view(text) or THINKING_PENDING)

    async def _end(self, text: str) -> bool:
        parts = render(text)
        in_card = parts[0].msg_type == "interactive"
        card_text = parts[0].text if in_card else translator(self._message.locale)(MANY_TABLES_NOTE)
        await self._recorded(text=card_text)  # from here on, a restart closes the card with it
        try:
            await self._fold()
        except PlatformError as e:  # the thinking is a side show: the answer still goes in
            log.warning("card took no final thinking: %s", e, extra=self._fields())
        try:
            await self._set(card_text)
        except PlatformError as e:
            log.warning("card took no final text, the rest follows as replies: %s", e, extra=self._fields())
            await self._keep_shown()
            return False
        if in_card and len(parts) == 1:
            await self._append_images()
        try:
            await self._close(text)
        except StreamingClosed:
            await self._closed()  # Feishu closed it itself, with the final text in it
        except PlatformError as e:
            # The text is complete; only the "generating" look remains: not worth a second answer.
            log.warning("card holds the answer but is not closed, closing it later: %s", e, extra=self._fields())
            await self._left(card_text)
        else:
            await self._closed()
        self._rest, self._rest_from = (parts[1:], 1) if in_card else (parts, 0)
        self._rest = with_images(self._rest, self._images())
        await self._send_rest()
        return True

    async def _append_images(self) -> None:
        """The answer's uploaded images as `img` elements at the end of the card (before it is
        closed); one that fails leaves them to follow as image messages."""
        uploaded = self._images()
        if uploaded is None or not uploaded.keys or uploaded.shown:
            return
        uuid = f"img-{self._card_id}"[:64]
        append = partial(self._api.append_card_elements, self._card_id, card_images(uploaded), uuid)
        try:
            await self._call("feishu card images", append)
        except PlatformError as e:  # the text is in: the images follow as image messages
            log.warning("card took no images, they follow as messages: %s", e, extra=self._fields())
            return
        uploaded.shown = True

    async def _keep_shown(self) -> None:
        """The card ends with what it shows: closed now unless Feishu closed it, else later."""
        if not self._streaming:
            await self._closed()
            return
        try:
            await self._close(self.shown or "")
        except StreamingClosed:
            await self._closed()
        except PlatformError as e:
            log.warning("card not closed, closing it later: %s", e, extra=self._fields())
            left = translator(self._message.locale)(SENT_AS_MESSAGE)
            await self._left(self.shown if self.shown is not None else left)
        else:
            await self._closed()

    async def _deliver(self, text: str) -> None:
        """As replies, what the card does not show: the rest of the answer after the text the card
        shows, or all of it (no card, or one showing something else); a failure halfway resumes
        with the part that failed, never repeating one."""
        if self._rest is None:
            shown = self.shown if self.record is not None else None
            if shown and text.startswith(shown) and len(text) > len(shown):
                self._rest, self._rest_kind = render(CONTINUED + text[len(shown) :]), "rest"
            else:
                self._rest, self._rest_kind = render(text, self._mention), "answer"
            self._rest, self._rest_from = with_images(self._rest, self._images()), 0
        await self._send_rest()

    async def _send_rest(self) -> None:
        while self._rest:
            await self._deliver_parts(self._rest[:1], self._rest_kind, self._rest_from)
            self._rest, self._rest_from = self._rest[1:], self._rest_from + 1

    async def settle(self, text: str) -> None:
        try:
            await self._set(text)
            await self._close(text)
        except StreamingClosed:
            return  # Feishu closed it: it takes nothing more, and shows nothing "generating"
