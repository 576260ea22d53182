"""A FastGPT app behind `POST /api/v1/chat/completions`, as the wire shows it (docs/protocols/fastgpt.md).

What it reproduces (§ numbers are docs/protocols/fastgpt.md):
  * app-key auth (§2): `Authorization: Bearer <key>`; a key in `api_keys` is an app key, one in
    `account_keys` a valid key without an app ("use the app key" error), anything else FastGPT's
    `unAuthApiKey` (code 514), a missing or malformed header `unAuthorization` (code 403). Errors are
    HTTP 500 + `{code, statusText, message, data}` without streaming, and HTTP 200 + one
    `event: error` frame (and no event-stream content type) with `stream: true` (§6);
  * the order of checks (§6.4): `messages` not a list, then auth, then `messages` empty, so
    `{"messages": []}` is an inert probe of URL and key, what a doctor check can send;
  * `chatId` (§3): absent or `""`: the context is the `messages` sent; non-empty: the history kept
    here for that chatId plus only the *last* message, the others ignored; the history and the
    merged `variables` (request over stored) are saved when the workflow ends, before the stop chunk;
  * `detail=false` streams (§4.2): `data:` chunks only, a stop chunk, `data: [DONE]`;
    `detail=true` (§4.3): `event: flowNodeStatus` per node, `event: answer` chunks, the stop chunk,
    `event: answer` + `data: [DONE]`, then `event: flowResponses` **after** `[DONE]`;
  * reasoning (§4.4): `reasoning_content` deltas (without a `content` key) before the answer;
  * the non-streaming JSON (§4.1): fake `usage`, `id` = the chatId or "", `error` only when the
    last node failed (HTTP 200), `responseData` / `newVariables` with `detail`.

Behaviour per request comes from `script` (one entry per request, then normal answers):
  an int          answer that HTTP status with FastGPT's error envelope (a proxy or outage in front)
  "error-before"  fail before the workflow starts (stream: HTTP 200 + `event: error` only)
  "error-event"   stream the first piece, then `event: error` `{"message": …}` and end (§6.2);
                  without streaming, HTTP 500 with the envelope; nothing is saved
  "node-error"    the last node fails: no answer text, the stream ends normally (an *empty* answer
                  with detail=false), `flowResponses[-1].error`; JSON: HTTP 200 with `error` set
  "interactive"   a user-select node stops the run: `event: interactive` (detail only), then the
                  normal ending; the next request on that chatId is marked `resumed`
  "reasoning"     stream `thought` as `reasoning_content` deltas before the answer (every answer
                  does with `reasoning` set)
  "think"         the model's inline `<think>\n{thought}\n</think>\n\n` in `content`, tags split
                  across deltas (FastGPT forwards what the model wrote)
  "think-unopened" `{thought}\n</think>\n\n` before the answer: the closing tag only
  "keepalive"     one empty-content `answer` chunk first, the frame FastGPT writes every 10 s
  "drop"          stream the first piece, then close the connection
  "stall"         stream the first piece, then nothing until `release()` (`wait_stalled()` tells
                  when it is there), then finish normally
  "truncated"     stream the first piece, then end the response cleanly without stop chunk or [DONE]
With `hold` set every request waits for `release()` first. The answer is `answer` (a string, or a
function of the `Turn`), else "echo: <question>"; streams split it into pieces (an ASCII word, or one
other character, with its leading whitespace). With `split_utf8` (the default) every frame holding a
multi-byte character is written in two pieces cut inside that character, as TCP may deliver it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

PATH = "/api/v1/chat/completions"
KEY = "fastgpt-doubleappkey"  # the app key accepted by default

# ERROR_RESPONSE entries of FastGPT (packages/global/common/error/errorCode.ts), §6.1
UN_AUTHORIZATION: dict[str, Any] = {"code": 403, "statusText": "unAuthorization", "message": "凭证错误", "data": None}
UN_AUTH_API_KEY: dict[str, Any] = {"code": 514, "statusText": "unAuthApiKey", "message": "Api Key 不合法", "data": None}
ACCOUNT_KEY_ERROR = "Key is error. You need to use the app key rather than the account key."

SSE_HEADERS = {  # what FastGPT sets once the workflow starts, §4
    "Content-Type": "text/event-stream;charset=utf-8",
    "Access-Control-Allow-Origin": "*",
    "X-Accel-Buffering": "no",
    "Cache-Control": "no-cache, no-transform",
    "Connection": "keep-alive",
}
USER_SELECT: dict[str, Any] = {
    "interactive": {
        "type": "userSelect",
        "params": {
            "description": "confirm?",
            "userSelectOptions": [{"value": "Confirm", "key": "option1"}, {"value": "Cancel", "key": "option2"}],
        },
    }
}
_PIECE = re.compile(r"\s*(?:[!-~]+|\S)|\s+")


def pieces(text: str) -> list[str]:
    """Split an answer into stream deltas: an ASCII word or one other character, with the whitespace
    before it (lossless: the pieces join to `text`)."""
    return _PIECE.findall(text)


def _split_inside_char(data: bytes) -> int:
    """An offset inside the first multi-byte UTF-8 character of `data`, or 0 if it has none."""
    for i, byte in enumerate(data):
        if byte >= 0xC0:  # a lead byte: cut after it, before its continuation bytes
            return i + 1
    return 0


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
    """One chunk as FastGPT's `textAdaptGptResponse` writes it (§4.1): empty id/object/model."""
    body = {
        "id": "",
        "object": "",
        "created": 0,
        "model": "",
        "choices": [{"delta": delta, "index": 0, "finish_reason": finish_reason}],
    }
    return orjson.dumps(body).decode()


def text_of(content: Any) -> str:
    """The text of an OpenAI message content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


@dataclass
class Turn:
    """One request as the app sees it."""

    chat_id: str | None  # None: no chatId sent; "": a new chat
    question: str  # the last message's text
    history: list[dict[str, str]]  # the context before the question ({"role", "content"})
    variables: dict[str, Any]  # stored for the chat, overridden by the request's
    custom_uid: str | None
    stream: bool
    detail: bool
    body: dict[str, Any]
    ignored: int = 0  # messages sent but ignored because a chatId was given
    resumed: bool = False  # continues an interactive node of this chat
    answer: str = ""  # the content sent so far
    outcome: str = "running"  # completed | error | dropped | truncated | client-gone


@dataclass
class FastGPTDouble:
    answer: str | Callable[[Turn], str] | None = None
    thought: str = "The user greeted me, so I greet back."  # for reasoning / think behaviours
    reasoning: bool = False  # every answer streams `thought` as reasoning_content first
    script: list[int | str] = field(default_factory=list)
    api_keys: set[str] = field(default_factory=lambda: {KEY})
    account_keys: set[str] = field(default_factory=set)
    nodes: list[tuple[str, str]] = field(
        default_factory=lambda: [("知识库搜索", "datasetSearchNode"), ("AI 对话", "chatNode")]
    )  # (name, moduleType); the last one answers
    error_message: str = "scripted failure"
    hold: bool = False
    split_utf8: bool = True
    # recorded
    requests: list[dict[str, Any]] = field(default_factory=list)  # every parsed body
    auth_headers: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)  # requests that reached the workflow
    chats: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # server-side history
    chat_variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    completed: int = 0  # responses written to the end (stream: through flowResponses)
    stalled: int = 0  # streams that reached a "stall"
    split_frames: int = 0  # frames written in two pieces inside a character
    received: asyncio.Event = field(default_factory=asyncio.Event)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _interactive: set[str] = field(default_factory=set)  # chatIds stopped at an interactive node

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(PATH, self.completions)
        return app

    def release(self) -> None:
        """Let held and stalled requests go on."""
        self._released.set()

    async def wait_requests(self, count: int) -> None:
        """Wait until `count` requests have arrived in total."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= count)

    async def wait_completed(self, count: int) -> None:
        """Wait until `count` responses have been written to the end."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.completed >= count)

    async def wait_stalled(self, count: int = 1) -> None:
        """Wait until `count` streams sit in a "stall"."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.stalled >= count)

    def history(self, chat_id: str) -> list[dict[str, str]]:
        return list(self.chats.get(chat_id, []))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- auth, errors ------------------------------------------------------------------------------

    def authenticate(self, header: str) -> dict[str, Any] | str | None:
        """None if the key may chat with the app, else FastGPT's error (an entry or a message).

        Like FastGPT: the token is the second space-separated word; it has 2 dash-separated parts
        (`fastgpt-<id>`) or 3 (the abandoned `fastgpt-<id>-<appId>`), anything else is refused."""
        words = header.split(" ")
        token = words[1] if len(words) > 1 else ""
        if not token:
            return UN_AUTHORIZATION
        parts = token.split("-")
        if len(parts) == 3:
            key, app_id = f"{parts[0]}-{parts[1]}", parts[2]
        elif len(parts) == 2:
            key, app_id = token, ""
        else:
            return UN_AUTHORIZATION
        key = key.strip()
        if key in self.api_keys:
            return None
        if key in self.account_keys:
            return None if app_id else ACCOUNT_KEY_ERROR
        return UN_AUTH_API_KEY

    @staticmethod
    def envelope(error: dict[str, Any] | str, code: int = 500) -> dict[str, Any]:
        """FastGPT's `jsonRes` error body: a known entry as is, a message with the given code."""
        if isinstance(error, dict):
            return dict(error)
        return {"code": code, "statusText": "error", "message": error, "data": None}

    @staticmethod
    def _json(body: Any, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", charset="utf-8")

    async def _fail(self, request: web.Request, stream: bool, error: dict[str, Any] | str) -> web.StreamResponse:
        """The handler's catch: `sseErrRes` with streaming (HTTP 200, headers never set), else 500."""
        if not stream:
            return self._json(self.envelope(error), status=500)
        resp = web.StreamResponse()  # FastGPT sets no Content-Type here (aiohttp adds octet-stream)
        await resp.prepare(request)
        data = dict(error) if isinstance(error, dict) else {"message": error}
        await self._send(resp, "error", orjson.dumps(data).decode())
        await self._finish(resp)
        return resp

    # -- the request -------------------------------------------------------------------------------

    def _turn(self, body: dict[str, Any], messages: list[Any]) -> Turn:
        chat_id = body.get("chatId")
        chat_id = chat_id if isinstance(chat_id, str) else None
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        question = text_of(last.get("content"))
        if chat_id:
            history = self.history(chat_id)
            ignored = len(messages) - 1
        else:
            history = [
                {"role": str(m.get("role", "")), "content": text_of(m.get("content"))}
                for m in messages[:-1]
                if isinstance(m, dict)
            ]
            ignored = 0
        sent = body.get("variables")
        variables = {
            **(self.chat_variables.get(chat_id, {}) if chat_id else {}),
            **(sent if isinstance(sent, dict) else {}),
        }
        uid = body.get("customUid")
        return Turn(
            chat_id=chat_id,
            question=question,
            history=history,
            variables=variables,
            custom_uid=uid if isinstance(uid, str) else None,
            stream=bool(body.get("stream", False)),
            detail=bool(body.get("detail", False)),
            body=body,
            ignored=ignored,
            resumed=bool(chat_id) and chat_id in self._interactive,
        )

    def reply_text(self, turn: Turn) -> str:
        if callable(self.answer):
            return self.answer(turn)
        if self.answer is not None:
            return self.answer
        return f"echo: {turn.question}"

    def _thought(self, step: int | str) -> str:
        """The reasoning_content this answer carries ("" for none)."""
        return self.thought if self.reasoning or step == "reasoning" else ""

    def _deltas(self, step: int | str, text: str) -> list[str]:
        """The content deltas: the answer, with the model's inline thinking in front if scripted."""
        if step == "think":
            return ["<th", "ink>\n", *pieces(self.thought), "\n</th", "ink>\n\n", *pieces(text)]
        if step == "think-unopened":
            return [*pieces(self.thought), "\n</think>\n\n", *pieces(text)]
        return pieces(text)

    def _save(self, turn: Turn, answer: str, interactive: bool) -> None:
        """What saveChat keeps for a chatId: the two messages and the merged variables."""
        if not turn.chat_id:
            return  # FastGPT saves it under a fresh id the client never learns
        self.chats.setdefault(turn.chat_id, []).extend(
            [{"role": "user", "content": turn.question}, {"role": "assistant", "content": answer}]
        )
        self.chat_variables[turn.chat_id] = dict(turn.variables)
        if interactive:
            self._interactive.add(turn.chat_id)
        else:
            self._interactive.discard(turn.chat_id)

    def flow_responses(self, turn: Turn, answer: str, thought: str, error: str | None) -> list[dict[str, Any]]:
        """Per-node records (`responseData` / `flowResponses`); the only real token counts, §4.1."""
        records: list[dict[str, Any]] = []
        for index, (name, module_type) in enumerate(self.nodes):
            record: dict[str, Any] = {"moduleName": name, "moduleType": module_type, "runningTime": 0.01}
            if index == len(self.nodes) - 1:
                inputs = sum(len(pieces(m["content"])) for m in turn.history) + len(pieces(turn.question))
                outputs = len(pieces(answer)) + len(pieces(thought))
                record.update(
                    model="double-model",
                    tokens=inputs + outputs,
                    inputTokens=inputs,
                    outputTokens=outputs,
                    query=turn.question,
                    reasoningText=thought,
                    historyPreview=[
                        {"obj": "Human" if m["role"] == "user" else "AI", "value": m["content"]}
                        for m in [*turn.history, {"role": "user", "content": turn.question}]
                    ],
                    contextTotalLen=len(turn.history) + 2,
                )
                if error is not None:
                    record["error"] = error
            records.append(record)
        return records

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            parsed = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            parsed = {}
        body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
        self.requests.append(body)
        self.auth_headers.append(request.headers.get("Authorization", ""))
        self.received.set()
        await self._notify()
        step: int | str = self.script.pop(0) if self.script else ""
        stream = bool(body.get("stream", False))
        if isinstance(step, int) and step != 200:
            return self._json(self.envelope(self.error_message, code=step), status=step)
        messages = body.get("messages", [])
        if not isinstance(messages, list):
            return await self._fail(request, stream, "messages is not array")
        refusal = self.authenticate(request.headers.get("Authorization", ""))
        if refusal is not None:
            return await self._fail(request, stream, refusal)
        if not messages:
            return await self._fail(request, stream, "messages is empty")
        if step == "error-before":
            return await self._fail(request, stream, self.error_message)
        if self.hold:
            await self._released.wait()
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)  # the client gave up; nobody reads this
        turn = self._turn(body, messages)
        self.turns.append(turn)
        if stream:
            return await self._stream(request, turn, step)
        return await self._answer_json(request, turn, step)

    async def _answer_json(self, request: web.Request, turn: Turn, step: int | str) -> web.StreamResponse:
        if step == "drop":
            assert request.transport is not None
            turn.outcome = "dropped"
            request.transport.close()
            return web.Response(status=499)
        if step == "stall":
            self.stalled += 1
            await self._notify()
            await self._released.wait()
        if step == "error-event":
            turn.outcome = "error"
            return self._json(self.envelope(self.error_message), status=500)
        text = "" if step in ("node-error", "interactive") else "".join(self._deltas(step, self.reply_text(turn)))
        error = self.error_message if step == "node-error" else None
        turn.answer, turn.outcome = text, "completed" if error is None else "error"
        content: Any = text
        if step == "interactive" and turn.detail:
            content = [{"type": "interactive", "interactive": USER_SELECT["interactive"]}]
        self._save(turn, text, interactive=step == "interactive")
        thought = self._thought(step)
        body: dict[str, Any] = {}
        if turn.detail:
            body["responseData"] = self.flow_responses(turn, text, thought, error)
            body["newVariables"] = turn.variables
        if error is not None:
            body["error"] = error  # JSON.stringify drops an undefined error: no key on success
        body.update(
            id=turn.chat_id or "",
            model="",
            usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 1},
            choices=[{"message": {"role": "assistant", "content": content}, "finish_reason": "stop", "index": 0}],
        )
        response = self._json(body)
        self.completed += 1
        await self._notify()
        return response

    async def _send(self, resp: web.StreamResponse, event: str | None, data: str) -> bool:
        """Write one frame the way FastGPT's `responseWrite` does; False if the client is gone."""
        frame = ((f"event: {event}\n" if event else "") + f"data: {data}\n\n").encode()
        cut = _split_inside_char(frame) if self.split_utf8 else 0
        try:
            if cut:
                await resp.write(frame[:cut])  # two writes: the character straddles them
                await resp.write(frame[cut:])
                self.split_frames += 1
            else:
                await resp.write(frame)
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def _finish(self, resp: web.StreamResponse) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()

    async def _stream(self, request: web.Request, turn: Turn, step: int | str) -> web.StreamResponse:
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        answer_event = "answer" if turn.detail else None  # detail=false: no event lines at all

        async def content(piece: str) -> bool:
            turn.answer += piece
            return await self._send(resp, answer_event, chunk({"role": "assistant", "content": piece}))

        if turn.detail:
            for name, _ in self.nodes:
                await self._send(resp, "flowNodeStatus", orjson.dumps({"status": "running", "name": name}).decode())
        if step == "keepalive":
            await self._send(resp, answer_event, chunk({"role": "assistant", "content": ""}))
        thought = self._thought(step)
        for piece in pieces(thought):
            await self._send(resp, answer_event, chunk({"role": "assistant", "reasoning_content": piece}))
        text = "" if step in ("node-error", "interactive") else self.reply_text(turn)
        deltas = self._deltas(step, text)
        for piece in deltas[:1]:
            await content(piece)
        if step == "drop":
            assert request.transport is not None
            turn.outcome = "dropped"
            request.transport.close()
            return resp
        if step in ("error-event", "truncated"):
            if step == "error-event":
                await self._send(resp, "error", orjson.dumps({"message": self.error_message}).decode())
            turn.outcome = "error" if step == "error-event" else "truncated"
            await self._finish(resp)
            return resp
        if step == "stall":
            self.stalled += 1
            await self._notify()
            await self._released.wait()
        for piece in deltas[1:]:
            if not await content(piece):
                turn.outcome = "client-gone"
                return resp
        if step == "interactive" and turn.detail:
            await self._send(resp, "interactive", orjson.dumps(USER_SELECT).decode())
        self._save(turn, turn.answer, interactive=step == "interactive")  # saveChat runs before the ending
        error = self.error_message if step == "node-error" else None
        turn.outcome = "completed" if error is None else "error"
        await self._send(resp, answer_event, chunk({"role": "assistant", "content": None}, "stop"))
        await self._send(resp, answer_event, "[DONE]")
        if turn.detail:  # after [DONE]: a reader that stops there never sees it
            records = self.flow_responses(turn, turn.answer, thought, error)
            await self._send(resp, "flowResponses", orjson.dumps(records).decode())
        await self._finish(resp)
        self.completed += 1
        await self._notify()
        return resp
