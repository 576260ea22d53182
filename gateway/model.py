"""Model clients: any OpenAI-compatible `POST {base_url}/chat/completions`, and `echo`.

Streaming (SSE) first; a server that answers a streaming request with plain JSON is accepted as the
non-streaming fallback. Retries (connection errors, 429, 5xx) happen only before the first token
reached the caller, so a user never sees a half answer repeated.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson

from .backoff import Backoff
from .config import ModelConfig
from .errors import ModelError
from .metrics import Metrics

log = logging.getLogger(__name__)

Message = dict[str, Any]  # one OpenAI chat message


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class Completion:
    """Filled while a stream runs; read after it ends."""

    model: str = ""
    usage: Usage = field(default_factory=Usage)
    first_byte_at: float | None = None
    last_byte_at: float | None = None


class ModelClient(Protocol):
    name: str  # the configured model, for logs and cache keys

    def stream(self, messages: list[Message], completion: Completion) -> AsyncIterator[str]:
        """Yield text deltas of the answer; raise `ModelError` on failure."""


class EchoModel:
    """Used when no model is configured, so a fresh install answers end to end."""

    name = "echo"

    async def stream(self, messages: list[Message], completion: Completion) -> AsyncIterator[str]:
        completion.model = "echo"
        completion.first_byte_at = time.monotonic()
        last = messages[-1]["content"] if messages else ""
        if isinstance(last, list):  # vision content parts
            last = " ".join(p.get("text", "") for p in last if p.get("type") == "text")
        quoted = "\n".join(f"> {line}" for line in str(last).splitlines()) or "> (empty)"
        yield (
            f"{quoted}\n\n(echo: no model is configured; set `[model] base_url` or "
            "`BOTGATE_MODEL__BASE_URL` to an OpenAI-compatible endpoint)"
        )
        completion.last_byte_at = time.monotonic()


class _KeyRing:
    """Round-robin API keys; a key that got 401/429 sits out `cooldown` seconds."""

    def __init__(self, keys: list[str], cooldown: float) -> None:
        self._keys = list(keys)
        self._cooldown = cooldown
        self._benched: dict[str, float] = {}
        self._next = 0

    def pick(self) -> str | None:
        if not self._keys:
            return None
        now = time.monotonic()
        for _ in range(len(self._keys)):
            key = self._keys[self._next % len(self._keys)]
            self._next += 1
            if self._benched.get(key, 0.0) <= now:
                return key
        # Every key is benched: use the one that comes back first rather than failing outright.
        return min(self._keys, key=lambda k: self._benched.get(k, 0.0))

    def bench(self, key: str | None, seconds: float | None = None) -> None:
        if key is not None:
            self._benched[key] = time.monotonic() + (seconds or self._cooldown)


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class OpenAIModel:
    """Client for OpenAI-compatible chat completions (OpenAI, DeepSeek, Qwen, Ollama, vLLM, ...)."""

    def __init__(self, cfg: ModelConfig, session: aiohttp.ClientSession, metrics: Metrics) -> None:
        self.cfg = cfg
        self.name = cfg.model
        self._session = session
        self._metrics = metrics
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._keys = _KeyRing(cfg.api_keys, cfg.key_cooldown)

    async def stream(self, messages: list[Message], completion: Completion) -> AsyncIterator[str]:
        started = time.monotonic()
        error: str | None = None
        finished = False
        try:
            async with asyncio.timeout(self.cfg.total_timeout):
                async for delta in self._stream_with_retries(messages, completion):
                    yield delta
            finished = True
        except TimeoutError:
            error = "timeout"
            raise ModelError("model call exceeded the total timeout", "timeout") from None
        except ModelError as e:
            error = e.reason
            raise
        finally:
            # A call the caller abandoned (deadline, stream closed early) proves nothing about
            # the model: it is not recorded, so it neither fails nor ends a failure streak.
            if finished or error is not None:
                self._metrics.model_call(time.monotonic() - started, error)

    async def _stream_with_retries(
        self, messages: list[Message], completion: Completion
    ) -> AsyncIterator[str]:
        backoff = Backoff(first=0.5, cap=8.0)
        attempt = 0
        while True:
            yielded = False
            try:
                async for delta in self._attempt(messages, completion):
                    yielded = True
                    yield delta
                return
            except ModelError as e:
                attempt += 1
                if yielded or not e.retryable or attempt > self.cfg.max_retries:
                    raise
                delay = backoff.next() if e.retry_after is None else e.retry_after + random.uniform(0, 0.1)
                log.warning(
                    "model call failed, retrying",
                    extra={"reason": e.reason, "attempt": attempt, "retry_in_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)

    async def _attempt(self, messages: list[Message], completion: Completion) -> AsyncIterator[str]:
        body = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
            "stream": self.cfg.stream,
        }
        key = self._keys.pick()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.first_token_timeout
        )
        try:
            async with self._session.post(
                self._url, data=orjson.dumps(body), headers=headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    await self._raise_for_status(resp, key)
                if resp.content_type == "text/event-stream":
                    async for delta in self._read_sse(resp, completion):
                        yield delta
                else:
                    yield self._read_json(await resp.read(), completion)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise ModelError(f"model endpoint unreachable: {type(e).__name__}", "connection", True) from e
        except TimeoutError as e:
            # sock_read: no byte within first_token_timeout (between chunks too).
            raise ModelError("model endpoint did not answer in time", "first_token_timeout", True) from e

    async def _raise_for_status(self, resp: aiohttp.ClientResponse, key: str | None) -> None:
        status = resp.status
        detail = (await resp.read())[:200].decode("utf-8", "replace")
        retry_after = _retry_after(resp.headers)
        if status in (401, 403):
            self._keys.bench(key)
            raise ModelError(
                f"model endpoint refused the API key ({status})", "auth", len(self.cfg.api_keys) > 1
            )
        if status == 429:
            self._keys.bench(key, retry_after)
            raise ModelError("model endpoint is rate limiting (429)", "rate_limited", True, retry_after)
        if status >= 500:
            raise ModelError(
                f"model endpoint error {status}: {detail}", "server_error", True, retry_after
            )
        raise ModelError(f"model endpoint rejected the request ({status}): {detail}", "bad_request")

    @staticmethod
    def _read_json(raw: bytes, completion: Completion) -> str:
        completion.first_byte_at = completion.last_byte_at = time.monotonic()
        try:
            data = orjson.loads(raw)
            text = data["choices"][0]["message"]["content"] or ""
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise ModelError("model endpoint sent an unreadable answer", "bad_response") from e
        _note_usage(data, completion)
        return str(text)

    @staticmethod
    async def _read_sse(resp: aiohttp.ClientResponse, completion: Completion) -> AsyncIterator[str]:
        done = False
        async for raw_line in resp.content:
            line = raw_line.strip()
            if not line.startswith(b"data:"):
                continue  # comments, event names, keep-alives
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                break
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError as e:
                raise ModelError("model endpoint sent malformed SSE data", "bad_response") from e
            if not isinstance(chunk, dict):
                raise ModelError("model endpoint sent malformed SSE data", "bad_response")
            if "error" in chunk:
                raise ModelError(f"model endpoint error: {str(chunk['error'])[:200]}", "server_error")
            now = time.monotonic()
            completion.last_byte_at = now
            completion.model = chunk.get("model") or completion.model
            _note_usage(chunk, completion)
            for choice in chunk.get("choices") or ():
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    if completion.first_byte_at is None:
                        completion.first_byte_at = now
                    yield delta
        if not done and completion.first_byte_at is None:
            raise ModelError("model stream ended before any answer", "bad_response", True)


def _note_usage(data: dict[str, Any], completion: Completion) -> None:
    usage = data.get("usage")
    if isinstance(usage, dict):
        completion.usage.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion.usage.completion_tokens = int(usage.get("completion_tokens") or 0)
    model = data.get("model")
    if isinstance(model, str) and model:
        completion.model = model


def create_model_client(
    cfg: ModelConfig, session: aiohttp.ClientSession, metrics: Metrics
) -> ModelClient:
    if cfg.provider == "echo" or (cfg.provider == "auto" and not cfg.base_url):
        return EchoModel()
    return OpenAIModel(cfg, session, metrics)
