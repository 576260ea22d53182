"""Helpers shared by the test modules, so that no test module imports from another: the web chat,
readiness, metrics, store messages. (A gateway against the DingTalk double: tests/dingtalk_support.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from gateway.keys import METRICS
from gateway.messages import ConversationKind, InboundMessage


# -- the web chat and the HTTP endpoints -----------------------------------------------------------
async def chat(client: Any, ws: Any, text: str, msg_id: str) -> list[dict[str, Any]]:
    """Send one message and collect frames until its final reply."""
    await ws.send_str(orjson.dumps({"type": "message", "id": msg_id, "text": text}).decode())
    frames = []
    async with asyncio.timeout(10):
        while True:
            frame = orjson.loads((await ws.receive()).data)
            frames.append(frame)
            if frame["type"] in ("done", "notice", "error", "busy"):
                return frames


async def readiness(client: Any) -> tuple[int, dict[str, Any]]:
    """`GET /readyz`: its status and JSON body."""
    resp = await client.get("/readyz")
    return resp.status, await resp.json()


def metric(text: str, name: str) -> float:
    """A sample from a `/metrics` page, `name` written as exposed (labels included); 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def sample(app: web.Application, name: str, **labels: str) -> float:
    """A sample of the app's metrics registry (e.g. `botgate_reconnects_total`); 0 if absent."""
    return app[METRICS].registry.get_sample_value(name, labels) or 0.0


# -- the store -----------------------------------------------------------------------------------
def msg(n: int, conversation: str = "c1", **extra: Any) -> InboundMessage:
    """Inbound message number `n` of a DingTalk group conversation."""
    return InboundMessage(
        platform="dingtalk",
        transport="stream",
        conversation_id=conversation,
        conversation_kind=ConversationKind.GROUP,
        sender_id="u1",
        sender_name="Ann",
        text=f"message {n}",
        mentioned=True,
        message_id=f"m{n}",
        **extra,
    )
