"""An OpenAI-compatible chat-completions server: streaming and not, slow, 429, 500, dropped.

Behaviour is scripted per request by the last user message, so one server serves many cases:
  "slow:<seconds> ..."   wait before answering
  "status:<code> ..."    answer that HTTP status (429 carries Retry-After: 0)
  "drop ..."             close the connection mid-stream
  "garbage ..."          send malformed SSE
or by pushing to `script` (a list of status codes consumed one per request, then normal answers).
The answer is "echo: <text>" streamed word by word (or a fixed `answer` when set).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class OpenAIDouble:
    answer: str | None = None
    delay: float = 0.0
    script: list[int] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        return app

    def reply_text(self, body: dict[str, Any]) -> str:
        if self.answer is not None:
            return self.answer
        content = body["messages"][-1]["content"]
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        return f"echo: {content}"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.auth_headers.append(request.headers.get("Authorization", ""))
        self.received.set()
        last = body["messages"][-1]["content"]
        last = last if isinstance(last, str) else ""
        if self.script:
            status = self.script.pop(0)
            if status != 200:
                return web.json_response({"error": {"message": "scripted"}}, status=status, headers={"Retry-After": "0"})
        if last.startswith("status:"):
            code = int(last.split()[0].split(":")[1])
            return web.json_response({"error": {"message": "scripted"}}, status=code, headers={"Retry-After": "0"})
        delay = self.delay
        if last.startswith("slow:"):
            delay = float(last.split()[0].split(":")[1])
        if delay:
            await asyncio.sleep(delay)
        text = self.reply_text(body)
        model = body.get("model", "double")
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": len(text.split())},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if last.startswith("garbage"):
            await resp.write(b"data: {not json\n\n")
            return resp
        words = text.split(" ")
        for i, word in enumerate(words):
            if last.startswith("drop") and i == 1:
                assert request.transport is not None
                request.transport.close()
                return resp
            chunk = {
                "id": "cmpl-1",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}],
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        usage = {"choices": [], "model": model, "usage": {"prompt_tokens": 7, "completion_tokens": len(words)}}
        await resp.write(b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
        return resp
