"""A WeCom (企业微信) AI-bot double on aiohttp, speaking the real protocols (docs/protocols/wecom.md).

Long connection (`ws_url`, the websocket at `/`): JSON text frames (`handlers.wecom.frame`).
`aibot_subscribe` checks bot_id and secret (93019 / 853000) and a subscribe rate (`subscribe_limit`
per `subscribe_window` s: 45009); one connection per bot: a second subscribe sends
`disconnected_event` to the old socket and closes it (`kick_closes = False`: the socket stays open
but gets nothing more, as some peers saw). Every client frame is acknowledged by `req_id` (`ack`)
unless `answer_acks = False`; `ping` unless `answer_pings = False` (with `answer_ws_pings` for
websocket pings: `go_silent()` stops all three, a socket that looks open but is dead).

Pushes: `push(body)` sends an `aibot_msg_callback` (bodies from `text()`, `image()`, `mixed()`,
`voice()`, `file()`, `video()`, with `quote=` and `group=`; group text starts "@BotName ", as WeCom
sends it), `push_event(eventtype, …)` an `aibot_event_callback`; both return the frame's `req_id`.
`redeliver(msgid)` pushes a message again with the same msgid and a new req_id;
`redeliver_unanswered = True` does that on every successful subscribe for each message nothing
answered yet (WeCom documents duplicate callbacks; that it replays on reconnect is unverified).

Replies: `aibot_respond_msg` stream frames are recorded per callback `req_id` (`streams(req_id)`,
`Stream.snapshots`, `.finished`, `.text`); a refresh replaces the text (full snapshots). Refused as
WeCom refuses them: an unknown req_id or an event's (846605), content over 20480 bytes (40058), a
stream older than `stream_lifetime` s from its first frame (846608), a frame after `finish` (40058),
more than `per_minute` / `per_hour` new messages to one conversation (45009). Welcome and card-update
replies must answer an event of their kind within `event_reply_deadline` s (else 846605).
`aibot_send_msg` (`sent`) only reaches a conversation that messaged the bot (else 40058). Uploads
(`aibot_upload_media_*`) give a media_id (`media`). Every refusal is in `refused`.
Codes the platform does not document for a case (40058 for size / finish / not activated, 846605
for a late welcome) are the double's choice, listed in docs/protocols/wecom.md §2.9.

Media: `host_media(data)` encrypts a file with a fresh `aeskey` and serves it at a URL that expires
after `media_lifetime` s (COS's 403 "Request has expired" then); returns `(url, aeskey)`.
`response_url`: `POST /cgi-bin/aibot/response?response_code=…` takes one plain JSON reply per code
(`active_replies`); `response_url(code)` makes one.

Callback (URL) mode: `CallbackClient` builds what WeCom sends to the gateway's webhook (the signed
GET with `echostr`, encrypted POSTs, the stream-refresh polls) and opens the encrypted passive reply.

Tests wait with `wait_for(predicate)`, woken by every frame and request; `wait_stream(req_id)`.
The official SDK's client runs against it in tests/test_wecom_double.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import ClientSession, WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from handlers.wecom import frame as wf
from handlers.wecom.crypto import CallbackCrypto, encrypt_media
from tests.doubles.waiting import Waitable

BOT_ID = "aibTESTBOT01"
SECRET = "long-connection-secret-test"
BOT_NAME = "小助手"
USER = "zhangsan"
GROUP = "wrGROUPCHAT01"
# URL-callback mode credentials (a 43-character EncodingAESKey, as the admin console makes them).
TOKEN = "callbackTokenTest"
ENCODING_AES_KEY = base64.b64encode(bytes(range(100, 132))).decode().rstrip("=")


@dataclass
class Stream:
    """A stream message as the user sees it: the last snapshot; finished once a finish frame came."""

    req_id: str
    stream_id: str
    conversation: str
    started: float
    snapshots: list[str] = field(default_factory=list)
    finished: bool = False
    feedback_id: str = ""

    @property
    def text(self) -> str:
        return self.snapshots[-1] if self.snapshots else ""


@dataclass
class Sent:
    """A message that is not a stream: a markdown/media reply, a welcome, a card update, a push."""

    cmd: str
    req_id: str
    conversation: str
    body: dict[str, Any]


@dataclass
class Pushed:
    cmd: str
    req_id: str
    body: dict[str, Any]
    at: float
    answered: bool = False

    @property
    def conversation(self) -> str:
        return str(self.body.get("chatid") or self.body.get("from", {}).get("userid", ""))

    @property
    def eventtype(self) -> str:
        return str(self.body.get("event", {}).get("eventtype", "")) if self.cmd == wf.EVENT_CALLBACK else ""


@dataclass
class Connection:
    number: int
    ws: web.WebSocketResponse
    subscribed: bool = False
    kicked: bool = False
    pings: int = 0


@dataclass
class Upload:
    kind: str
    filename: str
    total_size: int
    total_chunks: int
    md5: str
    chunks: dict[int, bytes] = field(default_factory=dict)


# -- callback bodies, as WeCom sends them (path/100719) ------------------------------------------------
_ids = itertools.count(1)


def _base(msgtype: str, group: str, user: str, msgid: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "msgid": msgid or f"msg{next(_ids):06d}",
        "aibotid": BOT_ID,
        "chattype": "group" if group else "single",
        "from": {"userid": user},
        "msgtype": msgtype,
    }
    if group:
        body["chatid"] = group
    return body


def text(content: str, *, group: str = "", user: str = USER, msgid: str = "", mention: str = BOT_NAME,
         quote: dict[str, Any] | None = None) -> dict[str, Any]:
    """A text message; in a group it starts with "@<mention> " (WeCom pushes only @-messages there)."""
    body = _base("text", group, user, msgid)
    body["text"] = {"content": f"@{mention} {content}" if group and mention else content}
    if quote is not None:
        body["quote"] = quote
    return body


def image(url: str, aeskey: str, *, user: str = USER, msgid: str = "") -> dict[str, Any]:
    return {**_base("image", "", user, msgid), "image": {"url": url, "aeskey": aeskey}}


def file(url: str, aeskey: str, *, user: str = USER, msgid: str = "") -> dict[str, Any]:
    return {**_base("file", "", user, msgid), "file": {"url": url, "aeskey": aeskey}}


def video(url: str, aeskey: str, *, user: str = USER, msgid: str = "") -> dict[str, Any]:
    return {**_base("video", "", user, msgid), "video": {"url": url, "aeskey": aeskey}}


def voice(transcript: str, *, user: str = USER, msgid: str = "") -> dict[str, Any]:
    """A voice message: WeCom sends only its transcription."""
    return {**_base("voice", "", user, msgid), "voice": {"content": transcript}}


def mixed(*items: str | tuple[str, str], group: str = "", user: str = USER, msgid: str = "",
          mention: str = BOT_NAME) -> dict[str, Any]:
    """Text and images in order: a str is text, a (url, aeskey) pair an image."""
    msg_item: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            prefix = f"@{mention} " if group and mention and not msg_item else ""
            msg_item.append({"msgtype": "text", "text": {"content": prefix + item}})
        else:
            msg_item.append({"msgtype": "image", "image": {"url": item[0], "aeskey": item[1]}})
    return {**_base("mixed", group, user, msgid), "mixed": {"msg_item": msg_item}}


def quoted(body: dict[str, Any]) -> dict[str, Any]:
    """The `quote` object for a message quoting `body`."""
    kind = body["msgtype"]
    return {"msgtype": kind, kind: body[kind]}


def event(eventtype: str, *, user: str = USER, group: str = "", detail: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "msgid": f"evt{next(_ids):06d}",
        "create_time": int(time.time()),
        "aibotid": BOT_ID,
        "msgtype": "event",
        "event": {"eventtype": eventtype, **({eventtype: detail} if detail else {})},
    }
    if eventtype != wf.DISCONNECTED_EVENT:
        body["chattype"] = "group" if group else "single"
        body["from"] = {"userid": user}
        if group:
            body["chatid"] = group
    return body


@dataclass
class WeComDouble(Waitable):
    bot_id: str = BOT_ID
    secret: str = SECRET
    subscribe_limit: int = 0  # subscribes per `subscribe_window` s before 45009 (0: no limit)
    subscribe_window: float = 60.0
    kick_closes: bool = True
    answer_acks: bool = True
    answer_pings: bool = True
    answer_ws_pings: bool = True
    redeliver_unanswered: bool = False
    stream_lifetime: float = wf.STREAM_LIFETIME
    event_reply_deadline: float = wf.EVENT_REPLY_DEADLINE
    per_minute: int = wf.CONVERSATION_PER_MINUTE
    per_hour: int = wf.CONVERSATION_PER_HOUR
    media_lifetime: float = wf.MEDIA_URL_LIFETIME
    # Set: websocket handshakes wait for it (a slow connect); `handshakes` counts those begun.
    handshake_gate: asyncio.Event | None = None
    handshakes: int = 0
    base_url: str = ""  # set by `start`

    connections: list[Connection] = field(default_factory=list)
    subscribes: list[dict[str, Any]] = field(default_factory=list)  # every subscribe body received
    frames: list[wf.Frame] = field(default_factory=list)  # every client frame, in order
    pushed: dict[str, Pushed] = field(default_factory=dict)  # by req_id
    stream_list: list[Stream] = field(default_factory=list)
    replies: list[Sent] = field(default_factory=list)  # non-stream respond_msg, welcome, update
    sent: list[Sent] = field(default_factory=list)  # aibot_send_msg
    refused: list[tuple[str, str, int]] = field(default_factory=list)  # (cmd, req_id, errcode)
    media: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)  # media_id -> (type, filename, data)
    hosted: dict[str, tuple[bytes, float, str]] = field(default_factory=dict)  # path id -> (cipher, expiry, name)
    media_gets: list[tuple[str, int]] = field(default_factory=list)  # (path id, HTTP status)
    active_replies: dict[str, dict[str, Any]] = field(default_factory=dict)  # response_code -> body
    _response_codes: set[str] = field(default_factory=set)
    _uploads: dict[str, Upload] = field(default_factory=dict)
    _subscribe_times: list[float] = field(default_factory=list)
    _messages_to: dict[str, list[float]] = field(default_factory=dict)
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.websocket)
        app.router.add_get("/media/{id}", self.serve_media)
        app.router.add_post("/cgi-bin/aibot/response", self.active_reply)
        app.on_shutdown.append(lambda _: self.close_sockets())
        return app

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/"

    # -- what tests wait on (wait_for: tests/doubles/waiting.py) ---------------------------------
    def streams(self, req_id: str) -> list[Stream]:
        return [s for s in self.stream_list if s.req_id == req_id]

    async def wait_stream(self, req_id: str, finished: bool = True, timeout: float = 10.0) -> Stream:
        """The (first) stream answering callback `req_id`, once it exists (and is finished)."""
        await self.wait_for(lambda: any(s.finished or not finished for s in self.streams(req_id)), timeout)
        return next(s for s in self.streams(req_id) if s.finished or not finished)

    @property
    def live(self) -> list[Connection]:
        """Subscribed connections still open and not kicked, oldest first."""
        return [c for c in self.connections if c.subscribed and not c.kicked and not c.ws.closed]

    def go_silent(self) -> None:
        self.answer_acks = self.answer_pings = self.answer_ws_pings = False

    # -- the long connection ------------------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        self.handshakes += 1
        if self.handshake_gate is not None:
            await self._notify()
            await self.handshake_gate.wait()
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        conn = Connection(len(self.connections) + 1, ws)
        self.connections.append(conn)
        await self._notify()
        try:
            async for msg in ws:
                if msg.type is WSMsgType.PING:
                    if self.answer_ws_pings:
                        await ws.pong(msg.data)
                elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await self._on_frame(conn, msg.data)
                await self._notify()
        finally:
            await self._notify()
        return ws

    async def _on_frame(self, conn: Connection, raw: str | bytes) -> None:
        try:
            frame = wf.decode(raw)
        except wf.FrameError:
            await conn.ws.close(code=1007, message=b"invalid frame")  # what else could a server do
            return
        self.frames.append(frame)
        if frame.cmd == wf.PING:
            conn.pings += 1
            if self.answer_pings:
                await self._send(conn, wf.ack(frame.req_id))
            return
        if frame.cmd == wf.SUBSCRIBE:
            errcode, errmsg = await self._subscribe(conn, frame.body or {})
        elif not conn.subscribed:
            errcode, errmsg = wf.INVALID_PARAMETER, "not subscribed"
        else:
            errcode, errmsg, ack_body = self._handle(frame)
            if errcode:
                self.refused.append((frame.cmd, frame.req_id, errcode))
            if self.answer_acks:
                await self._send(conn, wf.ack(frame.req_id, errcode, errmsg if errcode else "ok", ack_body))
            return
        if errcode:
            self.refused.append((frame.cmd, frame.req_id, errcode))
        if self.answer_acks:
            await self._send(conn, wf.ack(frame.req_id, errcode, errmsg))
        if frame.cmd == wf.SUBSCRIBE and not errcode:
            await self._after_subscribe(conn)

    async def _send(self, conn: Connection, frame: wf.Frame) -> None:
        if conn.ws.closed:
            return
        with contextlib.suppress(ConnectionError):  # a socket closing meanwhile (an old, kicked one)
            await conn.ws.send_str(frame.encode())

    async def _subscribe(self, conn: Connection, body: dict[str, Any]) -> tuple[int, str]:
        self.subscribes.append(body)
        now = time.monotonic()
        self._subscribe_times = [t for t in self._subscribe_times if t > now - self.subscribe_window]
        self._subscribe_times.append(now)
        if self.subscribe_limit and len(self._subscribe_times) > self.subscribe_limit:
            return wf.FREQUENCY_LIMIT, "api freq out of limit"
        if body.get("bot_id") != self.bot_id:
            return wf.INVALID_BOT_ID, "invalid bot_id"
        if body.get("secret") != self.secret:
            return wf.BAD_SECRET, "signature is incorrect, please check if the bot secret is correct"
        for old in self.live:  # one connection per bot: the newest wins
            old.kicked = True
            push = wf.callback(wf.EVENT_CALLBACK, self._req_id(), event(wf.DISCONNECTED_EVENT))
            await self._send(old, push)
            if self.kick_closes:
                await old.ws.close()
        conn.subscribed = True
        return wf.OK, "ok"

    async def _after_subscribe(self, conn: Connection) -> None:
        if self.redeliver_unanswered:
            for p in list(self.pushed.values()):
                if p.cmd == wf.MSG_CALLBACK and not p.answered:
                    p.answered = True  # superseded by the redelivery
                    await self.push(p.body, to=conn)

    def _req_id(self) -> str:
        return f"srv{next(self._seq):05d}{os.urandom(4).hex()}"

    async def push(self, body: dict[str, Any], to: Connection | None = None, cmd: str = wf.MSG_CALLBACK) -> str:
        """Push a callback on the newest live connection (waiting for one); its req_id."""
        if to is None:
            await self.wait_for(lambda: self.live)
        conn = to or self.live[-1]
        req_id = self._req_id()
        self.pushed[req_id] = Pushed(cmd, req_id, body, time.monotonic())
        await self._send(conn, wf.callback(cmd, req_id, body))
        await self._notify()
        return req_id

    async def push_event(self, eventtype: str, **fields: Any) -> str:
        return await self.push(event(eventtype, **fields), cmd=wf.EVENT_CALLBACK)

    async def redeliver(self, msgid: str) -> str:
        """Push the message with this msgid again (same body, new req_id)."""
        original = next(p for p in self.pushed.values() if p.body.get("msgid") == msgid)
        return await self.push(original.body, cmd=original.cmd)

    async def close_sockets(self) -> None:
        for conn in self.connections:
            await conn.ws.close()

    # -- client requests ----------------------------------------------------------------------------------
    def _handle(self, frame: wf.Frame) -> tuple[int, str, dict[str, Any] | None]:
        body = frame.body or {}
        if frame.cmd == wf.RESPOND_MSG:
            return (*self._respond(frame.req_id, body), None)
        if frame.cmd in (wf.RESPOND_WELCOME, wf.RESPOND_UPDATE):
            return (*self._event_reply(frame.cmd, frame.req_id, body), None)
        if frame.cmd == wf.SEND_MSG:
            return (*self._send_msg(frame.req_id, body), None)
        if frame.cmd in (wf.UPLOAD_INIT, wf.UPLOAD_CHUNK, wf.UPLOAD_FINISH):
            return self._upload(frame.cmd, body)
        return wf.INVALID_PARAMETER, f"unknown cmd {frame.cmd}", None

    def _quota(self, conversation: str) -> tuple[int, str] | None:
        """Count one new message to `conversation`, unless it is over its quota."""
        now = time.monotonic()
        times = [t for t in self._messages_to.get(conversation, []) if t > now - 3600]
        if len([t for t in times if t > now - 60]) >= self.per_minute or len(times) >= self.per_hour:
            return wf.FREQUENCY_LIMIT, "api freq out of limit"
        self._messages_to[conversation] = [*times, now]
        return None

    @staticmethod
    def _too_long(content: object, what: str) -> tuple[int, str] | None:
        if not isinstance(content, str):
            return wf.INVALID_PARAMETER, f"invalid Request Parameter: {what}"
        if len(content.encode()) > wf.CONTENT_MAX_BYTES:
            return wf.INVALID_PARAMETER, f"{what} exceed max length {wf.CONTENT_MAX_BYTES}"
        return None

    def _respond(self, req_id: str, body: dict[str, Any]) -> tuple[int, str]:
        pushed = self.pushed.get(req_id)
        if pushed is None or pushed.cmd != wf.MSG_CALLBACK:
            return wf.INVALID_REQ_ID, "invalid req_id"
        msgtype = body.get("msgtype")
        if msgtype != "stream":
            payload = body.get(msgtype) if isinstance(msgtype, str) else None
            if not isinstance(payload, dict):
                return wf.INVALID_PARAMETER, "invalid Request Parameter: msgtype"
            if msgtype == "markdown" and (bad := self._too_long(payload.get("content"), "markdown.content")):
                return bad
            if over := self._quota(pushed.conversation):
                return over
            pushed.answered = True
            self.replies.append(Sent(wf.RESPOND_MSG, req_id, pushed.conversation, body))
            return wf.OK, "ok"
        stream = body.get("stream")
        if not isinstance(stream, dict) or not isinstance(stream.get("id"), str) or not stream["id"]:
            return wf.INVALID_PARAMETER, "invalid Request Parameter: stream.id"
        if bad := self._too_long(stream.get("content", ""), "stream.content"):
            return bad
        current = next((s for s in self.streams(req_id) if s.stream_id == stream["id"]), None)
        now = time.monotonic()
        if current is None:
            if over := self._quota(pushed.conversation):
                return over
            feedback = stream.get("feedback")
            current = Stream(req_id, stream["id"], pushed.conversation, now,
                             feedback_id=str(feedback.get("id", "")) if isinstance(feedback, dict) else "")
            self.stream_list.append(current)
        elif now - current.started > self.stream_lifetime:
            return wf.STREAM_EXPIRED, "stream message update expired"
        elif current.finished:
            return wf.INVALID_PARAMETER, "stream message already finished"
        pushed.answered = True
        current.snapshots.append(str(stream.get("content", "")))
        current.finished = stream.get("finish") is True
        return wf.OK, "ok"

    def _event_reply(self, cmd: str, req_id: str, body: dict[str, Any]) -> tuple[int, str]:
        pushed = self.pushed.get(req_id)
        wanted = wf.ENTER_CHAT if cmd == wf.RESPOND_WELCOME else wf.TEMPLATE_CARD_EVENT
        late = pushed is not None and time.monotonic() - pushed.at > self.event_reply_deadline
        if pushed is None or pushed.eventtype != wanted or pushed.answered or late:
            return wf.INVALID_REQ_ID, "invalid req_id"
        if cmd == wf.RESPOND_WELCOME:
            content = body.get("text", {}).get("content") if body.get("msgtype") == "text" else None
            if body.get("msgtype") != "template_card" and (bad := self._too_long(content, "text.content")):
                return bad
        elif body.get("response_type") != "update_template_card":
            return wf.INVALID_PARAMETER, "invalid Request Parameter: response_type"
        pushed.answered = True
        self.replies.append(Sent(cmd, req_id, pushed.conversation, body))
        return wf.OK, "ok"

    def _send_msg(self, req_id: str, body: dict[str, Any]) -> tuple[int, str]:
        chatid = body.get("chatid")
        msgtype = body.get("msgtype")
        if not any(p.conversation == chatid for p in self.pushed.values() if p.cmd == wf.MSG_CALLBACK):
            return wf.INVALID_PARAMETER, "chat has not messaged the bot"
        payload = body.get(msgtype) if isinstance(msgtype, str) else None
        if not isinstance(payload, dict):
            return wf.INVALID_PARAMETER, "invalid Request Parameter: msgtype"
        if msgtype == "markdown" and (bad := self._too_long(payload.get("content"), "markdown.content")):
            return bad
        if "media_id" in payload and payload["media_id"] not in self.media:
            return wf.INVALID_PARAMETER, "invalid media_id"
        if over := self._quota(str(chatid)):
            return over
        self.sent.append(Sent(wf.SEND_MSG, req_id, str(chatid), body))
        return wf.OK, "ok"

    def _upload(self, cmd: str, body: dict[str, Any]) -> tuple[int, str, dict[str, Any] | None]:
        bad = wf.INVALID_PARAMETER, "invalid Request Parameter", None
        if cmd == wf.UPLOAD_INIT:
            try:
                upload = Upload(str(body["type"]), str(body["filename"]), int(body["total_size"]),
                                int(body["total_chunks"]), str(body["md5"]))
            except (KeyError, TypeError, ValueError):
                return bad
            if upload.kind not in ("file", "image", "voice", "video") or not 0 < upload.total_chunks <= 100:
                return bad
            upload_id = f"up{next(self._seq):05d}"
            self._uploads[upload_id] = upload
            return wf.OK, "ok", {"upload_id": upload_id}
        found = self._uploads.get(str(body.get("upload_id")))
        if found is None:
            return bad
        if cmd == wf.UPLOAD_CHUNK:
            index = body.get("chunk_index")
            try:
                data = base64.b64decode(str(body.get("base64_data")), validate=True)
            except ValueError:
                return bad
            if not isinstance(index, int) or not 0 <= index < found.total_chunks or len(data) > 512 * 1024:
                return bad
            found.chunks.setdefault(index, data)  # a repeated chunk is ignored
            return wf.OK, "ok", None
        data = b"".join(found.chunks[i] for i in sorted(found.chunks))
        if len(found.chunks) != found.total_chunks or hashlib.md5(data).hexdigest() != found.md5:
            return wf.INVALID_PARAMETER, "upload incomplete or md5 mismatch", None
        media_id = f"media{next(self._seq):05d}"
        self.media[media_id] = (found.kind, found.filename, data)
        del self._uploads[str(body["upload_id"])]
        return wf.OK, "ok", {"type": found.kind, "media_id": media_id, "created_at": str(int(time.time()))}

    # -- HTTP: media and response_url ---------------------------------------------------------------------
    def host_media(self, data: bytes, filename: str = "file.bin") -> tuple[str, str]:
        """Serve `data` encrypted with a fresh aeskey; (url, aeskey) for a callback body."""
        aeskey = base64.b64encode(os.urandom(32)).decode()
        media_id = os.urandom(8).hex()
        self.hosted[media_id] = (encrypt_media(data, aeskey), time.monotonic() + self.media_lifetime, filename)
        return f"{self.base_url}/media/{media_id}?sign=q-sign-time%3D{int(time.time())}", aeskey

    async def serve_media(self, request: web.Request) -> web.StreamResponse:
        media_id = request.match_info["id"]
        found = self.hosted.get(media_id)
        status = 404 if found is None else 403 if time.monotonic() > found[1] else 200
        self.media_gets.append((media_id, status))
        await self._notify()
        if found is None or status != 200:
            code, message = ("AccessDenied", "Request has expired") if status == 403 else (
                "NoSuchKey", "The specified key does not exist.")
            xml = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
            return web.Response(status=status, text=xml, content_type="application/xml")
        disposition = f"attachment; filename*=UTF-8''{quote(found[2], safe='')}"
        return web.Response(body=found[0], content_type="application/octet-stream",
                            headers={"Content-Disposition": disposition})

    def response_url(self, code: str = "") -> str:
        """A response_url for a callback body: one POST accepted."""
        code = code or f"rc{next(self._seq):05d}"
        self._response_codes.add(code)
        return f"{self.base_url}/cgi-bin/aibot/response?response_code={code}"

    async def active_reply(self, request: web.Request) -> web.Response:
        code = request.query.get("response_code", "")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"errcode": wf.INVALID_PARAMETER, "errmsg": "invalid Request Parameter"})
        if code not in self._response_codes or code in self.active_replies:
            return web.json_response({"errcode": wf.INVALID_PARAMETER, "errmsg": "invalid response_code"})
        content = body.get("markdown", {}).get("content") if isinstance(body, dict) else None
        if isinstance(content, str) and len(content.encode()) > wf.CONTENT_MAX_BYTES:
            return web.json_response({"errcode": wf.INVALID_PARAMETER, "errmsg": "markdown.content exceed max length"})
        self.active_replies[code] = body
        await self._notify()
        return web.json_response({"errcode": 0, "errmsg": "ok"})


async def start(aiohttp_server: Callable[..., Any], **settings: Any) -> WeComDouble:
    """Serve a double on 127.0.0.1 (random port), `settings` overriding its fields; its
    `ws_url` is the long connection's URL, `base_url` the HTTP side's."""
    double = WeComDouble(**settings)
    server: TestServer = await aiohttp_server(double.app(), host="127.0.0.1")
    double.base_url = str(server.make_url("")).rstrip("/")
    return double


# -- callback (URL) mode -------------------------------------------------------------------------------------
_Client = ClientSession | TestClient[Any, Any]  # the gateway's test client, or a session to a URL


@dataclass
class Delivery:
    """What WeCom sent and what the gateway answered (`reply`: the decrypted passive reply, None
    for an empty 200)."""

    status: int
    reply: dict[str, Any] | None
    raw: bytes


@dataclass
class CallbackClient:
    """WeCom's side of the URL-callback mode (path/101033): signs and encrypts what it sends to the
    gateway's webhook, and checks and decrypts the gateway's passive reply."""

    token: str = TOKEN
    encoding_aes_key: str = ENCODING_AES_KEY
    crypto: CallbackCrypto = field(init=False)

    def __post_init__(self) -> None:
        self.crypto = CallbackCrypto.create(self.token, self.encoding_aes_key)

    def verification(self, echo: str = "") -> tuple[dict[str, str], str]:
        """The URL-verification GET's query, and the plaintext the gateway must answer."""
        echo = echo or str(int.from_bytes(os.urandom(8), "big"))
        timestamp, nonce = str(int(time.time())), os.urandom(5).hex()
        echostr = self.crypto.encrypt(echo)
        query = {"msg_signature": self.crypto.signature(timestamp, nonce, echostr), "timestamp": timestamp,
                 "nonce": nonce, "echostr": echostr}
        return query, echo

    def envelope(self, body: dict[str, Any]) -> tuple[dict[str, str], bytes]:
        """An encrypted callback POST: its query (msg_signature, timestamp, nonce) and body."""
        timestamp, nonce = str(int(time.time())), os.urandom(5).hex()
        encrypt = self.crypto.encrypt(orjson.dumps(body))
        query = {"msg_signature": self.crypto.signature(timestamp, nonce, encrypt), "timestamp": timestamp,
                 "nonce": nonce}
        return query, orjson.dumps({"encrypt": encrypt})

    def open_reply(self, raw: bytes, nonce: str) -> dict[str, Any] | None:
        """The gateway's passive reply, decrypted; None for an empty one. AssertionError when
        WeCom would refuse it (bad signature, another nonce, not seconds, not JSON)."""
        if not raw.strip():
            return None
        envelope = orjson.loads(raw)
        assert set(envelope) == {"encrypt", "msgsignature", "timestamp", "nonce"}, envelope
        assert envelope["nonce"] == nonce, "the reply must carry the callback URL's nonce"
        assert isinstance(envelope["timestamp"], int) and abs(envelope["timestamp"] - time.time()) < 3600
        self.crypto.check_signature(envelope["msgsignature"], str(envelope["timestamp"]), nonce, envelope["encrypt"])
        reply = orjson.loads(self.crypto.decrypt(envelope["encrypt"]))
        assert isinstance(reply, dict)
        return reply

    async def deliver(self, client: _Client, path: str, body: dict[str, Any]) -> Delivery:
        """POST a callback (a message, an event or a refresh poll) as WeCom does."""
        query, data = self.envelope(body)
        async with client.post(path, params=query, data=data) as response:
            raw = await response.read()
            reply = self.open_reply(raw, query["nonce"]) if response.status == 200 else None
            return Delivery(response.status, reply, raw)

    @staticmethod
    def refresh(message: dict[str, Any], stream_id: str) -> dict[str, Any]:
        """The stream-refresh poll WeCom sends for a stream reply to `message` (path/100719)."""
        body: dict[str, Any] = {k: message[k] for k in ("aibotid", "chatid", "chattype", "from") if k in message}
        return {"msgid": f"poll{next(_ids):06d}", **body, "msgtype": "stream", "stream": {"id": stream_id}}

    async def converse(self, client: _Client, path: str, message: dict[str, Any], max_polls: int = 50,
                       interval: float = 0.05) -> list[dict[str, Any]]:
        """Deliver `message`, then poll its stream as WeCom does until a reply says finish (at most
        `max_polls` polls, `interval` s apart, as WeCom's client polls on a timer): every reply's
        stream object, in order."""
        first = await self.deliver(client, path, message)
        assert first.status == 200 and first.reply is not None and first.reply.get("msgtype") == "stream", first
        streams = [first.reply["stream"]]
        for _ in range(max_polls):
            if streams[-1].get("finish") is True:
                return streams
            await asyncio.sleep(interval)  # WeCom polls on a timer, not on an event
            poll = await self.deliver(client, path, self.refresh(message, streams[0]["id"]))
            assert poll.status == 200 and poll.reply is not None, poll
            streams.append(poll.reply["stream"])
        raise AssertionError(f"stream not finished after {max_polls} polls: {streams[-1]}")
