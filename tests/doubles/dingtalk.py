"""A DingTalk test double speaking the real wire protocol (docs/protocols/dingtalk.md), on aiohttp.

Stream mode: `POST /v1.0/gateway/connections/open` hands out a one-time ticket for the websocket at
`/connect`; the double pushes SYSTEM and CALLBACK frames there and checks every ACK the client sends.
HTTP: the token endpoint, the robot send APIs, file download (a `downloadUrl` served here), the
AI-card APIs, the robot query `python run.py doctor` uses, and sessionWebhook receivers. Scripted
faults: open-connection failing N times, a token rejected once, card creation failing,
sessionWebhooks answering "expired" (the refused posts are recorded too), sends answering 503 N
times, dropping the socket (now, or right after each of the next N handshakes), raw frames of any
shape, a robot query without the permission, a skewed clock in every answer's `Date` header.
Silence needs no script: the double only sends what a test pushes.

Several clients may be connected at once (several gateway instances); connections are numbered in
the order they opened, and a frame goes to the newest one unless `to=` picks another, as DingTalk
hands each event to one of the app's connections. Like DingTalk, the double redelivers a robot
message nobody ACKed (`redeliver()`: same msgId, new frame id).

The SDK's own client must work against it (tests/test_dingtalk_conformance.py), which is what keeps
the double honest. Tests wait with `wait_for(predicate)`, which wakes on every recorded event.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from aiohttp import WSMsgType, web

TOPIC = "/v1.0/im/bot/messages/get"
TOKEN_ERROR = {"code": "InvalidAuthentication", "message": "不合法的access_token"}
PERMISSION_ERROR = {
    "code": "Forbidden.AccessDenied.AccessTokenPermissionDenied",
    "message": "没有调用该接口的权限",
    "accessdenieddetail": {"requiredScopes": ["Robot.SingleChat.ReadWrite"]},
}
# DingTalk does not document its answer for another app's robot code; any refusal will do.
UNKNOWN_ROBOT = {"code": "InvalidParameter.RobotCode", "message": "robot not found"}
BUSY = {"errcode": -1, "errmsg": "system busy"}


@dataclass
class Ack:
    code: int
    message_id: str
    message: str
    data: Any  # decoded from the JSON string


@dataclass
class DingTalkDouble:
    client_id: str = "ding-app-key"
    client_secret: str = "ding-app-secret"
    base: str = ""  # http://127.0.0.1:PORT, set by whoever serves app()
    # scripted faults
    open_failures: int = 0
    reject_token_once: bool = False
    card_create_fails: bool = False
    expired_sessions: bool = False
    send_failures: int = 0  # sessionWebhook posts and robot sends answering 503 before they work again
    drop_on_connect: int = 0  # websockets cut right after the handshake, before any frame
    robot_permission: bool = True  # False: the robot query is refused for lack of a permission
    clock_offset: float = 0.0  # seconds the double's clock (its Date headers) is ahead of ours
    # what happened
    opens: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    acks: list[Ack] = field(default_factory=list)
    ack_errors: list[str] = field(default_factory=list)
    session_posts: list[dict[str, Any]] = field(default_factory=list)
    refused_session_posts: list[dict[str, Any]] = field(default_factory=list)  # answered "expired"
    api_calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    failed_sends: int = 0
    deliveries: list[tuple[str, str, int]] = field(default_factory=list)  # (frame id, msgId, connection)
    _bodies: dict[str, dict[str, Any]] = field(default_factory=dict)  # msgId -> robot message
    _tickets: set[str] = field(default_factory=set)
    _revoked: set[str] = field(default_factory=set)
    _sockets: dict[int, tuple[web.WebSocketResponse, web.Request]] = field(default_factory=dict)  # open ones
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1.0/gateway/connections/open", self._open)
        app.router.add_get("/connect", self._connect)
        app.router.add_post("/v1.0/oauth2/accessToken", self._token)
        app.router.add_post("/robot/sendBySession", self._session_webhook)
        app.router.add_post("/v1.0/robot/oToMessages/batchSend", self._api("userIds", "msgKey", "msgParam"))
        app.router.add_post(
            "/v1.0/robot/groupMessages/send", self._api("openConversationId", "msgKey", "msgParam")
        )
        app.router.add_post("/v1.0/robot/messageFiles/download", self._api("downloadCode"))
        app.router.add_post(
            "/v1.0/card/instances/createAndDeliver", self._api("cardTemplateId", "outTrackId", "openSpaceId")
        )
        app.router.add_put("/v1.0/card/streaming", self._api("outTrackId", "key", "content", "isFinalize"))
        app.router.add_put("/v1.0/card/instances", self._api("outTrackId", "cardData"))
        app.router.add_get("/files/{code}", self._file)
        app.router.add_post("/v1.0/robot/plugins/query", self._api("robotCode"))
        app.on_response_prepare.append(self._date)
        return app

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.clock_offset:
            response.headers["Date"] = formatdate(time.time() + self.clock_offset, usegmt=True)

    # -- waiting -----------------------------------------------------------------------------
    def _record(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    @property
    def connected(self) -> bool:
        return bool(self.open_connections)

    @property
    def open_connections(self) -> list[int]:
        """Numbers of the connections open now, oldest first."""
        return [n for n, (ws, _) in self._sockets.items() if not ws.closed]

    def _target(self, to: int | None) -> int | None:
        """Connection `to` if open, else None; without `to`, the newest open one."""
        open_now = self.open_connections
        if to is None:
            return open_now[-1] if open_now else None
        return to if to in open_now else None

    def calls(self, path: str) -> list[dict[str, Any]]:
        return [body for _, p, body in self.api_calls if p == path]

    # -- payloads ----------------------------------------------------------------------------
    def message(
        self,
        text: str = "hello",
        *,
        msg_id: str | None = None,
        group: bool = False,
        at: bool = True,
        staff_id: str = "staff1",
        nick: str = "Alice",
        conversation_id: str | None = None,
        msgtype: str = "text",
        content: dict[str, Any] | None = None,
        expires_in: float = 5400.0,
    ) -> dict[str, Any]:
        """A robot message body as DingTalk sends it (§A.8), its sessionWebhook pointing here."""
        now = int(time.time() * 1000)
        body: dict[str, Any] = {
            "conversationId": conversation_id
            or (f"cid-group-{uuid.uuid4().hex[:6]}" if group else f"cid-dm-{staff_id}"),
            "conversationType": "2" if group else "1",
            "chatbotCorpId": "ding-corp",
            "chatbotUserId": "$:LWCP_v1:$robot",
            "msgId": msg_id or f"msg{uuid.uuid4().hex}",
            "msgtype": msgtype,
            "senderNick": nick,
            "senderId": f"$:LWCP_v1:${staff_id}",
            "senderStaffId": staff_id,
            "senderCorpId": "ding-corp",
            "isAdmin": False,
            "isInAtList": at if group else False,
            "atUsers": [{"dingtalkId": "$:LWCP_v1:$robot"}] if group and at else [],
            "sessionWebhook": f"{self.base}/robot/sendBySession?session={uuid.uuid4().hex}",
            "sessionWebhookExpiredTime": now + int(expires_in * 1000),
            "createAt": now,
            "robotCode": self.client_id,
        }
        if group:
            body["conversationTitle"] = "Team"
        if msgtype == "text":
            body["text"] = {"content": text}
        else:
            body["content"] = content or {}
        return body

    def add_file(self, code: str, data: bytes, mime: str = "image/png") -> None:
        self.files[code] = (data, mime)

    # -- pushing frames ----------------------------------------------------------------------
    async def _send(
        self, frame_type: str, topic: str, data: dict[str, Any], frame_id: str | None, to: int | None
    ) -> str:
        await self.wait_for(lambda: self._target(to) is not None)
        number = self._target(to)
        assert number is not None
        frame_id = frame_id or f"frame-{next(self._ids)}"
        if frame_type == "CALLBACK":
            self.deliveries.append((frame_id, data["msgId"], number))
            self._bodies[data["msgId"]] = data
        await self._sockets[number][0].send_str(
            json.dumps(
                {
                    "specVersion": "1.0",
                    "type": frame_type,
                    "headers": {
                        "appId": "app-1",
                        "connectionId": "conn-1",
                        "contentType": "application/json",
                        "messageId": frame_id,
                        "time": str(int(time.time() * 1000)),
                        "topic": topic,
                    },
                    "data": json.dumps(data),  # a JSON *string* (§A.5)
                }
            )
        )
        return frame_id

    async def push(self, body: dict[str, Any], frame_id: str | None = None, to: int | None = None) -> str:
        """Deliver a robot message as a CALLBACK frame (to connection `to`, else the newest);
        returns the frame's messageId."""
        return await self._send("CALLBACK", TOPIC, body, frame_id, to)

    async def system(self, topic: str, data: dict[str, Any] | None = None, to: int | None = None) -> str:
        return await self._send("SYSTEM", topic, data or {}, None, to)

    async def raw(self, data: str | bytes, to: int | None = None) -> None:
        """Send any text or binary frame as it is (fuzzing the client's frame handling)."""
        await self.wait_for(lambda: self._target(to) is not None)
        number = self._target(to)
        assert number is not None
        ws = self._sockets[number][0]
        await (ws.send_str(data) if isinstance(data, str) else ws.send_bytes(data))

    async def drop(self, to: int | None = None) -> None:
        """Cut the TCP connection under the websocket, no close frame."""
        number = self._target(to)
        assert number is not None
        transport = self._sockets[number][1].transport
        assert transport is not None
        transport.abort()

    def acked(self, frame_id: str) -> Ack | None:
        return next((a for a in self.acks if a.message_id == frame_id), None)

    async def wait_acked(self, frame_id: str) -> Ack:
        await self.wait_for(lambda: self.acked(frame_id) is not None)
        ack = self.acked(frame_id)
        assert ack is not None
        return ack

    def acked_messages(self) -> set[str]:
        """msgIds of which at least one delivery was ACKed: DingTalk considers them handed over."""
        acked = {a.message_id for a in self.acks}
        return {msg_id for frame_id, msg_id, _ in self.deliveries if frame_id in acked}

    async def redeliver(self, to: int | None = None) -> list[str]:
        """Deliver again every robot message none of whose deliveries was ACKed (as DingTalk does
        within about a minute, docs/protocols/dingtalk.md §A.7): same body and msgId, a new frame id. Returns the
        msgIds redelivered."""
        done = self.acked_messages()
        pending = [m for m in dict.fromkeys(msg_id for _, msg_id, _ in self.deliveries) if m not in done]
        for msg_id in pending:
            await self.push(self._bodies[msg_id], to=to)
        return pending

    # -- stream handshake --------------------------------------------------------------------
    async def _open(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.opens.append(body)
        self._record()
        if body.get("clientId") != self.client_id or body.get("clientSecret") != self.client_secret:
            return web.json_response({"code": "InvalidClient", "message": "bad credentials"}, status=401)
        if self.open_failures > 0:
            self.open_failures -= 1
            return web.json_response({"code": "ServiceUnavailable", "message": "scripted"}, status=503)
        if {"type": "CALLBACK", "topic": TOPIC} not in body.get("subscriptions", []):
            return web.json_response({"code": "InvalidParameter", "message": "no subscriptions"}, status=400)
        ticket = uuid.uuid4().hex
        self._tickets.add(ticket)
        return web.json_response({"endpoint": f"ws://{request.host}/connect", "ticket": ticket})

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:
            return web.json_response({"code": "InvalidTicket"}, status=403)
        self._tickets.discard(ticket)  # one connection per ticket
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        number = self.connections
        self._sockets[number] = (ws, request)
        self._record()
        if self.drop_on_connect > 0:
            self.drop_on_connect -= 1
            await self.drop(number)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    self._check_ack(msg.data)
        finally:
            del self._sockets[number]
            self._record()
        return ws

    def _check_ack(self, raw: str) -> None:
        """Record an ACK, noting anything the real server would not accept (§A.6)."""
        try:
            frame = json.loads(raw)
            headers = frame["headers"]
            ack = Ack(frame["code"], headers["messageId"], frame["message"], json.loads(frame["data"]))
            if not isinstance(ack.code, int) or headers.get("contentType") != "application/json":
                self.ack_errors.append(f"bad code or contentType: {raw}")
        except (ValueError, KeyError, TypeError) as e:
            self.ack_errors.append(f"{type(e).__name__}: {raw}")
        else:
            self.acks.append(ack)
        self._record()

    # -- HTTP APIs ---------------------------------------------------------------------------
    async def _token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("appKey") != self.client_id or body.get("appSecret") != self.client_secret:
            return web.json_response({"code": "invalidClientIdOrSecret", "message": "bad"}, status=400)
        token = f"AT-{len(self.tokens_issued) + 1}"
        self.tokens_issued.append(token)
        self._record()
        return web.json_response({"accessToken": token, "expireIn": 7200})

    def _api(self, *required: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            token = request.headers.get("x-acs-dingtalk-access-token", "")
            body = await request.json()
            if token not in self.tokens_issued or token in self._revoked:
                return web.json_response(TOKEN_ERROR, status=401)
            if self.reject_token_once:
                self.reject_token_once = False
                self._revoked.add(token)
                return web.json_response(TOKEN_ERROR, status=401)
            if self._failing(request.path):
                return web.json_response(BUSY, status=503)
            missing = [k for k in required if k not in body]
            if missing:
                return web.json_response({"code": "MissingParameter", "message": str(missing)}, status=400)
            self.api_calls.append((request.method, request.path, body))
            self._record()
            return self._answer(request, body)

        return handle

    def _failing(self, path: str) -> bool:
        """Whether this send is one of the scripted `send_failures`."""
        sends = ("/sendBySession", "/batchSend", "/groupMessages/send")
        if self.send_failures <= 0 or not path.endswith(sends):
            return False
        self.send_failures -= 1
        self.failed_sends += 1
        self._record()
        return True

    def _answer(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        path = request.path
        if path.endswith("/plugins/query"):
            if not self.robot_permission:
                return web.json_response(PERMISSION_ERROR, status=403)
            if body["robotCode"] != self.client_id:
                return web.json_response(UNKNOWN_ROBOT, status=400)
            return web.json_response({"pluginInfoList": []})
        if path.endswith("/createAndDeliver") and self.card_create_fails:
            return web.json_response({"code": "InvalidParameter", "message": "scripted"}, status=400)
        if path.endswith("/messageFiles/download"):
            if body["downloadCode"] not in self.files:
                return web.json_response({"code": "InvalidDownloadCode", "message": "unknown"}, status=400)
            return web.json_response({"downloadUrl": f"{self.base}/files/{body['downloadCode']}"})
        if path.endswith("/batchSend"):
            return web.json_response(
                {"processQueryKey": "q1", "invalidStaffIdList": [], "flowControlledStaffIdList": []}
            )
        if path.endswith("/createAndDeliver"):
            return web.json_response({"success": True, "result": {"outTrackId": body["outTrackId"]}})
        return web.json_response({"success": True, "processQueryKey": "q1"})

    async def _session_webhook(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self._failing(request.path):
            return web.json_response(BUSY, status=503)
        post = {"session": request.query.get("session", ""), **body}
        if self.expired_sessions:
            self.refused_session_posts.append(post)
            self._record()
            return web.json_response({"errcode": 300001, "errmsg": "session expired"})
        self.session_posts.append(post)
        self._record()
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def _file(self, request: web.Request) -> web.Response:
        data, mime = self.files[request.match_info["code"]]
        return web.Response(body=data, content_type=mime)
