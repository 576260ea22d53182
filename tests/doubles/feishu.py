"""A Feishu/Lark Open Platform double on aiohttp, speaking the real protocols (docs/protocols/feishu.md).

Long connection: `POST /callback/ws/endpoint` -> websocket URL + ClientConfig; the websocket carries
binary `pbbp2.Frame`s: client pings are answered with pongs (optionally carrying a new ClientConfig),
events are pushed as data frames (whole or split into parts), the client's response frames are
recorded. REST: tenant token, bot info, reply (with Feishu's `uuid` idempotency), message
resources, CardKit cards (create, element content with strictly increasing sequence, settings).
It enforces the limits that make Feishu reject a card (more than 5 tables, more than 30 KB), so a
test that passes proves botgate never sent a card Feishu would refuse. Cards keep every text as it
was sent (`Card.contents`); `open_cards()` lists the sent cards still "generating".

Scripted faults: `pong = False` (stop answering ping frames), `ws_pong = False` (stop answering
websocket pings too: a socket that looks open but is dead), `close_sockets()`, `reject_token_once`,
`fail_card` ("create" | "content" | "settings": every such call answers 500), `card_faults` (the
next N calls of a kind throttled, 5xx, refused, or applied with the answer lost), `stall` (CardKit
calls of a kind hang), `streaming_lifetime` (CardKit closes a card's streaming by itself: 200850,
then 300309 on every later call), `fail_replies` (reply calls that answer 500),
`refuse_ws` (the websocket upgrade refused with Feishu's handshake-* headers: `refuse_ws_status`
403 for a banned app, 514 with `refuse_ws_autherrcode` "1000040350" for too many connections),
`clock_offset` (seconds the double's clock, i.e. every answer's `Date` header, is ahead of ours),
`app_secret` (the app secret it accepts: set another to rotate it, as the developer console does).
Rate limits and the monthly quota as Feishu answers them: `qps_limit`, `chat_qps_limit`,
`throttle_next`, `quota` (see the fields); every Open API call's arrival is in `requests`. Tokens
live `token_lifetime` and the same one is handed out while more than `token_reuse_above` of it
remains, as Feishu does; a call with an expired one is refused (and counted in `expired_uses`).
lark-oapi's own ws client runs against it in tests/test_feishu_conformance.py.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from gateway.config import Config
from handlers.feishu.frame import Frame, decode, encode
from tests.conftest import make_config
from tests.doubles.feishu_events import APP_ID, BOT_OPEN_ID
from tests.doubles.waiting import Waitable

APP_SECRET = "secret-test"
SERVICE_ID = 33
CARD_MAX_BYTES = 30 * 1024
_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$", re.MULTILINE)


def ok(**data: Any) -> web.Response:
    return web.json_response({"code": 0, "msg": "success", **data})


def fail(code: int, msg: str, status: int = 400) -> web.Response:
    return web.json_response({"code": code, "msg": msg}, status=status)


@dataclass
class SentReply:
    to: str  # the message replied to
    msg_type: str
    content: dict[str, Any]
    uuid: str
    in_thread: bool
    message_id: str  # the new message


def walk(elements: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every element of a card body, those inside containers (a collapsible panel) included."""
    for element in elements:
        yield element
        yield from walk(element.get("elements", []))


def _img(element: dict[str, Any]) -> str:
    """A card `img` element or post `img` tag as the user sees it: `![image](key)`; else ""."""
    if element.get("tag") != "img":
        return ""
    return f"![image]({element.get('img_key') or element.get('image_key')})"


@dataclass
class Card:
    """A CardKit card. Its answer is its last top-level element (`contents` records what was
    streamed into it); what is streamed into another element goes to `element_contents`."""

    card: dict[str, Any]
    contents: list[tuple[int, str]] = field(default_factory=list)  # (sequence, text) as sent
    element_contents: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    settings: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    appended: list[dict[str, Any]] = field(default_factory=list)  # elements added after the body (`append`)
    last_sequence: int = 0
    created_at: float = field(default_factory=time.monotonic)
    closed: str = ""  # "settings": streaming ended by a settings call; "timeout": by Feishu itself
    timeout_told: bool = False  # 200850 was answered once; every later call gets 300309

    @property
    def text(self) -> str:
        if self.contents:
            return self.contents[-1][1]
        return str(self.card["body"]["elements"][-1]["content"])

    def element(self, element_id: str) -> dict[str, Any] | None:
        return next((e for e in walk(self.card["body"]["elements"]) if e.get("element_id") == element_id), None)

    def element_text(self, element_id: str) -> str:
        """What an element shows now: the last text streamed into it, else the card's."""
        streamed = self.element_contents.get(element_id)
        if streamed:
            return streamed[-1][1]
        element = self.element(element_id)
        return str(element["content"]) if element is not None else ""

    @property
    def streaming(self) -> bool:
        return self.card.get("config", {}).get("streaming_mode") is True and not self.closed


@dataclass
class FeishuDouble(Waitable):
    app_secret: str = APP_SECRET  # the only secret the token and endpoint calls accept (a rotation sets another)
    client_config: dict[str, Any] = field(
        default_factory=lambda: {
            "PingInterval": 120, "ReconnectCount": -1, "ReconnectInterval": 120, "ReconnectNonce": 0
        }
    )
    pong: bool = True
    ws_pong: bool = True
    pong_config: dict[str, Any] | None = None
    reject_token_once: bool = False
    fail_card: str = ""
    # CardKit faults: kind ("create" | "content" | "settings") -> faults for its next calls, in
    # order: "busy" (500), "throttled" (429 with x-ogw-ratelimit-reset), "refused" (400), "lost"
    # (applied, then 500: the answer was lost)
    card_faults: dict[str, list[str]] = field(default_factory=dict)
    streaming_lifetime: float = 600.0  # seconds after which CardKit closes a card's streaming itself
    stall: str = ""  # CardKit calls of this kind wait until `release_stalled()`, then fail unapplied
    stalled: int = 0
    card_attempts: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, card id, outcome)
    _unstall: asyncio.Event = field(default_factory=asyncio.Event)
    fail_replies: int = 0
    refuse_ws: str = ""  # a handshake-msg: refuse the websocket upgrade as Feishu does
    refuse_ws_status: int = 403  # handshake-status (and the HTTP status) of a refusal
    refuse_ws_autherrcode: str = ""  # handshake-autherrcode, sent when set
    clock_offset: float = 0.0
    resources: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    # `GET /open-apis/im/v1/messages/{id}` answers `data.items[0]` from here (msg_type, body.content,
    # sender, parent_id, ...); any other id is 230002 "message not found" (a quote's parent_id).
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    message_gets: list[str] = field(default_factory=list)  # ids asked for, in order
    ws_host: str = ""  # host:port the endpoint call's URL names instead of the double's own
    ws_credentials: list[str] = field(default_factory=list)  # every access_key and ticket handed out
    # Rate limits and quota ("频控策略", "自建应用 API 调用量上限调整说明"; docs/protocols/feishu.md
    # §B.13): more than `qps_limit` calls a second to one Open API get HTTP 429 + 99991400 with
    # x-ogw-ratelimit-reset; more than `chat_qps_limit` replies a second into one chat HTTP 400 +
    # 230020; `throttle_next` refuses the next N Open API calls whatever the rate (`throttle_answer`:
    # (HTTP status, code)); `quota`: billable calls left this month (None: none), after which every
    # Open API call gets HTTP 429 + 99991403. The token call is not billable, failed calls not billed.
    qps_limit: int = 0
    chat_qps_limit: int = 0
    throttle_next: int = 0
    throttle_answer: tuple[int, int] = (429, 99991400)
    throttle_only: str = ""  # `throttle_next` counts only calls whose path ends so ("/reply")
    quota: int | None = None
    token_lifetime: float = 7200.0  # seconds a tenant_access_token lives
    token_reuse_above: float = 1800.0  # the same token is handed out while more than this remains
    requests: list[tuple[float, str]] = field(default_factory=list)  # (monotonic arrival, path) of Open API calls
    throttled: list[str] = field(default_factory=list)  # paths of the calls refused as throttled
    quota_refusals: int = 0
    tokens_issued: list[str] = field(default_factory=list)
    expired_uses: int = 0  # calls made with a token past its expiry

    endpoint_calls: int = 0
    connections: int = 0
    pings: int = 0
    ws_pings: int = 0  # websocket-level pings (not ping frames)
    refusals: int = 0  # websocket upgrades refused
    endpoint_headers: list[dict[str, str]] = field(default_factory=list)  # of each endpoint call
    ws_headers: list[dict[str, str]] = field(default_factory=list)  # of each websocket upgrade
    token_calls: int = 0
    bot_info_calls: int = 0
    api_auth: list[str] = field(default_factory=list)
    responses: dict[str, Frame] = field(default_factory=dict)  # by frame message_id
    response_frames: list[Frame] = field(default_factory=list)
    replies: list[SentReply] = field(default_factory=list)
    # `POST /open-apis/im/v1/messages` (new messages, the send API): (receive_id_type, message), `to`
    # being the receive_id; a receive_id in `absent_chats` is a chat the bot is not in (230002).
    created: list[tuple[str, SentReply]] = field(default_factory=list)
    absent_chats: set[str] = field(default_factory=set)
    # `POST /open-apis/im/v1/images`: image_key -> (bytes, content type) of each upload
    images: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    # `POST /open-apis/im/v1/files`: file_key -> (bytes, file_name, file_type) of each upload
    files: dict[str, tuple[bytes, str, str]] = field(default_factory=dict)
    cards: dict[str, Card] = field(default_factory=dict)
    # Message reactions: (action "add" | "remove", message_id, emoji type, reaction_id), in order;
    # `reactions` the ones on messages now, by reaction_id.
    reaction_calls: list[tuple[str, str, str, str]] = field(default_factory=list)
    reactions: dict[str, tuple[str, str]] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)  # what Feishu would have refused, and why
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _tokens: set[str] = field(default_factory=set)
    _token_expiry: dict[str, float] = field(default_factory=dict)  # token -> monotonic expiry
    _chats: dict[str, str] = field(default_factory=dict)  # message_id of a pushed event -> chat_id
    _accepted: dict[str, list[float]] = field(default_factory=dict)  # rate-limit key -> call times
    _uuids: dict[str, SentReply] = field(default_factory=dict)
    _seq: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def app(self) -> web.Application:
        @web.middleware
        async def notify(request: web.Request, handler: Any) -> web.StreamResponse:
            try:
                return await handler(request)  # type: ignore[no-any-return]
            finally:
                await self._notify()  # every request may be what a test waits for

        app = web.Application(middlewares=[notify, self._meter])
        r = app.router
        r.add_post("/callback/ws/endpoint", self.endpoint)
        r.add_get("/ws", self.websocket)
        r.add_post("/open-apis/auth/v3/tenant_access_token/internal", self.token)
        r.add_get("/open-apis/bot/v3/info", self.bot_info)
        r.add_post("/open-apis/im/v1/messages/{message_id}/reply", self.reply)
        r.add_post("/open-apis/im/v1/messages", self.create_message)
        r.add_post("/open-apis/im/v1/images", self.image_upload)
        r.add_post("/open-apis/im/v1/files", self.file_upload)
        r.add_get("/open-apis/im/v1/messages/{message_id}", self.get_message)
        r.add_get("/open-apis/im/v1/messages/{message_id}/resources/{file_key}", self.resource)
        r.add_post("/open-apis/im/v1/messages/{message_id}/reactions", self.reaction_add)
        r.add_delete("/open-apis/im/v1/messages/{message_id}/reactions/{reaction_id}", self.reaction_remove)
        r.add_post("/open-apis/cardkit/v1/cards", self.card_create)
        r.add_put("/open-apis/cardkit/v1/cards/{card_id}/elements/{element_id}/content", self.card_content)
        r.add_patch("/open-apis/cardkit/v1/cards/{card_id}/settings", self.card_settings)
        r.add_post("/open-apis/cardkit/v1/cards/{card_id}/elements", self.card_elements)
        app.on_shutdown.append(lambda _: self.close_sockets())
        app.on_response_prepare.append(self._date)
        return app

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.clock_offset:
            response.headers["Date"] = formatdate(time.time() + self.clock_offset, usegmt=True)

    # -- rate limits and quota --------------------------------------------------------------------
    @web.middleware
    async def _meter(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Open API calls (not the token, not the long connection): throttled or refused for the
        quota before anything else happens, and billed when they succeed."""
        if not request.path.startswith("/open-apis/") or request.path.endswith("/tenant_access_token/internal"):
            return await handler(request)  # type: ignore[no-any-return]
        if (refusal := self._limited(request)) is not None:
            return refusal
        response: web.StreamResponse = await handler(request)
        if self.quota is not None and response.status == 200 and self._succeeded(response):
            self.quota -= 1
        return response

    def _limited(self, request: web.Request) -> web.Response | None:
        now = time.monotonic()
        path = request.path
        self.requests.append((now, path))
        if self.quota is not None and self.quota <= 0:
            self.quota_refusals += 1
            return fail(99991403, "This month's API call quota has been exceeded", 429)
        api = request.match_info.route.resource.canonical if request.match_info.route.resource else path
        chat = self._chats.get(request.match_info.get("message_id", ""), "") if path.endswith("/reply") else ""
        status, code = self.throttle_answer
        if self.throttle_next > 0 and path.endswith(self.throttle_only):
            self.throttle_next -= 1
        elif self.qps_limit and self._over(api, self.qps_limit, now):
            status, code = 429, 99991400
        elif chat and self.chat_qps_limit and self._over(f"chat:{chat}", self.chat_qps_limit, now):
            status, code = 400, 230020
        else:
            self._accepted.setdefault(api, []).append(now)
            if chat:
                self._accepted.setdefault(f"chat:{chat}", []).append(now)
            return None
        self.throttled.append(path)
        response = fail(code, "request trigger frequency limit", status)
        response.headers["x-ogw-ratelimit-reset"] = "1"
        return response

    def _over(self, key: str, limit: int, now: float) -> bool:
        """`limit` calls of `key` were accepted within the last second already."""
        accepted = self._accepted.setdefault(key, [])
        while accepted and accepted[0] <= now - 1.0:
            accepted.pop(0)
        return len(accepted) >= limit

    @staticmethod
    def _succeeded(response: web.StreamResponse) -> bool:
        body = response.body if isinstance(response, web.Response) else None
        try:
            return isinstance(body, bytes) and orjson.loads(body).get("code") == 0
        except orjson.JSONDecodeError:
            return True  # a file (message resource)

    # -- what tests wait on (wait_for: tests/doubles/waiting.py) ---------------------------------
    def replies_to(self, message_id: str) -> list[SentReply]:
        return [r for r in self.replies if r.to == message_id]

    def shown(self, reply: SentReply) -> str | None:
        """The text a user sees in a reply, without an @mention of its own (`mentioned`); None
        while its streaming card is still open (it shows text, but "generating"; one Feishu closed
        itself shows what it had then)."""
        content = reply.content
        if reply.msg_type == "interactive" and content.get("type") == "card":
            card = self.cards[content["data"]["card_id"]]
            return "\n".join([card.text, *map(_img, card.appended)]) if card.closed else None
        if reply.msg_type == "interactive":
            elements = content["body"]["elements"]
            return "\n".join(_img(e) or str(e["content"]) for e in elements if e.get("element_id") != "mention")
        if reply.msg_type == "post":
            paragraphs = content["zh_cn"]["content"]
            return "\n\n".join(_img(p[0]) or p[0]["text"] for p in paragraphs if p[0]["tag"] != "at")
        if reply.msg_type == "image":
            return f"![image]({content['image_key']})"
        return str(content.get("text", ""))

    def mentioned(self, reply: SentReply) -> list[str]:
        """The open_ids a reply @mentions in an element of its own: a card's markdown element
        holding only `<at id=…></at>`, a post's `at` element."""
        content = reply.content
        if reply.msg_type == "interactive":
            card = self.cards[content["data"]["card_id"]].card if content.get("type") == "card" else content
            texts = [str(e.get("content", "")) for e in walk(card["body"]["elements"])]
            return [m for t in texts for m in re.findall(r"^<at id=([^>\s]+)></at>$", t)]
        if reply.msg_type == "post":
            return [e["user_id"] for p in content["zh_cn"]["content"] for e in p if e["tag"] == "at"]
        return []

    def open_cards(self) -> list[Card]:
        """Cards sent to someone whose streaming is still on: "generating" for the user."""
        sent = {r.content["data"]["card_id"] for r in self.replies if r.content.get("type") == "card"}
        return [card for card_id, card in self.cards.items() if card_id in sent and not card.closed]

    def card_of(self, reply: SentReply) -> Card:
        return self.cards[reply.content["data"]["card_id"]]

    def release_stalled(self) -> None:
        self.stall = ""
        self._unstall.set()

    async def _card_fault(self, kind: str, card_id: str) -> web.Response | None:
        """The scripted answer to this CardKit call, if it is to fail before it is applied."""
        if kind == self.stall:
            self.stalled += 1
            await self._notify()
            await self._unstall.wait()
            self.card_attempts.append((kind, card_id, "stalled"))
            return fail(200500, "scripted failure", 500)
        if self.fail_card == kind:
            self.card_attempts.append((kind, card_id, "failed"))
            return fail(200500, "scripted failure", 500)
        queue = self.card_faults.get(kind) or []
        if not queue or queue[0] == "lost":
            return None
        fault = queue.pop(0)
        self.card_attempts.append((kind, card_id, fault))
        if fault == "throttled":
            response = fail(99991400, "request trigger frequency limit", 429)
            response.headers["x-ogw-ratelimit-reset"] = "1"
            return response
        if fault == "refused":
            return fail(200220, "scripted refusal")
        return fail(200500, "scripted failure", 500)

    def _applied(self, kind: str, card_id: str) -> web.Response:
        """Success, or a "lost" answer (the call did take effect)."""
        queue = self.card_faults.get(kind) or []
        outcome = queue.pop(0) if queue and queue[0] == "lost" else "ok"
        self.card_attempts.append((kind, card_id, outcome))
        if outcome == "lost":
            return fail(200500, "scripted failure after the change", 500)
        return ok(data={"card_id": card_id} if kind == "create" else {})

    def _streaming_closed(self, kind: str, card_id: str, card: Card) -> web.Response | None:
        """CardKit's answer once a card's streaming has ended: 200850 once when its lifetime ran
        out, then 300309 for every call that needs streaming."""
        if card.streaming and time.monotonic() - card.created_at >= self.streaming_lifetime:
            card.closed = "timeout"
        if not card.closed:
            return None
        code = 300309 if card.closed != "timeout" or card.timeout_told else 200850
        card.timeout_told = card.closed == "timeout"
        self.card_attempts.append((kind, card_id, str(code)))
        return fail(code, "card streaming timeout" if code == 200850 else "streaming mode is closed")

    def answer(self, message_id: str) -> str | None:
        """Everything shown in reply to a message, in order; None until something complete is."""
        shown = [self.shown(r) for r in self.replies_to(message_id)]
        if not shown or None in shown:
            return None
        return "\n\n".join(s for s in shown if s is not None)

    # -- long connection ---------------------------------------------------------------------------
    async def endpoint(self, request: web.Request) -> web.Response:
        self.endpoint_headers.append(dict(request.headers))
        body = await request.json()
        if body != {"AppID": APP_ID, "AppSecret": self.app_secret}:
            return fail(514, "auth failed", 200)
        self.endpoint_calls += 1
        # Like Feishu's: the URL's query carries connection credentials (docs/protocols/feishu.md §B.2).
        key, ticket = f"ak-{self.endpoint_calls}-{uuid.uuid4().hex}", f"tk-{self.endpoint_calls}-{uuid.uuid4().hex}"
        self.ws_credentials += [key, ticket]
        host = self.ws_host or request.host
        url = f"ws://{host}/ws?device_id=dev-{self.endpoint_calls}&service_id={SERVICE_ID}&access_key={key}&ticket={ticket}"
        return ok(data={"URL": url, "ClientConfig": self.client_config})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        self.ws_headers.append(dict(request.headers))
        if self.refuse_ws:
            self.refusals += 1
            headers = {"handshake-status": str(self.refuse_ws_status), "handshake-msg": self.refuse_ws}
            if self.refuse_ws_autherrcode:
                headers["handshake-autherrcode"] = self.refuse_ws_autherrcode
            return web.Response(status=self.refuse_ws_status, headers=headers)
        ws = web.WebSocketResponse(autoping=False)  # websocket pings are answered (and counted) below
        await ws.prepare(request)
        self.sockets.append(ws)
        self.connections += 1
        await self._notify()
        try:
            async for msg in ws:
                if msg.type is WSMsgType.PING:
                    self.ws_pings += 1
                    if self.ws_pong:
                        await ws.pong(msg.data)
                    await self._notify()
                if msg.type is not WSMsgType.BINARY:
                    continue
                frame = decode(msg.data)
                if frame.method == 0 and frame.header("type") == "ping":
                    assert frame.service == SERVICE_ID
                    self.pings += 1
                    if self.pong:
                        payload = orjson.dumps(self.pong_config) if self.pong_config else None
                        pong = Frame(service=SERVICE_ID, method=0, headers=(("type", "pong"),), payload=payload)
                        await ws.send_bytes(encode(pong))
                elif frame.method == 1:
                    self.responses[frame.header("message_id") or ""] = frame
                    self.response_frames.append(frame)
                await self._notify()
        finally:
            self.sockets.remove(ws)
            await self._notify()
        return ws

    async def push_event(self, body: dict[str, Any], parts: int = 1, order: list[int] | None = None) -> str:
        """Send an event on the newest connection, split into `parts` frames sent in `order`.
        Returns the frame message_id its response frame will carry."""
        await self.wait_for(lambda: self.sockets)
        message = body.get("event", {}).get("message", {}) if isinstance(body.get("event"), dict) else {}
        if isinstance(message, dict) and message.get("message_id"):  # replies to it count in its chat
            self._chats[str(message["message_id"])] = str(message.get("chat_id", ""))
        payload = orjson.dumps(body)
        size = -(-len(payload) // parts)
        chunks = [payload[i * size : (i + 1) * size] for i in range(parts)]
        self._seq += 1
        frame_id = f"frame-{self._seq}"
        ws = self.sockets[-1]
        for seq in order or list(range(parts)):
            frame = Frame(
                seq_id=self._seq,
                log_id=self._seq,
                service=SERVICE_ID,
                method=1,
                headers=(
                    ("type", "event"),
                    ("message_id", frame_id),
                    ("sum", str(parts)),
                    ("seq", str(seq)),
                    ("trace_id", f"trace-{self._seq}"),
                ),
                payload=chunks[seq],
            )
            await ws.send_bytes(encode(frame))
        return frame_id

    async def response(self, frame_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the client's response frame to an event; its decoded payload."""
        await self.wait_for(lambda: frame_id in self.responses, timeout)
        return dict(orjson.loads(self.responses[frame_id].payload or b"{}"))

    async def raw(self, data: bytes) -> None:
        """Send any bytes as a binary frame on the newest connection (fuzzing the client)."""
        await self.wait_for(lambda: self.sockets)
        await self.sockets[-1].send_bytes(data)

    async def close_sockets(self) -> None:
        for ws in list(self.sockets):
            await ws.close()

    # -- REST ------------------------------------------------------------------------------------
    async def token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body != {"app_id": APP_ID, "app_secret": self.app_secret}:
            return fail(10014, "app secret invalid")
        self.token_calls += 1
        # Feishu hands out the same token while more than 30 minutes of it remain, with `expire`
        # the time left; after that a new one (the old stays valid until it expires).
        now = time.monotonic()
        current = self.tokens_issued[-1] if self.tokens_issued else ""
        left = self._token_expiry.get(current, 0.0) - now
        if current not in self._tokens or left <= self.token_reuse_above:
            current = f"t-{len(self.tokens_issued) + 1}"
            self.tokens_issued.append(current)
            self._tokens.add(current)
            self._token_expiry[current] = now + self.token_lifetime
            left = self.token_lifetime
        await self._notify()
        return web.json_response({"code": 0, "msg": "ok", "tenant_access_token": current, "expire": int(left)})

    def _authorized(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        self.api_auth.append(auth)
        token = auth.removeprefix("Bearer ")
        if self.reject_token_once and token in self._tokens:
            self.reject_token_once = False
            self._tokens.discard(token)
        if token in self._tokens and time.monotonic() >= self._token_expiry.get(token, 0.0):
            self._tokens.discard(token)
            self.expired_uses += 1
        if token not in self._tokens:
            return fail(99991663, "Invalid access token for authorization. Please make a request with token attached.")
        return None

    async def bot_info(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        self.bot_info_calls += 1
        return web.json_response({"code": 0, "msg": "ok", "bot": {"open_id": BOT_OPEN_ID, "app_name": "botgate"}})

    def _check_card(self, card: dict[str, Any]) -> str:
        """Why Feishu would refuse this card JSON, or ""."""
        if len(orjson.dumps(card)) > CARD_MAX_BYTES:
            return "card larger than 30 KB"
        elements = list(walk(card.get("body", {}).get("elements", [])))
        text = "\n".join(str(e.get("content", "")) for e in elements)
        if len(_TABLE_SEPARATOR.findall(text)) > 5:
            return "card with more than 5 tables"
        ids = [e["element_id"] for e in elements if "element_id" in e]
        if len(ids) != len(set(ids)):  # card JSON 2.0: an element_id names one element of the card
            return f"element ids not unique: {ids}"
        for e in elements:
            # Card JSON 2.0 collapsible_panel: `header` is required, a form may not go inside.
            if e.get("tag") != "collapsible_panel":
                continue
            inside = walk(e.get("elements", []))
            if not isinstance(e.get("header"), dict) or any(x.get("tag") == "form" for x in inside):
                return "collapsible_panel without a header, or with a form inside"
        return ""

    async def reply(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        body = await request.json()
        if self.fail_replies:  # a server error (230020 is the rate limit: see `chat_qps_limit`)
            self.fail_replies -= 1
            return fail(1, "internal error", 500)
        uuid = body.get("uuid", "")
        if uuid and uuid in self._uuids:  # Feishu: the same uuid within an hour sends nothing new
            return ok(data={"message_id": self._uuids[uuid].message_id})
        content = orjson.loads(body["content"])
        if body["msg_type"] == "interactive":
            if content.get("type") == "card":
                if content["data"]["card_id"] not in self.cards:
                    return fail(230099, "card not found")
            elif why := self._check_card(content):
                self.rejected.append(why)
                return fail(230099, why)
        if body["msg_type"] == "image" and content.get("image_key") not in self.images:
            return fail(230099, "image_key not found")  # an image message shows an uploaded image
        if body["msg_type"] == "file" and content.get("file_key") not in self.files:
            return fail(230099, "file_key not found")
        sent = SentReply(
            to=request.match_info["message_id"],
            msg_type=body["msg_type"],
            content=content,
            uuid=uuid,
            in_thread=bool(body.get("reply_in_thread")),
            message_id=f"om_reply_{len(self.replies) + 1}",
        )
        self.replies.append(sent)
        if uuid:
            self._uuids[uuid] = sent
        await self._notify()
        return ok(data={"message_id": sent.message_id, "chat_id": "oc_chat", "msg_type": sent.msg_type})

    async def create_message(self, request: web.Request) -> web.Response:
        """im/v1 messages (create): `receive_id_type` chat_id | open_id | user_id | union_id | email."""
        if denied := self._authorized(request):
            return denied
        id_type = request.query.get("receive_id_type", "")
        if id_type not in ("chat_id", "open_id", "user_id", "union_id", "email"):
            return fail(99992402, "field validation failed: receive_id_type", 400)
        body = await request.json()
        uuid = body.get("uuid", "")
        if uuid and uuid in self._uuids:  # the same uuid within an hour sends nothing new
            return ok(data={"message_id": self._uuids[uuid].message_id})
        if body.get("receive_id") in self.absent_chats:
            return fail(230002, "Bot/User can NOT be out of the chat.", 400)
        content = orjson.loads(body["content"])
        if body["msg_type"] == "interactive" and (why := self._check_card(content)):
            self.rejected.append(why)
            return fail(230099, why)
        sent = SentReply(
            to=str(body["receive_id"]),
            msg_type=body["msg_type"],
            content=content,
            uuid=uuid,
            in_thread=False,
            message_id=f"om_new_{len(self.created) + 1}",
        )
        self.created.append((id_type, sent))
        if uuid:
            self._uuids[uuid] = sent
        return ok(data={"message_id": sent.message_id, "msg_type": sent.msg_type})

    async def image_upload(self, request: web.Request) -> web.Response:
        """im/v1 images (create): multipart `image_type=message` and `image` -> an image_key."""
        if denied := self._authorized(request):
            return denied
        form = await request.post()
        image = form.get("image")
        if form.get("image_type") != "message" or not isinstance(image, web.FileField):
            return fail(234001, "invalid image_type or image")
        data = image.file.read()
        if not data or len(data) > 10 * 1024 * 1024:
            return fail(234006, "image size exceeds the limit")
        key = f"img_v3_{len(self.images) + 1}"
        self.images[key] = (data, image.content_type)
        return ok(data={"image_key": key})

    async def file_upload(self, request: web.Request) -> web.Response:
        """im/v1 files (create): multipart `file_type`, `file_name` and `file` -> a file_key."""
        if denied := self._authorized(request):
            return denied
        form = await request.post()
        file, file_type, name = form.get("file"), form.get("file_type"), form.get("file_name")
        types = ("opus", "mp4", "pdf", "doc", "xls", "ppt", "stream")
        if file_type not in types or not isinstance(name, str) or not name or not isinstance(file, web.FileField):
            return fail(234001, "invalid file_type, file_name or file")
        data = file.file.read()
        if not data or len(data) > 30 * 1024 * 1024:
            return fail(234006, "file size exceeds the limit")
        key = f"file_v3_{len(self.files) + 1}"
        self.files[key] = (data, name, str(file_type))
        return ok(data={"file_key": key})

    async def get_message(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        message_id = request.match_info["message_id"]
        self.message_gets.append(message_id)
        if message_id not in self.messages:
            return fail(230002, "message not found")  # HTTP 400
        return ok(data={"items": [{"message_id": message_id, **self.messages[message_id]}]})

    async def reaction_add(self, request: web.Request) -> web.Response:
        """im/v1 message reactions (create): `reaction_type.emoji_type` -> a reaction_id."""
        if denied := self._authorized(request):
            return denied
        body = await request.json()
        emoji = body.get("reaction_type", {}).get("emoji_type", "")
        if not isinstance(emoji, str) or not emoji:
            return fail(231001, "reaction type is invalid")
        message_id = request.match_info["message_id"]
        reaction_id = f"rc_{len(self.reaction_calls) + 1}"
        self.reactions[reaction_id] = (message_id, emoji)
        self.reaction_calls.append(("add", message_id, emoji, reaction_id))
        action_time = str(int(time.time() * 1000))
        return ok(data={"reaction_id": reaction_id, "reaction_type": {"emoji_type": emoji}, "action_time": action_time})

    async def reaction_remove(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        message_id, reaction_id = request.match_info["message_id"], request.match_info["reaction_id"]
        found = self.reactions.get(reaction_id)
        if found is None or found[0] != message_id:
            return fail(231003, "the reaction does not exist")
        del self.reactions[reaction_id]
        self.reaction_calls.append(("remove", message_id, found[1], reaction_id))
        return ok(data={"reaction_id": reaction_id, "reaction_type": {"emoji_type": found[1]}})

    async def resource(self, request: web.Request) -> web.StreamResponse:
        if denied := self._authorized(request):
            return denied
        key = (request.match_info["message_id"], request.match_info["file_key"])
        if request.query.get("type") not in ("image", "file") or key not in self.resources:
            return fail(234003, "resource not found")
        data, mime = self.resources[key]
        return web.Response(body=data, content_type=mime)

    async def card_create(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        body = await request.json()
        if fault := await self._card_fault("create", ""):
            return fault
        card = orjson.loads(body["data"])
        if body.get("type") != "card_json" or card.get("schema") != "2.0":
            return fail(200220, "bad card")
        if why := self._check_card(card):
            self.rejected.append(why)
            return fail(200220, why)
        card_id = f"card_{len(self.cards) + 1}"
        self.cards[card_id] = Card(card)
        await self._notify()
        return self._applied("create", card_id)

    def _sequence(self, card: Card, sequence: object) -> web.Response | None:
        if not isinstance(sequence, int) or sequence <= card.last_sequence:
            self.rejected.append(f"sequence {sequence} after {card.last_sequence}")
            return fail(300317, "sequence number compare failed")
        card.last_sequence = sequence
        return None

    async def card_content(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        card = self.cards.get(request.match_info["card_id"])
        if card is None:
            return fail(200740, "card not found")
        body = await request.json()
        if fault := await self._card_fault("content", request.match_info["card_id"]):
            return fault
        if closed := self._streaming_closed("content", request.match_info["card_id"], card):
            return closed
        element_id = request.match_info["element_id"]
        element = card.element(element_id)
        if element is None or element.get("tag") not in ("markdown", "plain_text"):
            return fail(300313, "element not found")
        if bad := self._sequence(card, body.get("sequence")):
            return bad
        if why := self._check_card({"body": {"elements": [{"content": body["content"]}]}}):
            self.rejected.append(why)
            return fail(200220, why)
        if element is card.card["body"]["elements"][-1]:
            card.contents.append((body["sequence"], body["content"]))
        else:
            card.element_contents.setdefault(element_id, []).append((body["sequence"], body["content"]))
        await self._notify()
        return self._applied("content", request.match_info["card_id"])

    async def card_elements(self, request: web.Request) -> web.Response:
        """Create elements, `type: append` only: kept in `Card.appended` (the body keeps the answer
        last); an `img` must show an uploaded image_key."""
        if denied := self._authorized(request):
            return denied
        card = self.cards.get(request.match_info["card_id"])
        if card is None:
            return fail(200740, "card not found")
        body = await request.json()
        if fault := await self._card_fault("elements", request.match_info["card_id"]):
            return fault
        elements = orjson.loads(body["elements"])
        if body.get("type") != "append" or not isinstance(elements, list):
            return fail(300302, "bad elements")
        if any(e.get("tag") == "img" and e.get("img_key") not in self.images for e in elements):
            return fail(300302, "img_key not found")
        if bad := self._sequence(card, body.get("sequence")):
            return bad
        card.appended.extend(elements)
        await self._notify()
        return self._applied("elements", request.match_info["card_id"])

    async def card_settings(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        card = self.cards.get(request.match_info["card_id"])
        if card is None:
            return fail(200740, "card not found")
        body = await request.json()
        if fault := await self._card_fault("settings", request.match_info["card_id"]):
            return fault
        card_id = request.match_info["card_id"]
        if card.closed != "settings" and (closed := self._streaming_closed("settings", card_id, card)):
            return closed
        if bad := self._sequence(card, body.get("sequence")):
            return bad
        settings = orjson.loads(body["settings"])
        card.settings.append((body["sequence"], settings))
        if settings.get("config", {}).get("streaming_mode") is False:
            card.closed = "settings"
        await self._notify()
        return self._applied("settings", request.match_info["card_id"])


async def start(aiohttp_server: Callable[..., Any]) -> tuple[FeishuDouble, str]:
    """Serve a double on 127.0.0.1 (random port); returns it and its base URL (the `domain`)."""
    double = FeishuDouble()
    server: TestServer = await aiohttp_server(double.app(), host="127.0.0.1")
    return double, str(server.make_url("")).rstrip("/")


def config(domain: str, model_url: str = "", **sections: dict[str, Any]) -> Config:
    """A gateway config with Feishu pointed at a double (and the model at `model_url`, if given);
    `sections` are merged over that, e.g. `feishu={"mode": "webhook"}`."""
    data: dict[str, Any] = {
        "cache": {"enabled": False},
        **sections,
        "feishu": {
            "enabled": True,
            "app_id": APP_ID,
            "app_secret": APP_SECRET,
            "domain": domain,
            "verification_token": "vtoken",
            **sections.get("feishu", {}),
        },
    }
    if model_url:
        data["model"] = {"base_url": model_url, **data.get("model", {})}
    return make_config(**data)
