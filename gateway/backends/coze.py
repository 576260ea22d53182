"""Coze (扣子) bots: `POST {base_url}/v3/chat`, streamed, on api.coze.cn or api.coze.com.

Coze keeps the conversation (`keeps_history`): each turn sends only the question, with
`?conversation_id=` from the previous answer's `conversation.chat.created` (docs/protocols/coze.md
§CZ.2, §CZ.7). `user_id` is the platform user key; the sender's display name and platform go in
`custom_variables` (`{{sender_name}}`, `{{platform}}` in the bot's prompt; Coze documents them for
exactly that, §CZ.2). Only `answer` messages are shown: their deltas, or a whole answer message
that came without any (§CZ.4); `reasoning_content` is the model's thinking. Several answers are
joined with a newline.

Errors come as Coze's JSON envelope `{"code", "msg", "detail": {"logid"}}`, even with HTTP 200 on a
streaming request, so the content type decides, then the code (§CZ.6); the logid is kept in every
error, Coze support asks for it. One chat at a time runs in a conversation (4016, §CZ.7): botgate's
per-conversation order serialises turns, a refusal is retried after a short backoff, and a chat this
backend abandoned before its end (a timeout, a dropped connection, the caller hanging up) is
cancelled so that it does not hold the conversation (cancel frees it at once, §CZ.8).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import quote

import aiohttp
import orjson

from ..config import ModelConfig
from ..errors import ModelError
from ..metrics import Metrics
from ..sse import read_events
from .base import BackendRequest, Completion, Delta, DeltaKind
from .http import Call, HttpBackend, retry_after

log = logging.getLogger(__name__)

# Envelope codes (docs/protocols/coze.md §CZ.6; those marked there UNVERIFIED are what the double uses).
AUTH_INVALID = 4100  # "authentication is invalid", e.g. the other site's token
TOKEN_INCORRECT = 4101
RATE_LIMITED = 4013  # UNVERIFIED
NOT_PUBLISHED = 4015  # UNVERIFIED
CHAT_IN_PROGRESS = 4016
CANNOT_CANCEL = 4104
INVALID_PARAM = 4000
STUDIO_CONVERSATION_NOT_FOUND = 103000002  # Coze Studio (§CZ.12)
CANCEL_TIMEOUT = 10.0  # seconds for a cancel of an abandoned chat
MALFORMED = "Coze sent malformed stream data"


@dataclass(slots=True)
class _Chat:
    """What one stream has shown so far."""

    conversation_id: str = ""
    chat_id: str = ""
    ended: bool = False  # chat.completed / failed / requires_action / done: nothing to cancel
    answers: list[str] = field(default_factory=list)  # ids of the answer messages shown, in order
    streamed: set[str] = field(default_factory=set)  # answer messages whose text came as deltas
    thought: set[str] = field(default_factory=set)  # messages whose reasoning came as deltas


class CozeBackend(HttpBackend):
    keeps_history = True

    def __init__(self, cfg: ModelConfig, session: aiohttp.ClientSession, metrics: Metrics) -> None:
        super().__init__(cfg, session, metrics)
        self.name = f"coze bot {cfg.bot_id}"
        self._base = cfg.base_url.rstrip("/")
        self._cancelling: set[asyncio.Task[None]] = set()  # cancels of abandoned chats, running

    # -- the chat ----------------------------------------------------------------------------------
    def _call(self, request: BackendRequest, key: str | None) -> Call:
        url = f"{self._base}/v3/chat"
        if request.session:
            url += f"?conversation_id={quote(request.session, safe='')}"
        body: dict[str, Any] = {
            "bot_id": self.cfg.bot_id,
            "user_id": request.user,
            "stream": True,
            "auto_save_history": True,  # Coze keeps the turn: it is the next turn's context
            "additional_messages": [
                {"role": "user", "type": "question", "content": request.text or "(image)", "content_type": "text"}
            ],
        }
        # Values of `{{name}}` variables in the bot's prompt (strings; names of letters and "_").
        variables = {"sender_name": request.sender_name, "platform": request.platform}
        if variables := {k: v for k, v in variables.items() if v}:
            body["custom_variables"] = variables
        return Call(url, body, {"Accept": "text/event-stream"})

    async def _read(self, resp: aiohttp.ClientResponse, completion: Completion) -> AsyncGenerator[Delta, None]:
        if "event-stream" not in resp.content_type:
            await self._refused(resp, _key_of(resp))  # the envelope, with HTTP 200 (§CZ.6)
        chat = _Chat()
        try:
            async for event in read_events(resp.content.iter_any()):
                completion.last_byte_at = time.monotonic()
                for delta in self._event(event.event, event.data, chat, completion):
                    if completion.first_byte_at is None:
                        completion.first_byte_at = time.monotonic()
                    yield delta
                if chat.ended:
                    return
            # The connection ended cleanly but before the chat did: the answer is incomplete (§CZ.5).
            raise ModelError("Coze stream ended before the chat completed", "connection", True)
        finally:
            if chat.chat_id and not chat.ended:
                self._cancel_later(chat.conversation_id, chat.chat_id)

    def _event(self, name: str, raw: str, chat: _Chat, completion: Completion) -> list[Delta]:
        """The deltas of one event; updates `chat` and `completion`; raises `ModelError` for a
        failure the stream reports."""
        if name == "done" or name.endswith(".stream.done"):  # Coze Studio ends with conversation.stream.done
            chat.ended = True
            return []
        data = _json(raw) if raw.strip() else {}
        if name == "conversation.chat.created":
            chat.conversation_id = str(data.get("conversation_id") or "")
            chat.chat_id = str(data.get("id") or "")
            # Always the id the stream returns, even when one was sent (§CZ.7).
            completion.session = chat.conversation_id or completion.session
            completion.task_id = chat.chat_id
            return []
        if name in ("conversation.message.delta", "conversation.message.completed"):
            return self._message(name.endswith(".delta"), data, chat)
        if name == "conversation.chat.completed":
            chat.ended = True
            _note_usage(data.get("usage"), completion)
            return []
        if name == "conversation.chat.failed":
            chat.ended = True  # Coze ended it: the conversation is free again
            error = data.get("last_error") if isinstance(data.get("last_error"), dict) else data
            raise ModelError(f"Coze chat failed: {_code_msg(error)}", "server_error")
        if name == "conversation.chat.requires_action":
            chat.ended = True  # such a chat cannot be cancelled (§CZ.8)
            raise ModelError(
                "Coze bot asked for a local plugin's result or a question node's reply "
                "(conversation.chat.requires_action), which botgate cannot give: remove local plugins and "
                "question nodes from the bot",
                "bad_request",
            )
        if name == "error":
            raise ModelError(f"Coze stream error: {_code_msg(data)}", "server_error")
        return []  # chat.in_progress, audio deltas, anything new

    def _message(self, delta: bool, data: dict[str, Any], chat: _Chat) -> list[Delta]:
        """An answer message's text and thinking; every other type (function_call, tool_response,
        knowledge, verbose, follow_up) is not for the user (§CZ.4)."""
        if data.get("type", "answer") != "answer" or data.get("content_type", "text") != "text":
            return []
        msg_id = str(data.get("id") or "")
        out: list[Delta] = []
        thought = data.get("reasoning_content")
        if isinstance(thought, str) and thought and (delta or msg_id not in chat.thought):
            out.append(Delta(DeltaKind.REASONING, thought))
            if delta:
                chat.thought.add(msg_id)
        text = data.get("content")
        # A completed answer repeats its deltas: it counts only for a message that had none.
        if isinstance(text, str) and text and (delta or msg_id not in chat.streamed):
            if msg_id not in chat.answers:
                if chat.answers:
                    out.append(Delta(DeltaKind.ANSWER, "\n"))  # a further answer message
                chat.answers.append(msg_id)
            out.append(Delta(DeltaKind.ANSWER, text))
            if delta:
                chat.streamed.add(msg_id)
        return out

    # -- refusals ----------------------------------------------------------------------------------
    async def _refused(self, resp: aiohttp.ClientResponse, key: str | None) -> NoReturn:
        raw = await resp.read()
        envelope = _envelope(raw)
        if envelope is None:
            if resp.status == 200:
                why = f"Coze answered a chat with {resp.content_type or 'no content type'}, not an event stream"
                raise ModelError(why, "bad_response")
            if resp.status == 404:
                why = f"Coze base_url {self._base} has no /v3/chat (404): it is the host only, https://api.coze.cn"
                raise ModelError(why, "bad_request")
            await super()._refused(resp, key)
        code, msg, logid = envelope
        logid = logid or resp.headers.get("x-tt-logid", "")
        conversation = "conversation_id" in resp.request_info.url.query
        raise self._error(code, msg, logid, key, retry_after(resp.headers), conversation=conversation)

    def _error(
        self, code: int, msg: str, logid: str, key: str | None, wait: float | None, *, conversation: bool = False
    ) -> ModelError:
        """The `ModelError` for an envelope's code (benching the key where the key is the cause)."""
        said = f"code {code} {msg!r}" + (f", logid {logid}" if logid else "")
        if code in (AUTH_INVALID, TOKEN_INCORRECT):
            self._keys.bench(key)
            hint = ""
            if code == AUTH_INVALID:
                hint = f": a token of the other site? api.coze.cn and .com have separate accounts ({self._base})"
            return ModelError(f"Coze refused the token ({said}){hint}", "auth", len(self._keys) > 1)
        if code == RATE_LIMITED:
            self._keys.bench(key, wait)
            return ModelError(f"Coze is rate limiting ({said})", "rate_limited", True, wait)
        if code == CHAT_IN_PROGRESS:
            why = f"another chat is still running in this Coze conversation ({said})"
            return ModelError(why, "conversation_busy", True)
        if conversation and (
            code == STUDIO_CONVERSATION_NOT_FOUND or (code == INVALID_PARAM and "conversation" in msg.lower())
        ):
            return ModelError(f"Coze does not know the conversation ({said})", "conversation_gone")
        if code == NOT_PUBLISHED:
            why = (
                f"Coze bot {self.cfg.bot_id} is not published to the API channel ({said}): publish it "
                f"with the API channel (发布 → API) on the site of base_url {self._base}"
            )
            return ModelError(why, "bad_request")
        if 5000 <= code < 6000:
            return ModelError(f"Coze server error ({said})", "server_error", True, wait)
        return ModelError(f"Coze rejected the request ({said})", "bad_request")

    # -- doctor, /stop -----------------------------------------------------------------------------
    async def probe(self) -> str:
        """Create an empty conversation for the bot: it proves the token (4100/4101 otherwise) and
        costs no tokens (§CZ.10). It does not prove that the bot is published to the API channel."""
        try:
            async with asyncio.timeout(self.cfg.total_timeout):
                await self._post("/v1/conversation/create", {"bot_id": self.cfg.bot_id}, self._keys.pick())
        except TimeoutError:
            raise ModelError("Coze did not answer within the total timeout", "timeout") from None
        return "accepted the token (created an empty conversation for the bot: no chat, no tokens spent)"

    async def stop(self, completion: Completion) -> None:
        """Cancel the chat `completion` tracks (its ids from chat.created). Cancel changes only the
        chat's status (§CZ.8): the caller still closes the stream. Best effort: a failure is logged."""
        if completion.session and completion.task_id:
            await self._cancel(completion.session, completion.task_id)

    async def _cancel(self, conversation_id: str, chat_id: str) -> None:
        body = {"conversation_id": conversation_id, "chat_id": chat_id}
        try:
            await self._post("/v3/chat/cancel", body, self._keys.pick(), quiet=(CANNOT_CANCEL,))
        except ModelError as e:
            log.warning("Coze chat not cancelled: %s", e, extra={"backend": self.name, "reason": e.reason})

    def _cancel_later(self, conversation_id: str, chat_id: str) -> None:
        """Cancel an abandoned chat in the background, so it does not hold its conversation (4016)."""

        async def cancel() -> None:
            try:
                async with asyncio.timeout(CANCEL_TIMEOUT):
                    await self._cancel(conversation_id, chat_id)
            except Exception as e:  # no answer in time, the HTTP session closed at shutdown
                log.warning("Coze chat not cancelled: %s", type(e).__name__, extra={"backend": self.name})

        try:
            task = asyncio.get_running_loop().create_task(cancel())
        except RuntimeError:  # no loop (a generator collected after it stopped): nothing to do
            return
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    async def _post(
        self, path: str, body: Mapping[str, Any], key: str | None, quiet: tuple[int, ...] = ()
    ) -> Any:
        """A non-streamed call: its envelope's `data`, or the `ModelError` for its code (codes in
        `quiet` return None)."""
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.first_token_timeout
        )
        try:
            async with self._session.post(
                self._base + path, data=orjson.dumps(body), headers=headers, timeout=timeout
            ) as resp:
                raw = await resp.read()
                envelope = _envelope(raw)
                if envelope is None:
                    if resp.status != 200:
                        await super()._refused(resp, key)
                    raise ModelError(f"Coze sent an unreadable answer to {path}", "bad_response")
                code, msg, logid = envelope
                if code == 0:
                    return orjson.loads(raw).get("data")
                if code in quiet:
                    return None
                logid = logid or resp.headers.get("x-tt-logid", "")
                raise self._error(code, msg, logid, key, retry_after(resp.headers))
        except aiohttp.ConnectionTimeoutError as e:
            raise ModelError("Coze did not accept the connection", "connection", True) from e
        except TimeoutError as e:
            raise ModelError(f"Coze sent nothing to {path} within first_token_timeout", "first_token_timeout") from e
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise ModelError(f"Coze unreachable: {type(e).__name__}", "connection", True) from e


def _key_of(resp: aiohttp.ClientResponse) -> str | None:
    """The API key a request was sent with (to bench it), from its Authorization header."""
    scheme, _, key = resp.request_info.headers.get("Authorization", "").partition(" ")
    return key if scheme == "Bearer" and key else None


def _json(raw: str) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ModelError(MALFORMED, "bad_response") from e
    if not isinstance(data, dict):
        raise ModelError(MALFORMED, "bad_response")
    return data


def _envelope(raw: bytes) -> tuple[int, str, str] | None:
    """(code, msg, logid) of Coze's JSON envelope; None for anything else."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(code := data.get("code"), int) or isinstance(code, bool):
        return None
    detail = data.get("detail")
    logid = detail.get("logid") if isinstance(detail, dict) else None
    return code, str(data.get("msg") or "")[:300], str(logid or "")


def _code_msg(error: Any) -> str:
    """A `{code, msg}` (a Chat's last_error, an error event) for a log line."""
    if not isinstance(error, dict) or ("code" not in error and "msg" not in error):
        return "no detail"
    return f"code {error.get('code')} {str(error.get('msg') or '')[:300]!r}"


def _note_usage(usage: Any, completion: Completion) -> None:
    """Chat usage: `input_count`/`output_count`, or the doc's `input_tokens`/`output_tokens` (§CZ.4)."""
    if not isinstance(usage, dict):
        return
    for ours, names in (("prompt_tokens", ("input_count", "input_tokens")),
                        ("completion_tokens", ("output_count", "output_tokens"))):
        for name in names:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(completion.usage, ours, value)
                break
