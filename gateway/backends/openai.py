"""Any OpenAI-compatible `POST {base_url}/chat/completions` (OpenAI, DeepSeek, Qwen, Ollama, vLLM, ...).

Streaming (SSE) first; a server that answers a streaming request with plain JSON is accepted as the
non-streaming fallback. A reasoning model's thinking arrives in `delta.reasoning_content` (DeepSeek,
Bailian, vLLM before 0.11) or `delta.reasoning` (Ollama, OpenRouter, newer vLLM) and is yielded as
reasoning; inline `<think>` inside `content` is the answer step's to split (`gateway.reasoning`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from ..errors import ModelError
from ..sse import read_events
from .base import BackendRequest, Completion, Delta, DeltaKind
from .http import Call, HttpBackend

MALFORMED = "model endpoint sent malformed SSE data"


class OpenAIBackend(HttpBackend):
    def _call(self, request: BackendRequest, key: str | None) -> Call:
        body = {
            "model": self.cfg.model,
            "messages": request.messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
            "stream": self.cfg.stream,
        }
        if self.cfg.stream:
            # A last chunk with the request's token usage (and no choices): what quotas count.
            body["stream_options"] = {"include_usage": True}
        return Call(self.cfg.base_url.rstrip("/") + "/chat/completions", body)

    async def _read(self, resp: aiohttp.ClientResponse, completion: Completion) -> AsyncGenerator[Delta, None]:
        if resp.content_type != "text/event-stream":
            for delta in _read_json(await resp.read(), completion):
                yield delta
            return
        done = False
        async for event in read_events(resp.content.iter_any()):
            data = event.data.strip()
            if data == "[DONE]":
                done = True
                break
            if not data:
                continue  # a named event without data: nothing of the answer
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError as e:
                raise ModelError(MALFORMED, "bad_response") from e
            if not isinstance(chunk, dict):
                raise ModelError(MALFORMED, "bad_response")
            if "error" in chunk:
                raise ModelError(f"model endpoint error: {str(chunk['error'])[:200]}", "server_error")
            now = time.monotonic()
            completion.last_byte_at = now
            _note_usage(chunk, completion)
            for delta in _deltas(chunk):
                if completion.first_byte_at is None:
                    completion.first_byte_at = now
                yield delta
        if not done and completion.first_byte_at is None:
            raise ModelError("model stream ended before any answer", "bad_response", True)


def _read_json(raw: bytes, completion: Completion) -> list[Delta]:
    """A whole (non-streaming) answer: its thinking, if any, and its text."""
    completion.first_byte_at = completion.last_byte_at = time.monotonic()
    try:
        data = orjson.loads(raw)
        message = data["choices"][0]["message"]
        text = message["content"] or ""
        thought = message.get("reasoning_content") or message.get("reasoning")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ModelError("model endpoint sent an unreadable answer", "bad_response") from e
    _note_usage(data, completion)
    deltas = [Delta(DeltaKind.REASONING, thought)] if isinstance(thought, str) and thought else []
    return [*deltas, Delta(DeltaKind.ANSWER, str(text))]


def _deltas(chunk: dict[str, Any]) -> list[Delta]:
    """The reasoning and answer text in one streamed chunk (all choices; usually one)."""
    thinking: list[str] = []
    text: list[str] = []
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise ModelError(MALFORMED, "bad_response")
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        # Both may be present while vLLM renames the field; they then carry the same text.
        thought = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(thought, str) and thought:
            thinking.append(thought)
        content = delta.get("content")
        if isinstance(content, str) and content:
            text.append(content)
    out = []
    if thinking:
        out.append(Delta(DeltaKind.REASONING, "".join(thinking)))
    if text:
        out.append(Delta(DeltaKind.ANSWER, "".join(text)))
    return out


def _note_usage(data: dict[str, Any], completion: Completion) -> None:
    usage = data.get("usage")
    if isinstance(usage, dict):
        for name in ("prompt_tokens", "completion_tokens"):
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(completion.usage, name, value)
    model = data.get("model")
    if isinstance(model, str) and model:
        completion.model = model
