"""A DingTalk double for benchmarks: open-connection, token, the Stream websocket, sessionWebhook sink.

Wire format as in docs/protocols/dingtalk.md §A (CALLBACK frames whose `data` is a JSON *string*, ACKs carrying the
frame's `messageId`), and the webhook signature of §C.2. It pushes frames as fast as asked, times
every ACK and every reply, and can drop the socket to measure recovery.

Several Stream connections of the one client may be open at once (one per gateway instance, each
from its own open-connection call): CALLBACK frames are spread over them round-robin, as the
platform spreads a bot's messages over its connections, and every reply is counted per msgId, so
a scenario sees an answer given twice or never.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import time
from collections import Counter, deque
from urllib.parse import parse_qs, urlsplit

import orjson
from aiohttp import WSMsgType, web

from .doubles import Sink
from .env import HOST
from .servers import CLIENT_ID, SECRET

TOPIC = "/v1.0/im/bot/messages/get"
WEBHOOK_PATH = "/robot/sendBySession"


def sign(timestamp_ms: str, secret: str = SECRET) -> str:
    """`sign` header of the outgoing-robot HTTP callback: base64(HmacSHA256(secret, ts + "\\n" + secret))."""
    mac = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def chatbot_payload(msg_id: str, conversation: str, text: str, webhook: str) -> dict[str, object]:
    """A 1:1 text message as DingTalk sends it (same JSON over Stream and the HTTP callback)."""
    now = int(time.time() * 1000)
    return {
        "conversationId": f"cid{conversation}",
        "conversationType": "1",
        "chatbotCorpId": "dingbenchcorp",
        "chatbotUserId": "$:LWCP_v1:$bot",
        "msgId": msg_id,
        "msgtype": "text",
        "text": {"content": text},
        "senderNick": "Bench",
        "senderId": f"$:LWCP_v1:${conversation}",
        "senderStaffId": f"staff{conversation}",
        "senderCorpId": "dingbenchcorp",
        "isAdmin": False,
        "isInAtList": True,
        "sessionWebhook": webhook,
        "sessionWebhookExpiredTime": now + 90 * 60 * 1000,
        "createAt": now,
        "robotCode": CLIENT_ID,
    }


class DingTalkDouble:
    def __init__(self) -> None:
        self.sink = Sink({WEBHOOK_PATH.encode(): b'{"errcode":0,"errmsg":"ok"}'}, (WEBHOOK_PATH.encode(),))
        self.sink.on_reply = self._on_reply
        self.port = 0
        self.connections = 0
        self.acks = 0
        self.bad_acks = 0
        self.connected = asyncio.Event()  # set while at least one Stream connection is open
        self.replied: Counter[str] = Counter()  # msgId -> replies that reached the sink for it
        self.frames_per_connection: Counter[int] = Counter()  # connection number -> frames pushed
        # The open Stream connections, oldest first: (number, websocket, its TCP transport).
        self._open: list[tuple[int, web.WebSocketResponse, asyncio.BaseTransport | None]] = []
        self._changed = asyncio.Condition()
        self._turn = itertools.count()  # round-robin over the open connections
        self._runner: web.AppRunner | None = None
        self._frames = itertools.count()
        self._messages = itertools.count()
        self._ack_waiters: dict[str, asyncio.Future[float]] = {}
        self._reply_waiters: dict[str, asyncio.Future[float]] = {}
        self._backlog: deque[str] = deque()  # frames to push once (re)connected
        self.card_calls: list[tuple[float, str, dict[str, object]]] = []  # (monotonic, path, body)

    # -- servers ----------------------------------------------------------------------------
    async def start(self) -> DingTalkDouble:
        await self.sink.server.start()
        app = web.Application()
        app.router.add_post("/v1.0/gateway/connections/open", self._open_connection)
        app.router.add_post("/v1.0/oauth2/accessToken", self._token)
        app.router.add_post("/gettoken", self._token)
        app.router.add_get("/connect", self._connect)
        # OpenAPI sends, used when a sessionWebhook is no longer valid: counted like replies.
        app.router.add_post("/v1.0/robot/oToMessages/batchSend", self._openapi_send)
        app.router.add_post("/v1.0/robot/groupMessages/send", self._openapi_send)
        # AI cards (§A.9): every call recorded with its arrival time (scenario 9).
        app.router.add_post("/v1.0/card/instances/createAndDeliver", self._card)
        app.router.add_put("/v1.0/card/streaming", self._card)
        app.router.add_put("/v1.0/card/instances", self._card)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    @property
    def api_base(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def stop(self) -> None:
        for _, ws, _ in list(self._open):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.sink.server.stop()

    async def _open_connection(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clientId") != CLIENT_ID or body.get("clientSecret") != SECRET:
            return web.json_response({"code": "InvalidAuthentication"}, status=401)
        return web.json_response({"endpoint": f"ws://{HOST}:{self.port}/connect", "ticket": "bench-ticket"})

    async def _token(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "accessToken": "bench-token",
                "expireIn": 7200,
                "access_token": "bench-token",
                "expires_in": 7200,
                "errcode": 0,
            }
        )

    async def _card(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.card_calls.append((time.monotonic(), request.path, body))
        if request.path.endswith("/createAndDeliver"):
            space = {"spaceType": "IM_ROBOT", "spaceId": body.get("openSpaceId", ""), "success": True}
            result = {"outTrackId": body.get("outTrackId"), "deliverResults": [space]}
            return web.json_response({"success": True, "result": result})
        return web.json_response({"success": True})

    async def _openapi_send(self, request: web.Request) -> web.Response:
        await request.read()
        self.sink.replies += 1
        return web.json_response({"processQueryKey": "bench"})

    async def _connect(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        self.connections += 1
        entry = (self.connections, ws, request.transport)
        self._open.append(entry)
        await self._opened_or_closed()
        while self._backlog:
            await ws.send_str(self._backlog.popleft())
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    self._on_ack(msg.data)
        finally:
            if entry in self._open:
                self._open.remove(entry)
            await self._opened_or_closed()
        return ws

    async def _opened_or_closed(self) -> None:
        if self._open:
            self.connected.set()
        else:
            self.connected.clear()
        async with self._changed:
            self._changed.notify_all()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def wait_connections(self, count: int, within: float = 15.0) -> None:
        """Until `count` Stream connections are open (TimeoutError after `within` seconds)."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self._open) >= count)

    # -- frames -----------------------------------------------------------------------------
    def callback_frame(self, conversation: str, text: str) -> tuple[str, str, str]:
        """(frame messageId, msgId, frame JSON) for one message; the sessionWebhook names the msgId."""
        n = next(self._messages)
        msg_id = f"msg{n:09d}"
        webhook = f"{self.sink.server.url}{WEBHOOK_PATH}?session={conversation}&m={msg_id}"
        frame_id = f"frm{next(self._frames):09d}"
        frame = {
            "specVersion": "1.0",
            "type": "CALLBACK",
            "headers": {
                "appId": CLIENT_ID,
                "connectionId": "bench",
                "contentType": "application/json",
                "messageId": frame_id,
                "time": str(int(time.time() * 1000)),
                "topic": TOPIC,
            },
            "data": orjson.dumps(chatbot_payload(msg_id, conversation, text, webhook)).decode(),
        }
        return frame_id, msg_id, orjson.dumps(frame).decode()

    def _on_ack(self, data: str) -> None:
        try:
            ack = orjson.loads(data)
            frame_id = ack["headers"]["messageId"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.bad_acks += 1
            return
        if ack.get("code") != 200 or ack["headers"].get("contentType") != "application/json":
            self.bad_acks += 1  # the real server would not take it (docs/protocols/dingtalk.md §A.6)
        self.acks += 1
        future = self._ack_waiters.pop(frame_id, None)
        if future is not None and not future.done():
            future.set_result(time.monotonic())

    def _on_reply(self, path: bytes, body: bytes) -> None:
        query = parse_qs(urlsplit(path.decode()).query)
        msg_id = query.get("m", [""])[0]
        self.replied[msg_id] += 1
        future = self._reply_waiters.pop(msg_id, None)
        if future is not None and not future.done():
            future.set_result(time.monotonic())

    async def push(self, frame: str, via: int | None = None) -> int:
        """Send now on the next open connection in turn (or on the `via`-th, modulo how many are
        open), or keep it for the next connection when none is open. Returns the index of the
        connection used among the open ones (-1: kept)."""
        live = [(n, ws) for n, ws, _ in self._open if not ws.closed]
        if not live:
            self._backlog.append(frame)
            return -1
        index = (next(self._turn) if via is None else via) % len(live)
        number, ws = live[index]
        self.frames_per_connection[number] += 1
        await ws.send_str(frame)
        return index

    def expect_ack(self, frame_id: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._ack_waiters[frame_id] = future
        return future

    def expect_reply(self, msg_id: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._reply_waiters[msg_id] = future
        return future

    async def send_message(self, conversation: str, text: str) -> tuple[float, asyncio.Future[float]]:
        _, msg_id, frame = self.callback_frame(conversation, text)
        reply = self.expect_reply(msg_id)
        sent = time.monotonic()
        await self.push(frame)
        return sent, reply

    def drop(self) -> None:
        """Drop the TCP connections under the stream without a close frame (a network failure)."""
        for _, _, transport in self._open:
            if transport is not None:
                transport.close()
        self._open.clear()
        self.connected.clear()
