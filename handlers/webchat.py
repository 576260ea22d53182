"""Web chat: `/chat` page plus a browser websocket, through the same dispatcher as every channel.

Browser -> server: `{"type": "message", "id": "<client uuid>", "text": "..."}`.
Server -> browser: `accepted` / `busy` / `error`, then `delta` (new text), `done` (full text), or
`notice` (a short non-model reply). A browser tab is one conversation, keyed by a session id the page
keeps in localStorage, so a reload keeps the context.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import defaultdict

import aiohttp_jinja2
import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from gateway.admission import Admission
from gateway.channel import ChannelState, ChannelStatus
from gateway.errors import PlatformError
from gateway.keys import CHANNELS, DISPATCHER
from gateway.messages import Attachment, ConversationKind, InboundMessage, Reply, ReplyKind

log = logging.getLogger(__name__)

PLATFORM = "web"
MAX_TEXT = 16_000
_SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


class WebChatStream:
    """Sends only the new suffix of the answer as `delta` frames, then `done` with the full text."""

    def __init__(self, adapter: WebChatAdapter, message: InboundMessage) -> None:
        self._adapter = adapter
        self._message = message
        self._sent = 0

    async def update(self, text: str) -> None:
        if len(text) > self._sent:
            await self._adapter.push(self._message, {"type": "delta", "text": text[self._sent :]})
            self._sent = len(text)

    async def finish(self, text: str) -> None:
        await self._adapter.push(self._message, {"type": "done", "text": text, "reply_to": self._message.message_id})


class WebChatAdapter:
    platform = PLATFORM

    def __init__(self) -> None:
        self._sockets: dict[str, set[web.WebSocketResponse]] = defaultdict(set)

    def status(self) -> ChannelStatus:
        return ChannelStatus(PLATFORM, ChannelState.CONNECTED, transports=("websocket",))

    async def push(self, message: InboundMessage, frame: dict[str, object]) -> None:
        sockets = [ws for ws in self._sockets.get(message.conversation_id, ()) if not ws.closed]
        if not sockets:
            raise PlatformError("web chat session is gone", retryable=False)
        data = orjson.dumps(frame).decode()
        for ws in sockets:
            await ws.send_str(data)

    async def send(self, reply: Reply) -> None:
        kind = "notice" if reply.kind is ReplyKind.NOTICE else "done"
        await self.push(reply.to, {"type": kind, "text": reply.text, "reply_to": reply.to.message_id})

    async def open_stream(self, message: InboundMessage) -> WebChatStream:
        return WebChatStream(self, message)

    async def fetch(self, message: InboundMessage, attachment: Attachment) -> tuple[bytes, str]:
        raise PlatformError("web chat has no attachments", retryable=False)

    async def reconnect(self) -> None:
        return None

    async def close_all(self, app: web.Application) -> None:
        """on_shutdown (after the dispatcher drained): close browser sockets, so aiohttp does not
        wait its whole shutdown timeout for these never-ending handlers."""
        sockets = [ws for group in self._sockets.values() for ws in group]
        for ws in sockets:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    # -- HTTP ---------------------------------------------------------------------------------
    @aiohttp_jinja2.template("chat.html")
    async def page(self, request: web.Request) -> dict[str, object]:
        return {}

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        session = request.query.get("session", "")
        if not _SESSION_RE.match(session):
            session = uuid.uuid4().hex
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
        await ws.prepare(request)
        self._sockets[session].add(ws)
        await ws.send_str(orjson.dumps({"type": "hello", "session": session}).decode())
        try:
            async for frame in ws:
                if frame.type is WSMsgType.TEXT:
                    await self._on_text(request, ws, session, frame.data)
                elif frame.type is WSMsgType.ERROR:
                    break
        finally:
            self._sockets[session].discard(ws)
            if not self._sockets[session]:
                del self._sockets[session]
        return ws

    async def _on_text(self, request: web.Request, ws: web.WebSocketResponse, session: str, data: str) -> None:
        message = parse_frame(data, session)
        if isinstance(message, str):
            await ws.send_str(orjson.dumps({"type": "error", "error": message}).decode())
            return
        admission = await request.app[DISPATCHER].submit(message)
        frame: dict[str, object] = {"type": admission.value, "id": message.message_id}
        if admission in (Admission.UNAVAILABLE, Admission.CLOSED):
            error = f"not accepted ({admission.value}), please retry"
            frame = {"type": "error", "id": message.message_id, "error": error}
        await ws.send_str(orjson.dumps(frame).decode())


def parse_frame(data: str, session: str) -> InboundMessage | str:
    """A browser frame -> `InboundMessage`, or an error string for the browser."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "malformed JSON"
    if not isinstance(body, dict) or body.get("type") != "message":
        return 'expected {"type": "message", "text": ...}'
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        return "text must be a non-empty string"
    if len(text) > MAX_TEXT:
        return f"text longer than {MAX_TEXT} characters"
    message_id = body.get("id")
    if not isinstance(message_id, str) or not 0 < len(message_id) <= 64:
        message_id = uuid.uuid4().hex
    return InboundMessage(
        platform=PLATFORM,
        transport="websocket",
        conversation_id=session,
        conversation_kind=ConversationKind.DM,
        sender_id=session,
        sender_name="web",
        text=text,
        mentioned=True,
        message_id=f"{session}:{message_id}",
    )


def setup(app: web.Application) -> None:
    adapter = WebChatAdapter()
    app[CHANNELS][PLATFORM] = adapter
    app.router.add_get("/chat", adapter.page)
    app.router.add_get("/chat/ws", adapter.websocket)
    app.on_shutdown.append(adapter.close_all)
