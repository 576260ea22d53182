"""Model clients: any OpenAI-compatible `POST {base_url}/chat/completions`, and `echo`.

Streaming (SSE) first; a server that answers a streaming request with plain JSON is accepted as the
non-streaming fallback. Retries (connection errors, 429, 5xx) happen only before the first token
reached the caller, so a user never sees a half answer repeated. `total_timeout` is one deadline
for the whole call (retries included); it fires only while waiting for the model, never inside the
caller's own code between deltas.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError

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
    requested_at: float | None = None  # time.monotonic() values
    first_byte_at: float | None = None
    last_byte_at: float | None = None


class ModelClient(Protocol):
    name: str  # the configured model, for logs and cache keys

    def stream(self, messages: list[Message], completion: Completion) -> AsyncGenerator[str, None]:
        """Yield text deltas of the answer; raise `ModelError` on failure. Callers close it
        (`contextlib.aclosing`) so an abandoned call releases its connection at once."""


class EchoModel:
    """Used when no model is configured, so a fresh install answers end to end."""

    name = "echo"

    async def stream(self, messages: list[Message], completion: Completion) -> AsyncGenerator[str, None]:
        completion.model = "echo"
        completion.requested_at = completion.first_byte_at = time.monotonic()
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
        """Skip `key` for `seconds` (the server's Retry-After) or, by default, the cooldown."""
        if key is not None:
            self._benched[key] = time.monotonic() + (self._cooldown if seconds is None else seconds)

    def fresh(self) -> bool:
        """Whether some key is not benched, i.e. a retry can switch keys instead of waiting."""
        now = time.monotonic()
        return any(self._benched.get(k, 0.0) <= now for k in self._keys)


def _retry_after(headers: Any) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIModel:
    """Client for OpenAI-compatible chat completions (OpenAI, DeepSeek, Qwen, Ollama, vLLM, ...)."""

    def __init__(self, cfg: ModelConfig, session: aiohttp.ClientSession, metrics: Metrics) -> None:
        self.cfg = cfg
        self.name = cfg.model
        self._session = session
        self._metrics = metrics
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._keys = _KeyRing(cfg.api_keys, cfg.key_cooldown)

    async def stream(self, messages: list[Message], completion: Completion) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.total_timeout
        started = completion.requested_at = time.monotonic()
        error: str | None = None
        finished = False
        try:
            async with aclosing(self._stream_with_retries(messages, completion, deadline)) as deltas:
                while True:
                    # The deadline wraps each wait for the model, never a `yield`: a timeout scope
                    # spanning a yield would fire inside the caller's code (a card update, say) as
                    # a stray CancelledError instead of a TimeoutError here.
                    try:
                        async with asyncio.timeout_at(deadline):
                            delta = await anext(deltas)
                    except StopAsyncIteration:
                        break
                    yield delta
            finished = True
        except TimeoutError:
            error = "timeout"
            raise ModelError("model call exceeded the total timeout", "timeout") from None
        except ModelError as e:
            error = e.reason
            raise
        finally:
            end = completion.last_byte_at or time.monotonic()
            # A call the caller abandoned (deadline, delivery failed) says nothing about the
            # model: its time is recorded, but it neither fails nor ends a failure streak.
            self._metrics.model_call(max(0.0, end - started), error, settled=finished or error is not None)

    async def _stream_with_retries(
        self, messages: list[Message], completion: Completion, deadline: float
    ) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
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
                if e.reason in ("auth", "rate_limited") and self._keys.fresh():
                    delay = 0.0  # another key is available right now
                elif e.retry_after is not None:
                    delay = e.retry_after + random.uniform(0, 0.1)
                else:
                    delay = backoff.next()
                if loop.time() + delay >= deadline:
                    raise  # waiting would only end in a timeout; report the real cause
                self._metrics.model_retries.labels(e.reason).inc()
                log.warning(
                    "model call failed, retrying",
                    extra={"reason": e.reason, "attempt": attempt, "retry_in_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)

    async def _attempt(self, messages: list[Message], completion: Completion) -> AsyncGenerator[str, None]:
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
        # aiohttp's timeouts are ClientConnectionErrors too, so they are told apart first.
        except aiohttp.ConnectionTimeoutError as e:
            raise ModelError("model endpoint did not accept the connection", "connection", True) from e
        except TimeoutError as e:
            # sock_read: no byte within first_token_timeout (between chunks too).
            if completion.first_byte_at is None:
                why = "model sent nothing within first_token_timeout"
                raise ModelError(why, "first_token_timeout", True) from e
            raise ModelError("model stream stalled mid-answer", "read_timeout", True) from e
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            name = type(e).__name__
            if completion.first_byte_at is None:
                raise ModelError(f"model endpoint unreachable: {name}", "connection", True) from e
            raise ModelError(f"model connection dropped mid-answer: {name}", "connection", True) from e
        except HttpProcessingError as e:  # e.g. an SSE line longer than aiohttp's line limit
            why = f"model endpoint sent an unreadable answer: {type(e).__name__}"
            raise ModelError(why, "bad_response") from e

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
    async def _read_sse(resp: aiohttp.ClientResponse, completion: Completion) -> AsyncGenerator[str, None]:
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
            _note_usage(chunk, completion)
            delta = _delta_text(chunk)
            if delta:
                if completion.first_byte_at is None:
                    completion.first_byte_at = now
                yield delta
        if not done and completion.first_byte_at is None:
            raise ModelError("model stream ended before any answer", "bad_response", True)


def _delta_text(chunk: dict[str, Any]) -> str:
    """The answer text in one streamed chunk (all choices; usually one)."""
    parts = []
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise ModelError("model endpoint sent malformed SSE data", "bad_response")
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str):
            parts.append(content)
    return "".join(parts)


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


def uses_echo(cfg: ModelConfig) -> bool:
    """Whether `cfg` selects the echo provider (asked for, or `auto` without a base URL)."""
    return cfg.provider == "echo" or (cfg.provider == "auto" and not cfg.base_url)


def create_model_client(
    cfg: ModelConfig, session: aiohttp.ClientSession, metrics: Metrics
) -> ModelClient:
    if uses_echo(cfg):
        return EchoModel()
    return OpenAIModel(cfg, session, metrics)
