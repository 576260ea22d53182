"""Builders of the Feishu event payloads the double delivers (`im.message.receive_v1`, schema 2.0)."""

from __future__ import annotations

import time
from typing import Any

import orjson

APP_ID, BOT_OPEN_ID = "cli_test", "ou_bot"


def message_event(
    text: str = "hello",
    *,
    message_id: str = "om_1",
    event_id: str | None = None,
    chat_type: str = "p2p",
    chat_id: str = "oc_chat",
    sender: str = "ou_user",
    sender_type: str = "user",
    message_type: str = "text",
    content: dict[str, Any] | None = None,
    mentions: list[dict[str, Any]] | None = None,
    create_time: float | None = None,
    thread_id: str = "",
) -> dict[str, Any]:
    """An `im.message.receive_v1` envelope (schema 2.0) as Feishu delivers it."""
    created = str(int((create_time if create_time is not None else time.time()) * 1000))
    return {
        "schema": "2.0",
        "header": {
            "event_id": event_id or f"ev-{message_id}",
            "event_type": "im.message.receive_v1",
            "create_time": created,
            "token": "vtoken",
            "app_id": APP_ID,
            "tenant_key": "tenant",
        },
        "event": {
            "sender": {
                "sender_id": {"open_id": sender, "union_id": "on_x", "user_id": "u1"},
                "sender_type": sender_type,
                "tenant_key": "tenant",
            },
            "message": {
                "message_id": message_id,
                "root_id": "",
                "parent_id": "",
                "create_time": created,
                "update_time": created,
                "chat_id": chat_id,
                "thread_id": thread_id,
                "chat_type": chat_type,
                "message_type": message_type,
                "content": orjson.dumps(content if content is not None else {"text": text}).decode(),
                "mentions": mentions or [],
            },
        },
    }


def mention(key: str, open_id: str, name: str) -> dict[str, Any]:
    return {"key": key, "id": {"open_id": open_id, "union_id": "on_m", "user_id": ""}, "name": name, "tenant_key": "t"}
