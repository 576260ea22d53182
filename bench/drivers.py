"""Ways to put a conversation's messages into a gateway and see its replies come back, timed.

`send(conversation, text)` returns when the message left the bench, with the send time and a future
that resolves to the monotonic time the reply arrived. The web chat driver talks to `/chat/ws`
(JSON frames `message` -> `accepted` / `delta` / `done`); the DingTalk driver pushes Stream CALLBACK
frames from the DingTalk double and sees the reply arrive at its sessionWebhook sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterable
from typing import Protocol

import aiohttp
import orjson

from .dingtalk import DingTalkDouble


class DriverError(Exception):
    """The gateway answered with an error / busy frame, or a reply never came."""


class Driver(Protocol):
    path: str  # how messages travel, for the report

    async def open(self, conversations: Iterable[str]) -> None: ...

    async def send(self, conversation: str, text: str) -> tuple[float, asyncio.Future[float]]: ...

    async def close_some(self, conversations: Iterable[str]) -> None: ...

    async def close(self) -> None: ...


class WebChatDriver:
    path = "web chat websocket (/chat/ws)"

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        self._url = base_url.replace("http://", "ws://") + "/chat/ws"
        # `headers`: the gateway's admin credential (its web chat is an admin surface)
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers)
        self._sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._pending: dict[str, asyncio.Future[float]] = {}
        self._session_ids: dict[str, str] = {}  # conversation name -> the server's session id
        self._ids = itertools.count()

    async def open(self, conversations: Iterable[str]) -> None:
        names = list(conversations)
        for i in range(0, len(names), 256):  # bounded parallel handshakes
            await asyncio.gather(*(self._open_one(n) for n in names[i : i + 256]))

    async def _open_one(self, conversation: str) -> None:
        # The gateway issues a session of its own (`<id>.<mac>`) for a name it did not issue; the
        # reference relay keeps the name. Either way the id before any dot prefixes the message ids.
        ws = await self._http.ws_connect(self._url, params={"session": conversation}, heartbeat=None)
        hello = orjson.loads((await ws.receive(timeout=10)).data)
        session = hello.get("session")
        if not isinstance(session, str) or not session:
            raise DriverError(f"web chat issued no session: {hello}")
        self._session_ids[conversation] = session.partition(".")[0]
        self._sockets[conversation] = ws
        self._readers[conversation] = asyncio.create_task(self._read(ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for frame in ws:
            if frame.type is not aiohttp.WSMsgType.TEXT:
                break
            now = time.monotonic()
            data = orjson.loads(frame.data)
            kind = data.get("type")
            if kind in ("done", "notice"):
                future = self._pending.pop(data.get("reply_to", ""), None)
                if future is not None and not future.done():
                    future.set_result(now)
            elif kind in ("busy", "error"):
                future = self._pending.pop(f"{data.get('id', '')}", None)
                if future is not None and not future.done():
                    future.set_exception(DriverError(f"gateway answered {data}"))

    async def send(self, conversation: str, text: str) -> tuple[float, asyncio.Future[float]]:
        message_id = f"m{next(self._ids)}"
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pending[f"{self._session_ids[conversation]}:{message_id}"] = future
        sent = time.monotonic()
        await self._sockets[conversation].send_str(
            orjson.dumps({"type": "message", "id": message_id, "text": text}).decode()
        )
        return sent, future

    async def close_some(self, conversations: Iterable[str]) -> None:
        async def close_one(name: str) -> None:
            await self._sockets.pop(name).close()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readers.pop(name)

        await asyncio.gather(*(close_one(n) for n in list(conversations)))

    async def close(self) -> None:
        await self.close_some(list(self._sockets))
        await self._http.close()


class DingTalkStreamDriver:
    path = "DingTalk Stream (CALLBACK frame -> sessionWebhook)"

    def __init__(self, double: DingTalkDouble) -> None:
        self._double = double

    async def open(self, conversations: Iterable[str]) -> None:
        return None  # one stream carries every conversation

    async def send(self, conversation: str, text: str) -> tuple[float, asyncio.Future[float]]:
        return await self._double.send_message(conversation, text)

    async def close_some(self, conversations: Iterable[str]) -> None:
        return None

    async def close(self) -> None:
        return None
