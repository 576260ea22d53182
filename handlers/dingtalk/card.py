"""AI-card streaming for DingTalk on the shared `CardStream`: create and deliver the card, stream the
answer into it, then mark it finished (the flow of the SDK's `AIMarkdownCardInstance`, docs/protocols/dingtalk.md §A.9).

The card template must have a markdown variable `msgContent` (streamed) and `flowStatus` (the AI
card states), like DingTalk's own AI card template.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.streaming import CardStream

from .api import DingTalkApi

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


class AICardStream(CardStream):
    def __init__(
        self,
        api: DingTalkApi,
        handle: dict[str, Any],
        template_id: str,
        interval: float,
        fallback: Callable[[str], Awaitable[None]],
        final_only: bool,
    ) -> None:
        super().__init__(interval, fallback, final_only)
        self._api = api
        self._handle = handle
        self._template_id = template_id
        self.out_track_id = f"botgate-{uuid.uuid4().hex}"

    async def _open(self, text: str) -> None:
        await self._api.card_create(deliver_body(self._handle, self._template_id, self.out_track_id, text))

    async def _push(self, text: str, final: bool) -> None:
        await self._api.card_stream(
            {
                "outTrackId": self.out_track_id,
                "guid": uuid.uuid4().hex,
                "key": CONTENT_KEY,
                "content": text,
                "isFull": True,
                "isFinalize": final,
                "isError": False,
            }
        )
        if final:
            await self._api.card_update(
                {
                    "outTrackId": self.out_track_id,
                    "cardData": {"cardParamMap": {"flowStatus": FINISHED, CONTENT_KEY: text}},
                }
            )
