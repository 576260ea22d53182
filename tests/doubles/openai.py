"""An OpenAI-compatible chat-completions server: streaming and not, slow, 429, 500, dropped.

Behaviour per request comes from `script` (consumed one entry per request, then normal answers):
  an int        answer that HTTP status with an OpenAI-style error body (and `retry_after`)
  "json"        answer plain JSON even to a streaming request (the non-streaming fallback)
  "drop"        stream the first word, then close the connection mid-stream
  "stall"       stream the first word, then send nothing more until `release()` (a client that
                closes the connection meanwhile is counted in `disconnects`: aiohttp's test
                server cancels the handler of a request whose client left)
  "pause"       stream the first word, wait for `release()`, then the rest as usual (a model
                that thinks mid-answer)
  "garbage"     send malformed SSE
  "error-event" stream an SSE `{"error": ...}` chunk (what vLLM / OpenRouter do mid-stream)
or from the last user message: "status:<code> ..." answers that status. With `hold` set, every
request waits for `release()` before answering (a slow model the test controls, no sleeps); with
`metered` set, requests answer in arrival order as `allow(n)` lets n more through (or `release()`
lets all), so a test knows exactly how many answers are under way.
A streamed answer ends with a usage chunk (no choices) only when the request asks for it with
`stream_options: {"include_usage": true}`, as OpenAI's API does; `usage = False` never sends usage
(a server that reports none). A key listed in `bad_keys` gets 401. The answer is "echo: <text>"
streamed word by word (or `answer`).

A reasoning model: with `reasoning` set, its words stream before the answer, the way `reasoning_as`
says (docs/protocols/backends.md §5): "reasoning_content" (DeepSeek, Bailian, vLLM) or "reasoning"
(Ollama, OpenRouter) deltas of their own, with `content` null meanwhile; "think" inline in `content`
as `<think>…</think>`, each tag cut in two across deltas; "orphan" inline without the opening tag
(a chat template that opened it in the prompt). A plain JSON answer carries it the same way.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class OpenAIDouble:
    answer: str | None = None
    script: list[int | str] = field(default_factory=list)
    retry_after: str | None = "0"
    bad_keys: set[str] = field(default_factory=set)
    hold: bool = False
    metered: bool = False
    error_body: str = "scripted"
    reasoning: str = ""
    reasoning_as: str = "reasoning_content"  # | "reasoning" | "think" | "orphan"
    usage: bool = True  # False: report no token usage, whatever the request asks
    requests: list[dict[str, Any]] = field(default_factory=list)
    transcript: str = "transcribed words"  # what /audio/transcriptions answers
    uploads: list[dict[str, Any]] = field(default_factory=list)  # each transcription request: model, file, auth
    auth_headers: list[str] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each request
    received: asyncio.Event = field(default_factory=asyncio.Event)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _allowed: int = 0  # metered: requests (by arrival index) that may answer
    _gate: asyncio.Event = field(default_factory=asyncio.Event)
    # Stalled streams whose client went away (aiohttp's TestServer runs with
    # `handler_cancellation=True`: a handler is cancelled as its client leaves).
    disconnects: int = 0
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        return app

    async def transcriptions(self, request: web.Request) -> web.Response:
        """`/audio/transcriptions` (multipart `file`, `model`): records the upload, answers `{"text": transcript}`."""
        form = await request.post()
        upload = form.get("file")
        data = upload.file.read() if isinstance(upload, web.FileField) else b""
        auth = request.headers.get("Authorization", "")
        self.uploads.append({"model": str(form.get("model", "")), "file": data, "auth": auth})
        return web.json_response({"text": self.transcript})

    def release(self) -> None:
        """Let held, metered and stalled requests finish."""
        self._released.set()
        self._open_gate()

    def allow(self, count: int) -> None:
        """Metered: let the next `count` requests (in arrival order) answer."""
        self._allowed += count
        self._open_gate()

    def _open_gate(self) -> None:
        self._gate.set()
        self._gate = asyncio.Event()

    async def wait_requests(self, count: int) -> None:
        """Wait until `count` requests have arrived in total."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)

    def reply_text(self, body: dict[str, Any]) -> str:
        if self.answer is not None:
            return self.answer
        content = body["messages"][-1]["content"]
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        return f"echo: {content}"

    def _thinking_deltas(self) -> list[dict[str, Any]]:
        """The `delta`s of the thinking, before the answer's."""
        if not self.reasoning:
            return []
        words = [w if i == 0 else " " + w for i, w in enumerate(self.reasoning.split(" "))]
        if self.reasoning_as in ("reasoning_content", "reasoning"):
            return [{"role": "assistant", "content": None, self.reasoning_as: w} for w in words]
        opening = ["<thi", "nk>"] if self.reasoning_as == "think" else []
        return [{"content": piece} for piece in [*opening, *words, "</th", "ink>\n\n"]]

    def _error(self, status: int) -> web.Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else None
        body = {"error": {"message": self.error_body, "type": "scripted", "code": status}}
        return web.json_response(body, status=status, headers=headers)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        key = request.headers.get("Authorization", "")
        ticket = len(self.requests)  # arrival index, for `metered`
        self.requests.append(body)
        self.auth_headers.append(key)
        self.arrivals.append(time.monotonic())
        self.received.set()
        async with self._arrived:
            self._arrived.notify_all()
        step: int | str = self.script.pop(0) if self.script else ""
        last = body["messages"][-1]["content"]
        last = last if isinstance(last, str) else ""
        if key.removeprefix("Bearer ") in self.bad_keys:
            return self._error(401)
        if isinstance(step, int) and step != 200:
            return self._error(step)
        if last.startswith("status:"):
            return self._error(int(last.split()[0].split(":")[1]))
        if self.hold or self.metered:
            while not self._released.is_set() and not (self.metered and ticket < self._allowed):
                await self._gate.wait()
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)  # the client gave up; nobody reads this
        text = self.reply_text(body)
        model = f"{body.get('model', 'double')}-0613"
        if not body.get("stream") or step == "json":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.reasoning and self.reasoning_as in ("think", "orphan"):
                opening = "<think>" if self.reasoning_as == "think" else ""
                message["content"] = f"{opening}{self.reasoning}</think>\n\n{text}"
            elif self.reasoning:
                message[self.reasoning_as] = self.reasoning
            answer: dict[str, Any] = {
                "id": "cmpl-1",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
            if self.usage:
                answer["usage"] = {"prompt_tokens": 7, "completion_tokens": len(text.split())}
            return web.json_response(answer)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        if step == "garbage":
            await resp.write(b"data: {not json\n\n")
            return resp
        if step == "error-event":
            await resp.write(b'data: {"error": {"message": "overloaded"}}\n\n')
            return resp
        await resp.write(b": keep-alive comment, ignored by clients\n\n")
        for delta in self._thinking_deltas():
            thought = {"id": "cmpl-1", "object": "chat.completion.chunk", "model": model, "choices": [{"delta": delta}]}
            await resp.write(b"data: " + orjson.dumps(thought) + b"\n\n")
        words = text.split(" ")
        for i, word in enumerate(words):
            if i == 1 and step == "drop":
                assert request.transport is not None
                request.transport.close()
                return resp
            if i == 1 and step == "pause":
                await self._released.wait()
            if i == 1 and step == "stall":
                try:
                    await self._released.wait()
                except asyncio.CancelledError:  # the client closed the connection
                    self.disconnects += 1
                    self.disconnected.set()
                    raise
                return resp
            chunk = {
                "id": "cmpl-1",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}],
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        options = body.get("stream_options")
        if self.usage and isinstance(options, dict) and options.get("include_usage") is True:
            usage = {
                "choices": [],
                "model": model,
                "usage": {"prompt_tokens": 7, "completion_tokens": len(words)},
            }
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp
