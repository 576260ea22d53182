"""Web chat: `/chat` page plus a browser websocket, through the same dispatcher as every channel.

Browser -> server: `{"type": "message", "id": "<client uuid>", "text": "..."}`.
Server -> browser: `hello` (the session), `accepted` / `busy` / `error`, then `delta` (new text),
`done` (full text), or `notice` (a short non-model reply). A browser keeps one conversation, keyed by
the session the server issued in `hello`; the page keeps it in localStorage and hands it back as
`?session=`, so a reload keeps the context.

A session is `<id>.<mac>`: a random id and the server's HMAC of it, so it cannot be chosen or
guessed by a client, only handed back (a value the server did not issue starts a new session). The
id alone names the conversation in logs, metrics and message ids; the mac never leaves the hello
frame. The key is derived from the secret that signs admin sessions (`[admin] jwt_secret`, or the
login token when no password is set: sessions then outlive a restart), else random per process.
The sender, for rate limits and the dispatcher's fair share, is the client's address, not the
session: a new session per message gains nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import uuid
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import aiohttp_jinja2
import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from gateway.adapter import DEFAULT_BOT, Adapter
from gateway.admission import Admission, Dropped
from gateway.errors import PlatformError
from gateway.i18n import N_, Locale, translator
from gateway.keys import AUTH, CHANNELS, LIVE, METRICS
from gateway.messages import Attachment, ConversationKind, InboundMessage, Reply, ReplyKind
from gateway.metrics import Metrics

from .auth import client_address

log = logging.getLogger(__name__)

PLATFORM = "web"
MAX_TEXT = 16_000
_SESSION_RE = re.compile(r"^([0-9a-f]{16})\.([A-Za-z0-9_-]{22})$")
_SESSION_CONTEXT = b"botgate web chat session:"


class Sessions:
    """Issues and checks web chat sessions (`<id>.<mac>`, see the module doc)."""

    def __init__(self) -> None:
        self._process_key = secrets.token_bytes(32)

    def _key(self, secret: bytes) -> bytes:
        if not secret:
            return self._process_key
        return hmac.new(secret, b"botgate web chat sessions", hashlib.sha256).digest()

    def _mac(self, key: bytes, session_id: str) -> str:
        digest = hmac.new(key, _SESSION_CONTEXT + session_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()

    def issue(self, secret: bytes) -> tuple[str, str]:
        """A new session: (its id, the value the page keeps)."""
        session_id = secrets.token_hex(8)
        return session_id, f"{session_id}.{self._mac(self._key(secret), session_id)}"

    def check(self, value: str, secret: bytes) -> str | None:
        """The id of a session this server issued, else None."""
        match = _SESSION_RE.match(value)
        if match is None:
            return None
        session_id, mac = match.groups()
        return session_id if hmac.compare_digest(mac, self._mac(self._key(secret), session_id)) else None


@dataclass(frozen=True, slots=True)
class WebChatConfig:
    """The web chat has no app of its own to configure: one transport, no API quota."""

    mode: str = "websocket"
    monthly_api_budget: int = 0


class BrowserSockets:
    """The web chat's "platform API": the open browser sockets of each session (conversation)."""

    def __init__(self) -> None:
        self._sockets: dict[str, set[web.WebSocketResponse]] = defaultdict(set)

    def add(self, session: str, ws: web.WebSocketResponse) -> None:
        self._sockets[session].add(ws)

    def discard(self, session: str, ws: web.WebSocketResponse) -> None:
        self._sockets[session].discard(ws)
        if not self._sockets[session]:
            del self._sockets[session]

    async def push(self, session: str, frame: Mapping[str, object]) -> None:
        sockets = [ws for ws in self._sockets.get(session, ()) if not ws.closed]
        if not sockets:
            raise PlatformError("web chat session is gone", retryable=False)
        data = orjson.dumps(frame).decode()
        for ws in sockets:
            await ws.send_str(data)

    async def close_all(self) -> None:
        for ws in [ws for group in self._sockets.values() for ws in group]:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


class WebChatStream:
    """Sends only the new suffix of the answer as `delta` frames, then `done` with the full text."""

    def __init__(self, sockets: BrowserSockets, message: InboundMessage) -> None:
        self._sockets = sockets
        self._message = message
        self._sent = 0

    def wants_update(self) -> bool:
        return True  # every delta goes to the browser at once

    async def update(self, text: str) -> None:
        if len(text) > self._sent:
            await self._sockets.push(self._message.conversation_id, {"type": "delta", "text": text[self._sent :]})
            self._sent = len(text)

    async def finish(self, text: str) -> None:
        frame = {"type": "done", "text": text, "reply_to": self._message.message_id}
        await self._sockets.push(self._message.conversation_id, frame)

    def fold(self, reasoning: str) -> None:
        """The page has no collapsed view: the thinking is left out."""


class WebChatAdapter(Adapter[WebChatConfig, BrowserSockets]):
    """The browser chat on the shared skeleton. Its events arrive already parsed (`parse_frame`
    answers the browser's protocol errors itself), so `parse` only passes them on."""

    platform = PLATFORM
    long_transport = ""  # none: browsers connect to us

    @classmethod
    def modes(cls) -> Mapping[str, tuple[str, ...]]:
        return {"websocket": ("websocket",)}

    def __init__(self, cfg: WebChatConfig, metrics: Metrics, name: str = DEFAULT_BOT) -> None:
        super().__init__(cfg, metrics, name)
        self.sockets = BrowserSockets()
        self.sessions = Sessions()

    def make_api(self, http: aiohttp.ClientSession) -> BrowserSockets:
        return self.sockets

    async def parse(self, body: object, transport: str) -> InboundMessage | Dropped:
        return body if isinstance(body, InboundMessage) else Dropped("malformed", "not a browser message")

    async def send(self, reply: Reply) -> None:
        kind = "notice" if reply.kind is ReplyKind.NOTICE else "done"
        frame = {"type": kind, "text": reply.text, "reply_to": reply.to.message_id}
        await self.sockets.push(reply.to.conversation_id, frame)

    async def open_stream(self, message: InboundMessage) -> WebChatStream:
        return WebChatStream(self.sockets, message)

    async def fetch(self, message: InboundMessage, attachment: Attachment) -> tuple[bytes, str]:
        raise PlatformError("web chat has no attachments", retryable=False)

    async def close_all(self, app: web.Application) -> None:
        """on_shutdown (after the dispatcher drained): close browser sockets, so aiohttp does not
        wait its whole shutdown timeout for these never-ending handlers."""
        await self.sockets.close_all()

    # -- HTTP ---------------------------------------------------------------------------------
    @aiohttp_jinja2.template("chat.html")
    async def page(self, request: web.Request) -> dict[str, object]:
        return {"locale": self.locale(request.headers.get("Accept-Language"))}

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        auth = request.app.get(AUTH)
        secret = auth.secret(request.app[LIVE].config.admin) if auth is not None else b""
        value = request.query.get("session", "")
        session = self.sessions.check(value, secret)
        if session is None:
            session, value = self.sessions.issue(secret)
        sender = client_of(request)
        locale = self.locale(request.headers.get("Accept-Language"))  # the page's, for its messages
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
        await ws.prepare(request)
        self.sockets.add(session, ws)
        await ws.send_str(orjson.dumps({"type": "hello", "session": value}).decode())
        try:
            async for frame in ws:
                if frame.type is WSMsgType.TEXT:
                    await self._on_text(ws, session, sender, frame.data, locale)
                elif frame.type is WSMsgType.ERROR:
                    break
        finally:
            self.sockets.discard(session, ws)
        return ws

    async def _on_text(
        self, ws: web.WebSocketResponse, session: str, sender: str, data: str, locale: Locale | None = None
    ) -> None:
        message = parse_frame(data, session, sender, locale)
        if isinstance(message, str):
            await ws.send_str(orjson.dumps({"type": "error", "error": message}).decode())
            return
        admission = await self.admit(message, "websocket")
        frame: dict[str, object] = {"type": admission.value, "id": message.message_id}
        if admission in (Admission.UNAVAILABLE, Admission.CLOSED):
            error = translator(message.locale)(N_("not accepted ({reason}), please retry"), reason=admission.value)
            frame = {"type": "error", "id": message.message_id, "error": error}
        await ws.send_str(orjson.dumps(frame).decode())


def client_of(request: web.Request) -> str:
    """Who is chatting, for the per-user limits: the client's address (the peer, or behind one of
    `[server] trusted_proxies` the address it forwarded), so every tab and session of one client is
    one sender."""
    return client_address(request) or "unknown"


def parse_frame(data: str, session: str, sender: str = "", locale: Locale | None = None) -> InboundMessage | str:
    """A browser frame -> `InboundMessage`, or an error string for the browser. `session` is the
    session id (the conversation), `sender` the client (`client_of`; "" = the session), `locale`
    the page's (errors are worded in it; None: English, and the adapter chooses the message's)."""
    _ = translator(locale or Locale.EN)
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _("malformed JSON")
    if not isinstance(body, dict) or body.get("type") != "message":
        return _('expected {"type": "message", "text": ...}')
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        return _("text must be a non-empty string")
    if len(text) > MAX_TEXT:
        return _("text longer than {limit} characters", limit=MAX_TEXT)
    message_id = body.get("id")
    if not isinstance(message_id, str) or not 0 < len(message_id) <= 64:
        message_id = uuid.uuid4().hex
    return InboundMessage(
        platform=PLATFORM,
        transport="websocket",
        conversation_id=session,
        conversation_kind=ConversationKind.DM,
        sender_id=sender or session,
        sender_name="web",
        text=text,
        mentioned=True,
        message_id=f"{session}:{message_id}",
        locale=locale,
    )


def setup(app: web.Application) -> None:
    adapter = WebChatAdapter(WebChatConfig(), app[METRICS])
    app[CHANNELS][adapter.key] = adapter
    app.cleanup_ctx.append(adapter.ctx)
    app.router.add_get("/chat", adapter.page)
    app.router.add_get("/chat/ws", adapter.websocket)
    app.on_shutdown.append(adapter.close_all)
