"""What every HTTP answer backend shares: the key ring, Retry-After, one deadline for the whole call,
retries only before the first delta, transport errors mapped to `ModelError`, the metrics.

A provider module subclasses `HttpBackend` with how to ask (`_call`: URL, JSON body, headers) and
how to read a 200 answer (`_read`, usually over `gateway.sse`); it may refine how a refusal is
classified (`_refused`). Retries (connection errors, 429, 5xx) happen only before the first delta
reached the caller, so a user never sees a half answer repeated. `total_timeout` is one deadline for
the whole call, retries included; it fires only while waiting for the backend, never inside the
caller's own code between deltas. A backend that says its conversation is gone (`conversation_gone`)
is asked once more, without the conversation.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError

from ..backoff import Backoff
from ..config import ModelConfig
from ..errors import ModelError
from ..metrics import Metrics
from ..sse import SseError
from .base import BackendRequest, Completion, Delta

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request to a backend: POST `url` with `body` as JSON (the API key goes in
    `Authorization: Bearer` unless the backend says otherwise in `headers`)."""

    url: str
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


class KeyRing:
    """Round-robin API keys; a key that got 401/429 sits out `cooldown` seconds."""

    def __init__(self, keys: list[str], cooldown: float) -> None:
        self._keys = list(keys)
        self._cooldown = cooldown
        self._benched: dict[str, float] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._keys)

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


def retry_after(headers: Mapping[str, str]) -> float | None:
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


class HttpBackend(ABC):
    """A backend answering over HTTP; see the module docstring for what it does for a subclass."""

    keeps_history = False

    def __init__(self, cfg: ModelConfig, session: aiohttp.ClientSession, metrics: Metrics) -> None:
        self.cfg = cfg
        self.name = cfg.model
        self._session = session
        self._metrics = metrics
        self._keys = KeyRing(cfg.api_keys, cfg.key_cooldown)

    # -- what a provider supplies ------------------------------------------------------------------
    @abstractmethod
    def _call(self, request: BackendRequest, key: str | None) -> Call:
        """The HTTP request that asks `request`."""

    @abstractmethod
    def _read(self, resp: aiohttp.ClientResponse, completion: Completion) -> AsyncGenerator[Delta, None]:
        """The deltas of a 200 answer; sets `completion`'s timings, usage, model and session.
        Raises `ModelError` (e.g. an error event inside the stream) or `SseError`."""

    async def _refused(self, resp: aiohttp.ClientResponse, key: str | None) -> NoReturn:
        """Raise the `ModelError` for a non-200 answer (the usual HTTP meaning of its status)."""
        status = resp.status
        detail = (await resp.read())[:200].decode("utf-8", "replace")
        wait = retry_after(resp.headers)
        if status in (401, 403):
            self._keys.bench(key)
            raise ModelError(f"model endpoint refused the API key ({status})", "auth", len(self._keys) > 1)
        if status == 429:
            self._keys.bench(key, wait)
            raise ModelError("model endpoint is rate limiting (429)", "rate_limited", True, wait)
        if status >= 500:
            raise ModelError(f"model endpoint error {status}: {detail}", "server_error", True, wait)
        raise ModelError(f"model endpoint rejected the request ({status}): {detail}", "bad_request")

    async def probe(self) -> str:
        """A one-word question (the doctor sets max_tokens = 1); a provider with a cheaper
        request that proves the key overrides this."""
        ping = BackendRequest([{"role": "user", "content": "ping"}], "ping", "doctor:botgate", "botgate", "doctor")
        async with aclosing(self.stream(ping, Completion())) as deltas:
            async for _ in deltas:
                pass
        return "answered a one-token request"

    async def stop(self, completion: Completion) -> None:
        return None  # closing the stream stops the answer

    # -- the call ----------------------------------------------------------------------------------
    async def stream(self, request: BackendRequest, completion: Completion) -> AsyncGenerator[Delta, None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.total_timeout
        started = completion.requested_at = time.monotonic()
        error: str | None = None
        finished = False
        try:
            async with aclosing(self._stream_with_retries(request, completion, deadline)) as deltas:
                while True:
                    # The deadline wraps each wait for the backend, never a `yield`: a timeout scope
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
            # backend: its time is recorded, but it neither fails nor ends a failure streak.
            self._metrics.model_call(max(0.0, end - started), error, settled=finished or error is not None)

    async def _stream_with_retries(
        self, request: BackendRequest, completion: Completion, deadline: float
    ) -> AsyncGenerator[Delta, None]:
        loop = asyncio.get_running_loop()
        backoff = Backoff(first=0.5, cap=8.0)
        attempt = 0
        while True:
            yielded = False
            try:
                async for delta in self._attempt(request, completion):
                    yielded = True
                    yield delta
                return
            except ModelError as e:
                if e.reason == "conversation_gone" and request.session is not None and not yielded:
                    # Deleted or expired on the backend's side: a new conversation, asked at once.
                    log.info("backend conversation gone, starting a new one", extra={"backend": self.name})
                    self._metrics.model_retries.labels(e.reason).inc()
                    request = replace(request, session=None)
                    completion.session = None
                    continue
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

    async def _attempt(self, request: BackendRequest, completion: Completion) -> AsyncGenerator[Delta, None]:
        key = self._keys.pick()
        call = self._call(request, key)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        headers.update(call.headers)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.first_token_timeout
        )
        try:
            async with self._session.post(
                call.url, data=orjson.dumps(call.body), headers=headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    await self._refused(resp, key)
                async for delta in self._read(resp, completion):
                    yield delta
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
        except (SseError, HttpProcessingError) as e:  # e.g. an SSE line over the reader's limit
            why = f"model endpoint sent an unreadable answer: {type(e).__name__}"
            raise ModelError(why, "bad_response") from e
