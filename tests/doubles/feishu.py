"""A Feishu/Lark Open Platform double on aiohttp, speaking the real protocols (docs/protocols/feishu.md).

Long connection: `POST /callback/ws/endpoint` -> websocket URL + ClientConfig; the websocket carries
binary `pbbp2.Frame`s: client pings are answered with pongs (optionally carrying a new ClientConfig),
events are pushed as data frames (whole or split into parts), the client's response frames are
recorded. REST: tenant token, bot info, reply (with Feishu's `uuid` idempotency), message
resources, CardKit cards (create, element content with strictly increasing sequence, settings).
It enforces the limits that make Feishu reject a card (more than 5 tables, more than 30 KB), so a
test that passes proves botgate never sent a card Feishu would refuse.

Scripted faults: `pong = False` (stop answering pings), `close_sockets()`, `reject_token_once`,
`fail_card` ("create" | "content" | "settings"), `fail_replies` (reply calls that answer 500),
`refuse_ws` (the websocket upgrade refused with Feishu's handshake-* headers), `clock_offset`
(seconds the double's clock, i.e. every answer's `Date` header, is ahead of ours).
lark-oapi's own ws client runs against it in tests/test_feishu_conformance.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
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


@dataclass
class Card:
    card: dict[str, Any]
    contents: list[tuple[int, str]] = field(default_factory=list)  # (sequence, text)
    settings: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    last_sequence: int = 0

    @property
    def text(self) -> str:
        if self.contents:
            return self.contents[-1][1]
        return str(self.card["body"]["elements"][0]["content"])


@dataclass
class FeishuDouble:
    client_config: dict[str, Any] = field(
        default_factory=lambda: {
            "PingInterval": 120, "ReconnectCount": -1, "ReconnectInterval": 120, "ReconnectNonce": 0
        }
    )
    pong: bool = True
    pong_config: dict[str, Any] | None = None
    reject_token_once: bool = False
    fail_card: str = ""
    fail_replies: int = 0
    refuse_ws: str = ""  # a handshake-msg: refuse the websocket upgrade as Feishu does (403)
    clock_offset: float = 0.0
    resources: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)

    endpoint_calls: int = 0
    connections: int = 0
    pings: int = 0
    token_calls: int = 0
    bot_info_calls: int = 0
    api_auth: list[str] = field(default_factory=list)
    responses: dict[str, Frame] = field(default_factory=dict)  # by frame message_id
    response_frames: list[Frame] = field(default_factory=list)
    replies: list[SentReply] = field(default_factory=list)
    cards: dict[str, Card] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)  # what Feishu would have refused, and why
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _tokens: set[str] = field(default_factory=set)
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

        app = web.Application(middlewares=[notify])
        r = app.router
        r.add_post("/callback/ws/endpoint", self.endpoint)
        r.add_get("/ws", self.websocket)
        r.add_post("/open-apis/auth/v3/tenant_access_token/internal", self.token)
        r.add_get("/open-apis/bot/v3/info", self.bot_info)
        r.add_post("/open-apis/im/v1/messages/{message_id}/reply", self.reply)
        r.add_get("/open-apis/im/v1/messages/{message_id}/resources/{file_key}", self.resource)
        r.add_post("/open-apis/cardkit/v1/cards", self.card_create)
        r.add_put("/open-apis/cardkit/v1/cards/{card_id}/elements/{element_id}/content", self.card_content)
        r.add_patch("/open-apis/cardkit/v1/cards/{card_id}/settings", self.card_settings)
        app.on_shutdown.append(lambda _: self.close_sockets())
        app.on_response_prepare.append(self._date)
        return app

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.clock_offset:
            response.headers["Date"] = formatdate(time.time() + self.clock_offset, usegmt=True)

    # -- synchronisation -------------------------------------------------------------------------
    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    def replies_to(self, message_id: str) -> list[SentReply]:
        return [r for r in self.replies if r.to == message_id]

    def shown(self, reply: SentReply) -> str | None:
        """The text a user sees in a reply; None while its streaming card is still open."""
        content = reply.content
        if reply.msg_type == "interactive" and content.get("type") == "card":
            card = self.cards[content["data"]["card_id"]]
            return card.text if card.settings else None
        if reply.msg_type == "interactive":
            return "\n".join(str(e["content"]) for e in content["body"]["elements"])
        if reply.msg_type == "post":
            return "\n\n".join(p[0]["text"] for p in content["zh_cn"]["content"])
        return str(content.get("text", ""))

    def answer(self, message_id: str) -> str | None:
        """Everything shown in reply to a message, in order; None until something complete is."""
        shown = [self.shown(r) for r in self.replies_to(message_id)]
        if not shown or None in shown:
            return None
        return "\n\n".join(s for s in shown if s is not None)

    # -- long connection ---------------------------------------------------------------------------
    async def endpoint(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body != {"AppID": APP_ID, "AppSecret": APP_SECRET}:
            return fail(514, "auth failed", 200)
        self.endpoint_calls += 1
        url = f"ws://{request.host}/ws?device_id=dev-{self.endpoint_calls}&service_id={SERVICE_ID}&ticket=t"
        return ok(data={"URL": url, "ClientConfig": self.client_config})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_ws:
            headers = {"handshake-status": "403", "handshake-msg": self.refuse_ws}
            return web.Response(status=403, headers=headers)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        self.connections += 1
        await self._notify()
        try:
            async for msg in ws:
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
        if body != {"app_id": APP_ID, "app_secret": APP_SECRET}:
            return fail(10014, "app secret invalid")
        self.token_calls += 1
        token = f"t-{self.token_calls}"
        self._tokens.add(token)
        await self._notify()
        return web.json_response({"code": 0, "msg": "ok", "tenant_access_token": token, "expire": 7200})

    def _authorized(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        self.api_auth.append(auth)
        token = auth.removeprefix("Bearer ")
        if self.reject_token_once and token in self._tokens:
            self.reject_token_once = False
            self._tokens.discard(token)
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
        text = "\n".join(str(e.get("content", "")) for e in card.get("body", {}).get("elements", []))
        if len(_TABLE_SEPARATOR.findall(text)) > 5:
            return "card with more than 5 tables"
        return ""

    async def reply(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        body = await request.json()
        if self.fail_replies:
            self.fail_replies -= 1
            return fail(230020, "scripted failure", 500)
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
        if self.fail_card == "create":
            return fail(200500, "scripted failure", 500)
        card = orjson.loads(body["data"])
        if body.get("type") != "card_json" or card.get("schema") != "2.0":
            return fail(200220, "bad card")
        if why := self._check_card(card):
            self.rejected.append(why)
            return fail(200220, why)
        card_id = f"card_{len(self.cards) + 1}"
        self.cards[card_id] = Card(card)
        await self._notify()
        return ok(data={"card_id": card_id})

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
        if self.fail_card == "content":
            return fail(200500, "scripted failure", 500)
        if request.match_info["element_id"] != card.card["body"]["elements"][0]["element_id"]:
            return fail(300313, "element not found")
        if bad := self._sequence(card, body.get("sequence")):
            return bad
        if why := self._check_card({"body": {"elements": [{"content": body["content"]}]}}):
            self.rejected.append(why)
            return fail(200220, why)
        card.contents.append((body["sequence"], body["content"]))
        await self._notify()
        return ok(data={})

    async def card_settings(self, request: web.Request) -> web.Response:
        if denied := self._authorized(request):
            return denied
        card = self.cards.get(request.match_info["card_id"])
        if card is None:
            return fail(200740, "card not found")
        body = await request.json()
        if self.fail_card == "settings":
            return fail(200500, "scripted failure", 500)
        if bad := self._sequence(card, body.get("sequence")):
            return bad
        card.settings.append((body["sequence"], orjson.loads(body["settings"])))
        await self._notify()
        return ok(data={})


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
