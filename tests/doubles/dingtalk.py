"""A DingTalk test double speaking the real wire protocol (docs/protocols/dingtalk.md), on aiohttp.

Stream mode: `POST /v1.0/gateway/connections/open` hands out a one-time ticket for the websocket at
`/connect`; the double pushes SYSTEM and CALLBACK frames there and checks every ACK the client sends.
HTTP: the token endpoint, the robot send APIs, file download (a `downloadUrl` served here), the
AI-card APIs, the robot query `python run.py doctor` uses, and sessionWebhook receivers. AI cards
are held as DingTalk holds them (`cards`, `open_cards()`): a createAndDeliver answer says per space
whether the card arrived (`undelivered` makes it reach nobody), a stream update after `isFinalize`
is refused, a repeated `guid` changes nothing, and each card call can fail N times first
(`card_faults`: throttled, 5xx, refused, or applied with the answer lost), for good
(`card_refused`), or hang (`stall`). Scripted
faults: open-connection failing N times, a token rejected once, card creation failing,
sessionWebhooks answering "expired" (the refused posts are recorded too), sends answering 503 N
times, dropping the socket (now, or right after each of the next N handshakes), raw frames of any
shape, a robot query without the permission, a skewed clock in every answer's `Date` header.
Rate limits and quota as DingTalk answers them (§A.9): more than `qps_limit` calls a second to an
API, or the next `throttle_next` calls, get the QPS-limit refusal (HTTP 403 with its code; the
sessionWebhook, an old API, errcode 90018); once `quota` billable calls are used, the v1.0 APIs
answer `ApiCountLimitForOrg`. Every call's arrival is in `requests`. A token fetched again while
valid is the same token, renewed; an expired one is refused.
Silence needs no script: the double only sends what a test pushes. It answers the client's websocket
pings (counted in `pings`) unless `answer_pings = False`: a socket that looks open but is dead.

Several clients may be connected at once (several gateway instances); connections are numbered in
the order they opened, and a frame goes to the newest one (`spread = True`: to any of them at
random, as DingTalk hands each event to one of the app's connections) unless `to=` picks one.
`rotate()` is DingTalk's `disconnect` (§A.7): the frame, without a messageId like the documented
example, then no more deliveries on that socket and a close some seconds later. Like DingTalk, the
double redelivers a robot message nobody ACKed (`redeliver()`: same msgId, new frame id).

The SDK's own client must work against it (tests/test_dingtalk_conformance.py), which is what keeps
the double honest. Tests wait with `wait_for(predicate)`, which wakes on every recorded event.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
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
# AI cards (§A.9). The calls by kind, and the answers of the scripted card faults: the documented
# QPS limit (HTTP 403 + code), a 5xx, a refusal. DingTalk does not document its answer to a stream
# update after `isFinalize`; the double refuses it with a code of its own.
CARD_CALLS = {
    "/v1.0/card/instances/createAndDeliver": "create",
    "/v1.0/card/streaming": "streaming",
    "/v1.0/card/instances": "update",
}
CARD_FAULTS = {
    "busy": ({"code": "ServiceUnavailable", "message": "scripted"}, 503),
    "throttled": ({"code": "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi", "message": "QPS limit"}, 403),
    "refused": ({"code": "InvalidParameter", "message": "scripted"}, 400),
}
FINALIZED = {"code": "InvalidParameter.double.StreamingFinalized", "message": "card streaming already finalized"}
NO_CARD = {"code": "InvalidParameter.double.CardNotFound", "message": "no card with this outTrackId"}


@dataclass
class AICard:
    """An AI card as the double holds it: its data (`msgContent`, `flowStatus`) as the user sees it."""

    out_track_id: str
    create: dict[str, Any]  # the createAndDeliver body
    delivered: bool  # it reached its space
    params: dict[str, Any]  # cardParamMap as it stands
    streamed: list[dict[str, Any]] = field(default_factory=list)  # accepted streaming updates
    repeated: list[str] = field(default_factory=list)  # guids of streaming updates received again
    finalized: bool = False  # a streaming update with isFinalize was accepted

    @property
    def text(self) -> str:
        return str(self.params.get("msgContent", ""))

    @property
    def finished(self) -> bool:
        return self.params.get("flowStatus") == "3"


@dataclass
class Ack:
    code: int
    message_id: str
    message: str
    data: Any  # decoded from the JSON string
    connection: int = 0  # the socket it came on


@dataclass
class DingTalkDouble:
    client_id: str = "ding-app-key"
    client_secret: str = "ding-app-secret"
    base: str = ""  # http://127.0.0.1:PORT, set by whoever serves app()
    # scripted faults
    open_failures: int = 0
    reject_token_once: bool = False
    card_create_fails: bool = False
    # AI-card faults: kind ("create" | "streaming" | "update") -> faults for its next calls, in
    # order: "busy" (503), "throttled" (403 QPS limit), "refused" (400), "lost" (applied, then 503:
    # the answer was lost, so the retry must be idempotent); `card_refused`: kinds refused for good
    card_faults: dict[str, list[str]] = field(default_factory=dict)
    card_refused: set[str] = field(default_factory=set)
    undelivered: bool = False  # createAndDeliver works, but the card reaches nobody (deliverResults)
    stall: str = ""  # card calls of this kind wait until `release_stalled()`, then fail unapplied
    expired_sessions: bool = False
    send_failures: int = 0  # sessionWebhook posts and robot sends answering 503 before they work again
    lost_answers: int = 0  # sessionWebhook posts delivered whose answer is lost (a proxy's 502 page)
    drop_on_connect: int = 0  # websockets cut right after the handshake, before any frame
    refuse_upgrades: int = 0  # websocket upgrades refused (503) after the ticket was handed out
    refused_tickets: list[str] = field(default_factory=list)  # the tickets of those upgrades
    robot_permission: bool = True  # False: the robot query is refused for lack of a permission
    clock_offset: float = 0.0  # seconds the double's clock (its Date headers) is ahead of ours
    answer_pings: bool = True  # False: websocket pings go unanswered (a dead link that looks open)
    spread: bool = False  # True: a frame without `to=` goes to any open connection, not the newest
    # Rate limits and quota ("调用频次与限流", §A.9): `qps_limit` calls a second to each OpenAPI
    # (the v1.0 APIs and the sessionWebhook alike), more are refused as throttled; `throttle_next`:
    # the next N such calls are refused so whatever the rate; `quota`: billable calls left this month
    # (None: no quota; token calls and refused calls are not counted, as DingTalk meters them).
    qps_limit: int = 0
    throttle_next: int = 0
    throttle_code: str = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"  # or "...QpsLimitForApi"
    quota: int | None = None
    token_lifetime: float = 7200.0  # seconds; a token fetched again within it is the same, renewed
    # what happened
    opens: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    pings: int = 0  # websocket pings received
    acks: list[Ack] = field(default_factory=list)
    ack_errors: list[str] = field(default_factory=list)
    session_posts: list[dict[str, Any]] = field(default_factory=list)
    session_bodies: list[bytes] = field(default_factory=list)  # every sessionWebhook POST as sent
    refused_session_posts: list[dict[str, Any]] = field(default_factory=list)  # answered "expired"
    api_calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    media: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # oapi media/upload: media_id -> (bytes, type)
    media_names: dict[str, str] = field(default_factory=dict)  # media_id -> the uploaded file name
    failed_sends: int = 0
    deliveries: list[tuple[str, str, int]] = field(default_factory=list)  # (frame id, msgId, connection)
    requests: list[tuple[float, str]] = field(default_factory=list)  # (monotonic arrival, path) of API calls
    throttled: list[str] = field(default_factory=list)  # paths of the calls refused as throttled
    quota_refusals: int = 0  # calls refused because the quota was spent
    cards: dict[str, AICard] = field(default_factory=dict)  # by outTrackId
    card_attempts: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)  # (kind, body, outcome)
    stalled: int = 0  # card calls waiting in `stall`
    _unstall: asyncio.Event = field(default_factory=asyncio.Event)
    _bodies: dict[str, dict[str, Any]] = field(default_factory=dict)  # msgId -> robot message
    _tickets: set[str] = field(default_factory=set)
    _revoked: set[str] = field(default_factory=set)
    _token_expires: float = 0.0  # monotonic expiry of the newest token
    _accepted: dict[str, list[float]] = field(default_factory=dict)  # path -> accepted call times (QPS)
    _sockets: dict[int, tuple[web.WebSocketResponse, web.Request]] = field(default_factory=dict)  # open ones
    _draining: set[int] = field(default_factory=set)  # told to disconnect: no more deliveries there
    _rng: random.Random = field(default_factory=lambda: random.Random(7))  # `spread`, reproducibly
    _closers: set[asyncio.Future[None]] = field(default_factory=set)
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
        app.router.add_post("/media/upload", self._media_upload)
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
        """Connection `to` if open, else None; without `to`, the newest open one not told to
        disconnect (with `spread`, any of those)."""
        open_now = self.open_connections
        if to is not None:
            return to if to in open_now else None
        serving = [n for n in open_now if n not in self._draining]
        if not serving:
            return None
        return self._rng.choice(serving) if self.spread else serving[-1]

    def open_cards(self) -> list[AICard]:
        """Cards someone received that are not finished: still "typing" for the user."""
        return [c for c in self.cards.values() if c.delivered and not c.finished]

    def release_stalled(self) -> None:
        self.stall = ""
        self._unstall.set()

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

    async def rotate(
        self, to: int | None = None, close_after: float | None = 10.0, with_id: bool = False, stop: bool = True
    ) -> int:
        """DingTalk's `disconnect` on connection `to` (else the newest): the SYSTEM frame, without a
        messageId unless `with_id`; from then on no frame goes there unless `to=` names it (`stop
        = False`: it stays one of the app's sockets), and the double closes it after `close_after`
        seconds (None: when the test calls `close`). Returns the connection's number."""
        number = self._target(to)
        assert number is not None
        headers = {"contentType": "application/json", "time": str(int(time.time() * 1000)), "topic": "disconnect"}
        if with_id:
            headers["messageId"] = f"frame-{next(self._ids)}"
        frame = {"specVersion": "1.0", "type": "SYSTEM", "headers": headers, "data": json.dumps({"reason": "rotate"})}
        if stop:
            self._draining.add(number)
        await self._sockets[number][0].send_str(json.dumps(frame))
        if close_after is not None:
            asyncio.get_running_loop().call_later(close_after, self._close_later, number)
        return number

    def _close_later(self, number: int) -> None:
        task = asyncio.ensure_future(self.close(number))
        self._closers.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._closers.discard)

    async def close(self, to: int) -> None:
        """Close connection `to` normally (code 1000), as the server ends a rotated socket."""
        if to in self._sockets:
            await self._sockets[to][0].close()

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
        if self.refuse_upgrades > 0:  # a valid ticket, and still no websocket (e.g. a busy gateway)
            self.refuse_upgrades -= 1
            self.refused_tickets.append(ticket)
            self._record()
            return web.json_response({"code": "ServiceUnavailable", "message": "scripted"}, status=503)
        ws = web.WebSocketResponse(autoping=False)  # pings are answered (and counted) below
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
                    self._check_ack(msg.data, number)
                elif msg.type is WSMsgType.PING:
                    self.pings += 1
                    if self.answer_pings:
                        await ws.pong(msg.data)
                    self._record()
        finally:
            del self._sockets[number]
            self._draining.discard(number)
            self._record()
        return ws

    def _check_ack(self, raw: str, connection: int) -> None:
        """Record an ACK, noting anything the real server would not accept (§A.6)."""
        try:
            frame = json.loads(raw)
            headers = frame["headers"]
            ack = Ack(frame["code"], headers["messageId"], frame["message"], json.loads(frame["data"]), connection)
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
        self.requests.append((time.monotonic(), request.path))
        # Within its lifetime the same token comes back, its lifetime renewed ("有效期内重复获取
        # 会返回相同结果并自动续期"); a revoked or expired one is replaced.
        now = time.monotonic()
        current = self.tokens_issued[-1] if self.tokens_issued else ""
        if not current or current in self._revoked or now >= self._token_expires:
            current = f"AT-{len(self.tokens_issued) + 1}"
            self.tokens_issued.append(current)
        self._token_expires = now + self.token_lifetime
        self._record()
        return web.json_response({"accessToken": current, "expireIn": round(self.token_lifetime)})

    def _valid(self, token: str) -> bool:
        """Issued, not revoked, and (if it is the newest) not expired; older ones expired with it."""
        return (
            bool(self.tokens_issued)
            and token == self.tokens_issued[-1]
            and token not in self._revoked
            and time.monotonic() < self._token_expires
        )

    def _limited(self, path: str) -> web.Response | None:
        """The rate-limit or quota answer to this call, if it gets one (and then it is not counted)."""
        now = time.monotonic()
        self.requests.append((now, path))
        session = path.endswith("/sendBySession")  # an old (oapi) API: errcode answers, HTTP 200
        accepted = self._accepted.setdefault(path, [])
        while accepted and accepted[0] <= now - 1.0:
            accepted.pop(0)
        if self.throttle_next > 0 or (self.qps_limit and len(accepted) >= self.qps_limit):
            self.throttle_next = max(0, self.throttle_next - 1)
            self.throttled.append(path)
            self._record()
            if session:
                return web.json_response({"errcode": 90018, "errmsg": "QPS limit of the app for this API"})
            return web.json_response({"code": self.throttle_code, "message": "QPS limit"}, status=403)
        if self.quota is not None and self.quota <= 0 and not session:
            self.quota_refusals += 1
            self._record()
            answer = {"code": "Forbidden.AccessDenied.ApiCountLimitForOrg", "message": "monthly API calls used up"}
            return web.json_response(answer, status=403)
        accepted.append(now)
        return None

    def _bill(self, response: web.Response) -> web.Response:
        """A successful call uses up one call of the quota."""
        if self.quota is not None and response.status < 400:
            self.quota -= 1
        return response

    def _api(self, *required: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            token = request.headers.get("x-acs-dingtalk-access-token", "")
            body = await request.json()
            if not self._valid(token):
                return web.json_response(TOKEN_ERROR, status=401)
            if self.reject_token_once:
                self.reject_token_once = False
                self._revoked.add(token)
                return web.json_response(TOKEN_ERROR, status=401)
            if (limited := self._limited(request.path)) is not None:
                return limited
            if self._failing(request.path):
                return web.json_response(BUSY, status=503)
            kind = CARD_CALLS.get(request.path, "")
            if kind and (fault := await self._card_fault(kind, body)) is not None:
                return fault
            missing = [k for k in required if k not in body]
            if missing:
                return web.json_response({"code": "MissingParameter", "message": str(missing)}, status=400)
            self.api_calls.append((request.method, request.path, body))
            self._record()
            return self._bill(self._answer(request, body))

        return handle

    async def _media_upload(self, request: web.Request) -> web.Response:
        """oapi `media/upload?access_token=…&type=image|file`, multipart `media` -> `media_id`."""
        if not self._valid(request.query.get("access_token", "")):
            return web.json_response({"errcode": 40014, "errmsg": "invalid access_token"})
        form = await request.post()
        media = form.get("media")
        kind = request.query.get("type")
        if kind not in ("image", "file") or not isinstance(media, web.FileField):
            return web.json_response({"errcode": 40004, "errmsg": "invalid media type"})
        media_id = f"@media{len(self.media) + 1}"
        self.media[media_id] = (media.file.read(), media.content_type)
        self.media_names[media_id] = media.filename
        return web.json_response({"errcode": 0, "errmsg": "ok", "type": kind, "media_id": media_id})

    def _failing(self, path: str) -> bool:
        """Whether this send is one of the scripted `send_failures`."""
        sends = ("/sendBySession", "/batchSend", "/groupMessages/send")
        if self.send_failures <= 0 or not path.endswith(sends):
            return False
        self.send_failures -= 1
        self.failed_sends += 1
        self._record()
        return True

    async def _card_fault(self, kind: str, body: dict[str, Any]) -> web.Response | None:
        """The scripted answer to this card call, if it is to fail before it is applied."""
        if kind == self.stall:
            self.stalled += 1
            self._record()
            await self._unstall.wait()
            self.card_attempts.append((kind, body, "stalled"))
            self._record()
            return web.json_response(CARD_FAULTS["busy"][0], status=503)
        queue = self.card_faults.get(kind) or []
        fault = "refused" if kind in self.card_refused else queue[0] if queue and queue[0] != "lost" else ""
        if not fault:
            return None
        if kind not in self.card_refused:
            queue.pop(0)
        self.card_attempts.append((kind, body, fault))
        self._record()
        answer, status = CARD_FAULTS[fault]
        return web.json_response(answer, status=status)

    def _card_call(self, kind: str, body: dict[str, Any]) -> web.Response:
        """Apply an AI-card call to the card it names, as DingTalk would."""
        card = self.cards.get(body["outTrackId"])
        if kind == "create":
            if card is None:  # a retry with the same outTrackId gets the same card
                params = dict(body["cardData"]["cardParamMap"])
                card = self.cards[body["outTrackId"]] = AICard(body["outTrackId"], body, not self.undelivered, params)
            space = {"spaceId": body["openSpaceId"], "spaceType": body["openSpaceId"].split(".")[1].split("/")[-1]}
            result = {**space, "success": card.delivered, "errorMsg": "" if card.delivered else "robot not in chat"}
            answer = {"success": True, "result": {"outTrackId": card.out_track_id, "deliverResults": [result]}}
        elif card is None:
            return web.json_response(NO_CARD, status=400)
        elif kind == "streaming":
            if card.finalized:
                self.card_attempts.append((kind, body, "after finalize"))
                return web.json_response(FINALIZED, status=400)
            if any(s["guid"] == body["guid"] for s in card.streamed):
                card.repeated.append(body["guid"])  # the same update again: nothing changes
            else:
                key = body["key"]
                card.params[key] = body["content"] if body.get("isFull") else card.params.get(key, "") + body["content"]
                card.streamed.append(body)
                card.finalized = bool(body.get("isFinalize"))
            answer = {"success": True}
        else:
            card.params = dict(body["cardData"]["cardParamMap"])  # the card's data, replaced
            answer = {"success": True}
        queue = self.card_faults.get(kind) or []
        outcome = "ok"
        if queue and queue[0] == "lost":
            queue.pop(0)
            outcome = "lost"
        self.card_attempts.append((kind, body, outcome))
        self._record()
        if outcome == "lost":
            return web.json_response(CARD_FAULTS["busy"][0], status=503)
        return web.json_response(answer)

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
        if path in CARD_CALLS:
            return self._card_call(CARD_CALLS[path], body)
        return web.json_response({"success": True, "processQueryKey": "q1"})

    async def _session_webhook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.session_bodies.append(raw)
        body = json.loads(raw)
        if (limited := self._limited(request.path)) is not None:
            return limited
        if self._failing(request.path):
            return web.json_response(BUSY, status=503)
        post = {"session": request.query.get("session", ""), **body}
        if self.expired_sessions:
            self.refused_session_posts.append(post)
            self._record()
            return web.json_response({"errcode": 300001, "errmsg": "session expired"})
        self.session_posts.append(post)
        self._record()
        if self.lost_answers > 0:  # delivered, but the client cannot know: a send to never repeat
            self.lost_answers -= 1
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def _file(self, request: web.Request) -> web.Response:
        data, mime = self.files[request.match_info["code"]]
        return web.Response(body=data, content_type=mime)
