"""AI-card streaming for DingTalk on the shared `CardStream`: create and deliver the card, stream the
answer into it, then mark it finished (the flow of the SDK's `AIMarkdownCardInstance`,
docs/protocols/dingtalk.md §A.9).

The card template must have a markdown variable `msgContent` (streamed) and `flowStatus` (the AI
card states), like DingTalk's own AI card template.

Idempotency: the card's `outTrackId` is chosen here and kept by every retry and by a restart; a
streaming update keeps its `guid` across its retries. The complete answer reaches the card by
either route: the final streaming update (`isFinalize`), or the card data update that also sets
`flowStatus` finished. So a card whose streaming broke is still closed with the answer, and one
that took the final streaming update is never answered a second time when the status update fails.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from gateway.errors import PlatformError
from gateway.i18n import translator
from gateway.messages import InboundMessage
from gateway.metrics import Metrics
from gateway.store import CardRecord
from gateway.streaming import SENT_AS_MESSAGE, CardBook, CardNotShown, CardStream

from .api import DingTalkApi

log = logging.getLogger(__name__)

CONTENT_KEY = "msgContent"
# AICardStatus values of the SDK; they travel as strings.
INPUTTING, FINISHED = "2", "3"


def can_carry_card(handle: dict[str, Any]) -> bool:
    """A card needs a group id, or in a 1:1 chat the asker's staff id (external users have none)."""
    if handle.get("conversation_type") == "2":
        return bool(handle.get("conversation_id"))
    return bool(handle.get("sender_staff_id"))


def deliver_body(handle: dict[str, Any], template_id: str, out_track_id: str, text: str) -> dict[str, Any]:
    """The createAndDeliver request: the card shows `text` and is already in the "typing" state."""
    body: dict[str, Any] = {
        "cardTemplateId": template_id,
        "outTrackId": out_track_id,
        "cardData": {"cardParamMap": {"flowStatus": INPUTTING, CONTENT_KEY: text}},
        "callbackType": "STREAM",
        "imGroupOpenSpaceModel": {"supportForward": True},
        "imRobotOpenSpaceModel": {"supportForward": True},
        "userIdType": 1,
    }
    staff_id = handle.get("sender_staff_id", "")
    if handle.get("conversation_type") == "2":
        body["openSpaceId"] = f"dtv1.card//IM_GROUP.{handle['conversation_id']}"
        deliver: dict[str, Any] = {"robotCode": handle.get("robot_code", "")}
        if staff_id:  # @mention the asker, as plain group replies do
            deliver["atUserIds"] = {staff_id: handle.get("sender_nick", "")}
        body["imGroupOpenDeliverModel"] = deliver
    else:
        body["openSpaceId"] = f"dtv1.card//IM_ROBOT.{staff_id}"
        body["imRobotOpenDeliverModel"] = {"spaceType": "IM_ROBOT", "robotCode": handle.get("robot_code", "")}
    return body


def delivered(answer: dict[str, Any]) -> bool:
    """Whether createAndDeliver's answer says the card reached its space. An answer without
    `deliverResults` is taken as delivered (the call itself succeeded)."""
    result = answer.get("result")
    results = result.get("deliverResults") if isinstance(result, dict) else None
    if not isinstance(results, list) or not results:
        return answer.get("success", True) is not False
    return any(isinstance(r, dict) and r.get("success") is True for r in results)


class AICardStream(CardStream):
    def __init__(
        self,
        api: DingTalkApi,
        book: CardBook,
        message: InboundMessage,
        template_id: str,
        interval: float,
        metrics: Metrics,
        fallback: Callable[[str], Awaitable[None]],
        final_only: bool = False,
        record: CardRecord | None = None,
    ) -> None:
        # A card taken over after a restart that already had its final text may have finalized
        # its streaming: it is then only finished through its card data.
        streaming = record is None or record.text is None
        super().__init__(book, message, interval, metrics, final_only or not streaming, record)
        self._api = api
        self._handle = message.reply_handle
        self._template_id = template_id
        self._fallback = fallback
        self._streaming = streaming  # False once the streaming variable is finalized (or may be)
        self.out_track_id = record.card_id if record else f"botgate-{uuid.uuid4().hex}"

    async def _create(self, text: str) -> None:
        # Recorded first: a crash after the card was delivered must find it.
        await self._opened(self._book.new(self.out_track_id, self._message))
        body = deliver_body(self._handle, self._template_id, self.out_track_id, text)
        answer = await self._retry("dingtalk card create", partial(self._api.card_create, body))
        if not delivered(answer):
            raise CardNotShown(f"dingtalk card_create: the card reached nobody: {answer.get('result')}")
        self.shown = text

    async def _stream(self, text: str, final: bool) -> None:
        # One guid per update: a retry of it is the same update, not a second one.
        body = {
            "outTrackId": self.out_track_id,
            "guid": uuid.uuid4().hex,
            "key": CONTENT_KEY,
            "content": text,
            "isFull": True,
            "isFinalize": final,
            "isError": False,
        }
        await self._retry("dingtalk card update", partial(self._api.card_stream, body))
        self.shown = text

    async def _finish_data(self, text: str) -> None:
        data = {"cardParamMap": {"flowStatus": FINISHED, CONTENT_KEY: text}}
        body = {"outTrackId": self.out_track_id, "cardData": data}
        await self._retry("dingtalk card finish", partial(self._api.card_update, body))

    async def _update(self, text: str) -> None:
        await self._stream(text, final=False)

    async def _end(self, text: str) -> bool:
        await self._recorded(text=text)  # from here on, a restart closes the card with the answer
        holds_answer = False
        if self._streaming:
            try:
                await self._stream(text, final=True)
                holds_answer = True
            except PlatformError as e:
                log.warning("final streaming update failed, finishing by card data: %s", e, extra=self._fields())
            self._streaming = False
        try:
            await self._finish_data(text)
        except PlatformError as e:
            if holds_answer:  # the user has the answer; only the card's state lags
                log.warning("card not marked finished, trying later: %s", e, extra=self._fields())
                await self._left(text)
                return True
            log.warning("card refused the answer, sending it as a message: %s", e, extra=self._fields())
            await self._left(translator(self._message.locale)(SENT_AS_MESSAGE))
            return False
        self.shown = text
        await self._closed()
        return True

    async def _deliver(self, text: str) -> None:
        await self._fallback(text)

    async def settle(self, text: str) -> None:
        if self._streaming:
            try:  # a card whose streaming is finalized refuses this: the card data still works
                await self._stream(text, final=True)
            except PlatformError as e:
                if e.retryable:
                    raise
        await self._finish_data(text)
