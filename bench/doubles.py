"""Bench-side doubles: a timed OpenAI double (the tests' one, plus timestamps) and cheap HTTP sinks.

The load generator shares one core with every double, so the high-rate doubles (the instant model,
the sessionWebhook / reply-API sinks) are raw asyncio protocols with canned answers: a few
microseconds per request instead of aiohttp's full request parsing, so they never become the
bottleneck they would otherwise be on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from tests.doubles.openai import OpenAIDouble

from .env import HOST

# A realistic answer size matters for the memory scenario (conversation context, model cache).
ANSWER = ("Here is a short answer in Markdown. " * 11).strip()  # ~400 characters


@dataclass
class TimedModel(OpenAIDouble):
    """The tests' OpenAI double ("echo: <text>", streamed word by word) answering after `delay`,
    recording per message when its request arrived and when its last byte was written. Keyed by
    the last user message's text."""

    delay: float = 0.0
    arrived_at: dict[str, float] = field(default_factory=dict)
    last_byte_at: dict[str, float] = field(default_factory=dict)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.json()  # aiohttp caches the body; the parent reads it again
        content = body["messages"][-1]["content"]
        key = content if isinstance(content, str) else ""
        self.arrived_at[key] = arrived
        await asyncio.sleep(self.delay)  # the model "thinking"
        resp = await super().completions(request)
        self.last_byte_at[key] = time.monotonic()
        # The parent keeps every body; a bench sends hundreds of thousands.
        self.requests.clear()
        self.auth_headers.clear()
        self.arrivals.clear()
        return resp


Responder = Callable[[bytes, bytes, bytes], tuple[int, bytes, bytes] | None]  # method, path, body


class RawHTTP(asyncio.Protocol):
    """HTTP/1.1 keep-alive server protocol with a canned-answer `responder` (Content-Length bodies)."""

    def __init__(self, server: RawServer) -> None:
        self._server = server
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._server.transports.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end])
            length = 0
            lines = head.split(b"\r\n")
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self._buf) < end + 4 + length:
                return
            body = bytes(self._buf[end + 4 : end + 4 + length])
            del self._buf[: end + 4 + length]
            method, path, _ = lines[0].split(b" ", 2)
            answer = self._server.respond(method, path, body)
            self._server.count += 1
            if answer is None:  # parked: never answered (until the connection closes)
                continue
            status, ctype, payload = answer
            assert self._transport is not None
            self._transport.write(
                b"HTTP/1.1 %d OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                % (status, ctype, len(payload), payload)
            )


class RawServer:
    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.count = 0
        self.port = 0
        self.transports: set[asyncio.Transport] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: RawHTTP(self), HOST, 0, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for transport in list(self.transports):
                transport.close()
            await self._server.wait_closed()


def instant_model(answer: str = ANSWER) -> RawServer:
    """An OpenAI-compatible endpoint that streams `answer` at once (one SSE chunk + [DONE])."""
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "bench",
        "choices": [{"index": 0, "delta": {"content": answer}}],
    }
    usage = {"choices": [], "model": "bench", "usage": {"prompt_tokens": 50, "completion_tokens": 90}}
    sse = b"data: " + orjson.dumps(chunk) + b"\n\ndata: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n"
    return RawServer(lambda method, path, body: (200, b"text/event-stream", sse))


def parked_model() -> RawServer:
    """A model endpoint that takes requests and never answers them: with `max_concurrency = 1` the
    gateway's core then does nothing but intake, which is what the ingress targets are about."""
    return RawServer(lambda method, path, body: None)


class Sink:
    """Receives replies (DingTalk sessionWebhook, Feishu/DingTalk APIs): canned JSON per path prefix,
    and `on_reply(path, body)` for the paths that carry an answer (to time individual replies)."""

    def __init__(self, routes: dict[bytes, bytes], reply_paths: tuple[bytes, ...] = ()) -> None:
        self.routes = routes
        self.reply_paths = reply_paths
        self.replies = 0
        self.on_reply: Callable[[bytes, bytes], None] | None = None
        self.server = RawServer(self._respond)

    def _respond(self, method: bytes, path: bytes, body: bytes) -> tuple[int, bytes, bytes]:
        if path.startswith(self.reply_paths):
            self.replies += 1
            if self.on_reply is not None:
                self.on_reply(path, body)
        for prefix, answer in self.routes.items():
            if path.startswith(prefix):
                return 200, b"application/json", answer
        return 404, b"application/json", b'{"error":"bench sink: no route"}'
