"""A FastGPT app: `POST {base_url}/chat/completions` with `base_url` = `<host>/api/v1`, OpenAI-compatible
plus FastGPT's own fields and errors (docs/protocols/fastgpt.md; § numbers below are its sections).

* History (§3.2): FastGPT keeps it per `chatId`, so this backend `keeps_history` and sends only the
  new user message. The chatId is ours to choose: a new chat gets `new_chat_id(request.context)` (a
  digest of botgate's context key, then a random part), reported in `Completion.session`, which the
  answer steps keep in the store like any backend's conversation id. The next message of the
  conversation finds it there and continues the chat; `/reset` (or `[context] idle_ttl` of silence)
  forgets it, so the next message starts a new chat. FastGPT has no "conversation gone": an unknown
  chatId is simply an empty history.
* Identity: `customUid` is the platform user key; `variables` carry `sender_id` (the same key),
  `sender_name`, `platform` and `conversation_id` (`IDENTITY`), then the configured `inputs` (which
  win on a shared name). They reach the app only where it declares those variables (§3.3).
* The stream (§4.2, §4.3) is read the same with or without `detail`: text and `reasoning_content`
  from frames without an event name or named `answer` / `fastAnswer` (the chunk parsing of
  `openai`); keep-alive chunks with empty content yield nothing; other events (node status, tools,
  `flowResponses`, `interactive`) are not the answer; `[DONE]` ends it, so what follows it is never
  read; `event: error` is a failure, never an empty answer (§6.2); a stream that ends without
  `[DONE]` is cut off (a failure too). An app that answers nothing (a failed node, §6.3) is the
  answer step's empty answer.
* Errors are classified by the body's `code` / `statusText`, whatever the HTTP status (§6.1), and a
  streaming request refused before the workflow runs is HTTP 200 with a single `event: error`
  frame and no event-stream content type: `_read` recognises it by that content type.
* `probe` sends `{"messages": []}`: FastGPT checks the key before it finds the list empty, so
  "messages is empty" proves URL and key without running the app (§6.4).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import replace
from typing import Any, NoReturn

import aiohttp
import orjson

from ..config import ModelConfig
from ..errors import ModelError
from ..metrics import Metrics
from ..sse import SseParser, read_events
from .base import BackendRequest, Completion, Delta, Message, Usage
from .http import Call, HttpBackend, retry_after
from .openai import MALFORMED, _deltas, _read_json

# Events whose data is answer chunks; "message" is a frame without an event line (detail = false).
ANSWER_EVENTS = frozenset({"message", "answer", "fastAnswer"})
# The variables botgate fills from the request (documented names: an app declares the ones it wants).
IDENTITY = ("sender_id", "sender_name", "platform", "conversation_id")  # as Dify's inputs
AUTH_CODES = {403: "unAuthorization", 514: "unAuthApiKey"}  # ERROR_RESPONSE entries, §2
EMPTY_MESSAGES = "messages is empty"  # the inert probe's answer once the key passed, §6.4
UNREADABLE = "FastGPT sent an unreadable answer"


def new_chat_id(context: str) -> str:
    """The chatId of a new FastGPT chat for botgate's context key `context`: a digest of the key
    (the same for every chat of one conversation, so FastGPT's logs show which chats belong
    together; the raw key has ':', '/' and platform ids in it) and a random part, so that each new
    chat, after `/reset` say, starts with an empty history. 29 characters; FastGPT wants fewer
    than 250 (§3.2)."""
    digest = hashlib.sha256(context.encode()).hexdigest()[:16] if context else "botgate"
    return f"{digest}-{secrets.token_hex(6)}"


class FastGPTBackend(HttpBackend):
    keeps_history = True
    detail = False  # FastGPT's `detail`: the answer, reasoning and errors all come without it

    def __init__(self, cfg: ModelConfig, session: aiohttp.ClientSession, metrics: Metrics) -> None:
        super().__init__(cfg, session, metrics)
        self.name = "fastgpt"  # `[model] model` means nothing to a FastGPT app: its workflow decides

    @property
    def url(self) -> str:
        return self.cfg.base_url.rstrip("/") + "/chat/completions"

    def stream(self, request: BackendRequest, completion: Completion) -> AsyncGenerator[Delta, None]:
        # The chatId is settled once per call, before any attempt, so a retry continues the same chat.
        if request.session is None:
            request = replace(request, session=new_chat_id(request.context))
        completion.session = request.session
        return super().stream(request, completion)

    def variables(self, request: BackendRequest) -> dict[str, str]:
        """The sender (`IDENTITY`; no `sender_name` where the platform sent none, as on Feishu),
        then the configured `inputs`, which win on a shared name."""
        values = (request.user, request.sender_name, request.platform, request.conversation_id)
        identity = {k: v for k, v in zip(IDENTITY, values, strict=True) if v}
        return {**identity, **self.cfg.inputs}

    def _call(self, request: BackendRequest, key: str | None) -> Call:
        body = {
            "chatId": request.session,
            "stream": self.cfg.stream,
            "detail": self.detail,
            "messages": [_question(request)],  # with a chatId FastGPT takes the history from its database
            "variables": self.variables(request),
            "customUid": request.user,
        }
        return Call(self.url, body)

    # -- errors --------------------------------------------------------------------------------------
    def _refusal(self, body: Mapping[str, Any], key: str | None, wait: float | None) -> ModelError | None:
        """The `ModelError` for a FastGPT error body (`{code, statusText, message}` or `{message}`),
        by its code and statusText, not the HTTP status; None if it is not one."""
        code = body.get("code") if isinstance(body.get("code"), int) else None
        status = body.get("statusText")
        message = str(body.get("message") or "")[:200]
        if code in AUTH_CODES or status in AUTH_CODES.values():
            self._keys.bench(key)
            why = f"FastGPT refused the API key ({code} {status})"
            return ModelError(why, "auth", len(self._keys) > 1)
        if "app key" in message.lower():  # "Key is error. You need to use the app key rather than the account key."
            self._keys.bench(key)
            why = "FastGPT refused an account key: use the app's own API key (fastgpt-…)"
            return ModelError(why, "auth", len(self._keys) > 1)
        if code == 429 or status == "tooManyRequest":
            self._keys.bench(key, wait)
            return ModelError("FastGPT is rate limiting (429)", "rate_limited", True, wait)
        if code == 510 or status == "insufficientQuota":
            return ModelError("FastGPT: the team is out of AI points (510)", "rate_limited")
        if message.startswith("messages is"):  # empty, or not an array
            return ModelError(f"FastGPT rejected the request: {message}", "bad_request")
        if message:
            return ModelError(f"FastGPT error: {message}", "server_error", True, wait)
        return None

    async def _refused(self, resp: aiohttp.ClientResponse, key: str | None) -> NoReturn:
        if resp.status == 404:  # FastGPT's own errors are 500 or 200: a 404 is a path it does not serve
            raise ModelError('FastGPT API not found (404): base_url must end in "/api/v1"', "bad_request")
        body = _object(await resp.read())
        error = None if body is None else self._refusal(body, key, retry_after(resp.headers))
        if error is not None:
            raise error
        await super()._refused(resp, key)  # not FastGPT's envelope (a proxy): the status says it

    def _refused_before_the_run(self, resp: aiohttp.ClientResponse, raw: bytes) -> ModelError:
        """A 200 that is no stream: FastGPT's `event: error` frame (a refusal before the workflow
        ran, §6.1), or the error envelope of older releases."""
        body = _object(raw)
        if body is None:
            frames = [e for e in SseParser().feed(raw + b"\n\n") if e.event == "error"]
            if not frames:
                return ModelError(UNREADABLE, "bad_response")
            body = _object(frames[0].data.encode()) or {"message": frames[0].data}
        return self._refusal(body, _sent_key(resp), retry_after(resp.headers)) or ModelError(UNREADABLE, "bad_response")

    def _stream_error(self, resp: aiohttp.ClientResponse, data: str) -> ModelError:
        """`event: error` inside the answer (§6.2): the run failed and FastGPT saved nothing. Not
        retried: the app ran (and may have acted, and spent points). One of FastGPT's known errors
        (a `code`: out of points, say) is classified as such."""
        body = _object(data.encode()) or {}
        error = self._refusal(body, _sent_key(resp), None) if "code" in body else None
        if error is not None and error.reason != "server_error":
            return error
        message = str(body.get("message") or data)[:200]
        return ModelError(f"FastGPT app failed: {message}", "server_error")

    # -- the answer ------------------------------------------------------------------------------------
    async def _read(self, resp: aiohttp.ClientResponse, completion: Completion) -> AsyncGenerator[Delta, None]:
        if resp.content_type != "text/event-stream":
            raw = await resp.read()
            body = _object(raw)
            if body is None or "choices" not in body:
                raise self._refused_before_the_run(resp, raw)
            for delta in _read_json(raw, completion):  # `stream = false`: one whole answer
                yield delta
            completion.usage = Usage()  # FastGPT's `usage` is a constant placeholder (§4.1)
            return
        done = False
        async for event in read_events(resp.content.iter_any()):
            if event.event == "error":
                raise self._stream_error(resp, event.data)
            data = event.data.strip()
            if event.event not in ANSWER_EVENTS or not data:
                continue  # node status, tool calls, interactive, ...: not the answer
            if data == "[DONE]":
                done = True
                break  # whatever follows (detail's flowResponses) is not the answer
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError as e:
                raise ModelError(MALFORMED, "bad_response") from e
            if not isinstance(chunk, dict):
                raise ModelError(MALFORMED, "bad_response")
            now = completion.last_byte_at = time.monotonic()
            for delta in _deltas(chunk):  # a keep-alive (content "") has none
                if completion.first_byte_at is None:
                    completion.first_byte_at = now
                yield delta
        if not done:
            if completion.first_byte_at is None:
                raise ModelError("FastGPT's stream ended before any answer", "bad_response", True)
            raise ModelError("FastGPT's stream ended mid-answer (no [DONE])", "connection", True)

    # -- doctor ----------------------------------------------------------------------------------------
    async def probe(self) -> str:
        """`{"messages": []}`: FastGPT checks the key, then finds the list empty and stops before
        the app runs (no chat saved, no points spent; §6.4)."""
        key = self._keys.pick()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        timeout = aiohttp.ClientTimeout(total=self.cfg.total_timeout, sock_connect=self.cfg.connect_timeout)
        payload = orjson.dumps({"messages": [], "stream": False})
        try:
            async with self._session.post(self.url, data=payload, headers=headers, timeout=timeout) as resp:
                body = _object(await resp.read())
                if body is not None and body.get("message") == EMPTY_MESSAGES:
                    return "accepted the key (an empty request: no chat run, no points spent)"
                if resp.status != 200:
                    await self._refused(resp, key)
                error = None if body is None else self._refusal(body, key, None)
                raise error or ModelError(f"{UNREADABLE} to an empty request: not a FastGPT chat app?", "bad_response")
        except TimeoutError as e:
            raise ModelError("FastGPT did not answer the probe in time", "timeout") from e
        except aiohttp.ClientError as e:
            raise ModelError(f"FastGPT unreachable: {type(e).__name__}", "connection", True) from e


def _question(request: BackendRequest) -> Message:
    """The new user message alone: the last of `messages` (its text is `request.text`; with
    `[model] vision` it also holds the images), else `request.text`."""
    last = request.messages[-1] if request.messages else {}
    if last.get("role") == "user":
        return {"role": "user", "content": last.get("content", request.text)}
    return {"role": "user", "content": request.text}


def _sent_key(resp: aiohttp.ClientResponse) -> str | None:
    """The API key the request of `resp` carried, to bench it: `_read` is not told the key of
    its attempt, but the request's `Authorization` header is kept with the response."""
    return resp.request_info.headers.get("Authorization", "").removeprefix("Bearer ") or None


def _object(raw: bytes) -> dict[str, Any] | None:
    """`raw` as a JSON object, or None."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
