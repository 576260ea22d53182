"""A Feishu double for benchmarks: ws endpoint, long connection with protobuf frames, the open APIs.

Wire format as in docs/protocols/feishu.md §B: `pbbp2.Frame` (the gateway's own codec,
handlers/feishu/frame.py, so the double needs neither lark-oapi nor protobuf), data frames with the
five required headers, the client's response frame reusing the headers, ping -> pong carrying the
ClientConfig. Open-API calls (token, bot info, reply, cards) are answered with canned success bodies by
a cheap sink.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import orjson
from aiohttp import WSMsgType, web

from handlers.feishu.frame import Frame, FrameError, decode, encode

from .doubles import Sink
from .env import HOST
from .servers import FEISHU_APP_ID

SERVICE_ID = 33
CLIENT_CONFIG = {"ReconnectCount": -1, "ReconnectInterval": 1, "ReconnectNonce": 0, "PingInterval": 120}


def message_event(n: int, conversation: str, text: str) -> bytes:
    """`im.message.receive_v1` (schema 2.0) for a p2p text message."""
    now = str(int(time.time() * 1000))
    event = {
        "schema": "2.0",
        "header": {
            "event_id": f"ev{n:09d}",
            "event_type": "im.message.receive_v1",
            "create_time": now,
            "token": "bench",
            "app_id": FEISHU_APP_ID,
            "tenant_key": "bench",
        },
        "event": {
            "sender": {
                "sender_id": {
                    "union_id": f"on_{conversation}",
                    "user_id": f"u{conversation}",
                    "open_id": f"ou_{conversation}",
                },
                "sender_type": "user",
                "tenant_key": "bench",
            },
            "message": {
                "message_id": f"om_{n:09d}",
                "root_id": "",
                "parent_id": "",
                "create_time": now,
                "update_time": now,
                "chat_id": f"oc_{conversation}",
                "thread_id": "",
                "chat_type": "p2p",
                "message_type": "text",
                "content": orjson.dumps({"text": text}).decode(),
                "mentions": [],
                "user_agent": "bench",
            },
        },
    }
    return orjson.dumps(event)


class FeishuDouble:
    def __init__(self) -> None:
        ok = b'{"code":0,"msg":"success","data":{"message_id":"om_bench_reply","card_id":"card_bench"}}'
        self.sink = Sink(
            {
                b"/callback/ws/endpoint": b"",  # filled in start(): needs the ws port
                b"/open-apis/auth/v3/": orjson.dumps(
                    {
                        "code": 0,
                        "msg": "ok",
                        "tenant_access_token": "t-bench",
                        "app_access_token": "a-bench",
                        "expire": 7200,
                    }
                ),
                b"/open-apis/bot/v3/info": orjson.dumps(
                    {
                        "code": 0,
                        "msg": "ok",
                        "bot": {"open_id": "ou_bench_bot", "app_name": "bench", "activate_status": 2},
                    }
                ),
                b"/open-apis/": ok,
            },
            (b"/open-apis/im/v1/messages",),
        )
        self.port = 0
        self.connections = 0
        self.acks = 0
        self.bad_acks = 0
        self.connected = asyncio.Event()
        self._ws: web.WebSocketResponse | None = None
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count()
        self._ack_waiters: dict[str, asyncio.Future[float]] = {}

    async def start(self) -> FeishuDouble:
        app = web.Application()
        app.router.add_get("/ws", self._connect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, 0).start()
        self.port = self._runner.addresses[0][1]
        self.sink.routes[b"/callback/ws/endpoint"] = orjson.dumps(
            {
                "code": 0,
                "msg": "ok",
                "data": {
                    "URL": f"ws://{HOST}:{self.port}/ws?device_id=bench&service_id={SERVICE_ID}",
                    "ClientConfig": CLIENT_CONFIG,
                },
            }
        )
        await self.sink.server.start()
        return self

    @property
    def domain(self) -> str:
        return self.sink.server.url

    async def stop(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.sink.server.stop()

    async def _connect(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        self._ws = ws
        self.connections += 1
        self.connected.set()
        try:
            async for msg in ws:
                if msg.type is WSMsgType.BINARY:
                    try:
                        frame = decode(msg.data)
                    except FrameError:
                        self.bad_acks += 1
                        continue
                    await self._on_frame(ws, frame)
        finally:
            if self._ws is ws:
                self._ws = None
                self.connected.clear()
        return ws

    async def _on_frame(self, ws: web.WebSocketResponse, frame: Frame) -> None:
        if frame.method == 0 and frame.header("type") == "ping":
            pong = Frame(0, 0, SERVICE_ID, 0, (("type", "pong"),), payload=orjson.dumps(CLIENT_CONFIG))
            await ws.send_bytes(encode(pong))
            return
        if frame.method != 1:
            return
        try:
            ok = orjson.loads(frame.payload or b"").get("code") == 200
        except (orjson.JSONDecodeError, AttributeError):
            ok = False
        self.acks += 1
        self.bad_acks += not ok
        future = self._ack_waiters.pop(frame.header("message_id") or "", None)
        if future is not None and not future.done():
            future.set_result(time.monotonic())

    def event_frame(self, conversation: str, text: str) -> tuple[str, bytes]:
        n = next(self._ids)
        frame_id = f"fm{n:09d}"
        headers = (
            ("type", "event"),
            ("message_id", frame_id),
            ("sum", "1"),
            ("seq", "0"),
            ("trace_id", f"t{n}"),
        )
        payload = message_event(n, conversation, text)
        return frame_id, encode(Frame(n + 1, n + 1, SERVICE_ID, 1, headers, payload=payload))

    def expect_ack(self, frame_id: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._ack_waiters[frame_id] = future
        return future

    async def push(self, frame: bytes) -> None:
        if self._ws is None:
            raise ConnectionError("no Feishu long connection")
        await self._ws.send_bytes(frame)
