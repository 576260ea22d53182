"""Streaming cards, shared by the adapters (DingTalk AI card, Feishu CardKit card).

A subclass says how to create a card, push text into it, end it, and send the answer as plain
messages; `CardStream` decides when, and what a failure means (docs/dingtalk.md and
docs/feishu.md, "Card lifecycle"):

* the first text opens the card at once; later updates go out no faster than `interval` (the
  newest text at that moment; what falls between is carried by the next update or by `finish`);
  with the API budget nearly spent, only the final text;
* every call is retried while it fails transiently (`PlatformError.retryable`: throttling, 5xx,
  timeouts), each retry idempotent in the platform's way; an update that still fails ends the
  streaming, and the card keeps what it shows;
* `finish` closes the card with the complete answer whenever the platform still takes it, also
  after streaming broke; only a card that refuses it, or that nobody received, leaves the answer to
  plain messages. Once the card holds the complete answer, failing to mark it finished is no reason
  to send the answer again: the card stays recorded and is finished later.

While a card is open it is recorded in the store (`CardBook`), so neither a crash nor a restart
leaves it unfinished: the next start hands it to the resumed answer of its message, or closes it
with the text it was to end with, or with `INTERRUPTED`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from .errors import PlatformError, StoreError
from .i18n import N_
from .messages import InboundMessage
from .metrics import Metrics
from .retry import retry_transient
from .store import CardRecord, Store

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a card is left showing, worded in its message's locale by the adapter (gateway/i18n.py).
INTERRUPTED = N_("The answer was interrupted, please ask again.")
SENT_AS_MESSAGE = N_("The answer was sent as a message.")
SWEEP_INTERVAL = 30.0  # seconds between looks for cards left unfinished

# Closes a recorded card with its text (or INTERRUPTED); raises `PlatformError` when it could not.
Settle = Callable[[CardRecord], Awaitable[None]]


class CardNotShown(PlatformError):
    """The card was made, but nobody received it: the answer must go out as a message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class CardBook:
    """One bot's open cards, recorded in the store while open. A store failure costs only the
    record (it is logged), never an answer."""

    def __init__(self, platform: str, bot: str) -> None:
        self.platform = platform
        self.bot = bot
        self._store: Store | None = None
        self._live: set[str] = set()  # card keys a stream of this process fills right now
        self._adopted: dict[str, CardRecord] = {}  # request id -> the card its resumed answer takes over

    def new(self, card_id: str, message: InboundMessage, sequence: int = 0) -> CardRecord:
        return CardRecord(self.platform, self.bot, card_id, message, sequence, None, time.time())

    async def open(self, record: CardRecord) -> None:
        self._live.add(record.key)
        await self._write("recorded", lambda store: store.card_open(record))

    async def update(self, record: CardRecord) -> None:
        await self._write("updated", lambda store: store.card_update(record))

    async def done(self, record: CardRecord) -> None:
        await self._write("forgotten", lambda store: store.card_done(record.key))
        self._live.discard(record.key)  # only now: the sweep must not see it recorded and not live

    def leave(self, record: CardRecord) -> None:
        """No stream fills the card any more, though it is not finished: it stays recorded, and
        the sweep (or the next start) finishes it."""
        self._live.discard(record.key)

    def adopt(self, message: InboundMessage) -> CardRecord | None:
        """The card a previous process opened for `message`, if its answer is to take it over."""
        record = self._adopted.pop(message.request_id, None)
        if record is not None:
            self._live.add(record.key)
        return record

    async def _write(self, what: str, op: Callable[[Store], Awaitable[None]]) -> None:
        if self._store is None:
            return
        try:
            await op(self._store)
        except StoreError as e:
            log.warning("card not %s in the store: %s", what, e, extra={"platform": self.platform})

    # -- after a crash or restart ----------------------------------------------------------------
    async def start(self, store: Store, older_than: float) -> list[CardRecord]:
        """At start: the cards of this bot a previous process left open, to be finished. On a
        store only this process uses, that is all of them, except the cards whose message is still
        in the inbox: those wait for its resumed answer (`adopt`), so the user gets one card. On a
        shared store another instance may be filling a card: only those opened more than
        `older_than` seconds ago (no answer takes that long, so their process is gone)."""
        self._store = store
        try:
            if store.shared:
                return await self._orphans(older_than)
            records = await self._mine()
            pending = {m.request_id for m in await store.inbox_pending()} if records else set()
        except StoreError as e:
            log.error("open cards not readable, left for later: %s", e, extra={"platform": self.platform})
            return []
        rest = []
        for record in records:
            if record.message.request_id in pending:
                self._adopted[record.message.request_id] = record
            else:
                rest.append(record)
        if records:
            log.info(
                "cards left open by a previous process",
                extra={"platform": self.platform, "count": len(records), "resumed": len(records) - len(rest)},
            )
        return rest

    async def sweep(self, settle: Settle, first: list[CardRecord], older_than: float) -> None:
        """Finish `first`, then now and then every card nobody here fills or waits to fill: on an
        unshared store any (one whose finish failed), on a shared one those opened more than
        `older_than` seconds ago."""
        await self.settle(first, settle)
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.settle(await self._orphans(older_than), settle)
            except StoreError as e:
                log.warning("open cards not readable: %s", e, extra={"platform": self.platform})

    async def _mine(self) -> list[CardRecord]:
        assert self._store is not None
        return [r for r in await self._store.cards_open() if r.platform == self.platform and r.bot == self.bot]

    async def _orphans(self, older_than: float) -> list[CardRecord]:
        assert self._store is not None
        cutoff = time.time() - older_than if self._store.shared else math.inf
        waiting = {r.key for r in self._adopted.values()}
        return [r for r in await self._mine() if r.key not in self._live | waiting and r.opened_at <= cutoff]

    async def settle(self, records: list[CardRecord], settle: Settle) -> None:
        """Close each card with its text; one that failed in a way retrying may fix stays
        recorded for the next sweep, one the platform refuses for good is forgotten."""
        for record in records:
            try:
                await settle(record)
            except PlatformError as e:
                if e.retryable:
                    log.warning("open card not finished yet, trying later: %s", e, extra=_fields(record))
                    continue
                log.warning("open card cannot be finished, forgotten: %s", e, extra=_fields(record))
            except Exception:  # a bad record must not end the sweep for every other card
                log.exception("open card cannot be finished, forgotten", extra=_fields(record))
            else:
                log.info("open card finished", extra=_fields(record))
            await self.done(record)


class CardStream(ABC):
    """One answer streamed into one card (a `ReplyStream`). A card that shows the model's thinking
    apart from the answer (`ReplyStream.fold`) sets `folds`, and finds the thinking in `thinking`."""

    folds = False

    def __init__(
        self,
        book: CardBook,
        message: InboundMessage,
        interval: float,
        metrics: Metrics,
        final_only: bool = False,
        record: CardRecord | None = None,
    ) -> None:
        self._book = book
        self._message = message
        self._interval = interval
        self._metrics = metrics
        self._final_only = final_only
        self.record = record  # once the card exists (or, taken over, from the start)
        self.shown: str | None = None  # the text the card last accepted; None: unknown
        self._broken = False
        self._last_push = 0.0
        self._last_text = ""
        self.thinking = ""  # as `fold` gave it last: shown only where `folds`
        self._last_thinking = ""

    @property
    def platform(self) -> str:
        return self._book.platform

    # -- what a platform supplies ------------------------------------------------------------------
    @abstractmethod
    async def _create(self, text: str) -> None:
        """Create the card showing `text` and show it to the asker (retried), recording it with
        `_opened` once it exists. Raises `PlatformError`: then nobody sees the card, and its
        record is dropped."""

    @abstractmethod
    async def _update(self, text: str) -> None:
        """Show `text` in the card (retried). Raises `PlatformError`."""

    @abstractmethod
    async def _end(self, text: str) -> bool:
        """Put the complete answer into the card and finish it; True when the card shows it. Ends
        with `_closed()` (finished) or `_left(text)` (to be finished later with `text`)."""

    @abstractmethod
    async def _deliver(self, text: str) -> None:
        """The answer as plain messages: the card does not show it (or nobody received it)."""

    @abstractmethod
    async def settle(self, text: str) -> None:
        """Close a recorded card with `text` (after a restart); raises `PlatformError`."""

    # -- for the platform's methods ----------------------------------------------------------------
    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await retry_transient(call, platform=self.platform, what=what, metrics=self._metrics)

    async def _opened(self, record: CardRecord) -> None:
        self.record = record
        await self._book.open(record)

    async def _recorded(self, **changes: object) -> None:
        """Record a change of the open card (what it is to end with, the sequence used)."""
        assert self.record is not None
        self.record = replace(self.record, **changes)  # type: ignore[arg-type]
        await self._book.update(self.record)

    async def _closed(self) -> None:
        if self.record is not None:
            await self._book.done(self.record)

    async def _left(self, text: str) -> None:
        if self.record is not None:
            await self._recorded(text=text)
            self._book.leave(self.record)

    def _fields(self) -> dict[str, object]:
        return {"platform": self.platform, "request_id": self._message.request_id}

    async def _start(self, text: str) -> None:
        try:
            await self._create(text)
        except PlatformError:
            await self._closed()
            self.record = None
            raise

    # -- ReplyStream -------------------------------------------------------------------------------
    def wants_update(self) -> bool:
        if self._broken or self._final_only:
            return False
        return self.record is None or time.monotonic() - self._last_push >= self._interval

    def fold(self, reasoning: str) -> None:
        if self.folds:
            self.thinking = reasoning

    async def update(self, text: str) -> None:
        if (text, self.thinking) == (self._last_text, self._last_thinking) or not self.wants_update():
            return
        now = time.monotonic()
        self._last_push, self._last_text, self._last_thinking = now, text, self.thinking
        try:
            if self.record is None:
                await self._start(text)
            else:
                await self._update(text)
        except PlatformError as e:
            log.warning("card streaming stopped, the card keeps what it shows: %s", e, extra=self._fields())
            self._broken = True

    async def finish(self, text: str) -> None:
        if self.record is None and not self._broken:
            try:
                await self._start(text)
            except PlatformError as e:
                log.warning("no card, sending the answer as a message: %s", e, extra=self._fields())
                self._broken = True
        if self.record is not None and await self._end(text):
            return
        await self._deliver(text)


def _fields(record: CardRecord) -> dict[str, object]:
    return {"platform": record.platform, "card": record.card_id, "request_id": record.message.request_id}
