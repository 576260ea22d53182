"""A Coze (扣子) Open API server: `/v3/chat` streamed the way Coze frames it, conversations, cancel, errors.

The wire facts it reproduces, with their sources, are in docs/protocols/coze.md (cited as §CZ.n).
One double is one region (api.coze.cn or api.coze.com): a token of the other region is refused with
4100, an unknown token with 4101, both as Coze's JSON envelope `{"code", "msg", "detail": {"logid"}}`.

Endpoints: `POST /v3/chat` (streaming and not), `POST /v3/chat/cancel`, `GET|POST /v3/chat/retrieve`,
`GET|POST /v3/chat/message/list`, and `POST /v1/conversation/create` (the cheap call `doctor` can make).

A streamed chat is `event:<name>\\ndata:<json>\\n\\n` with no space after either colon (§CZ.3):
chat.created → chat.in_progress → [function_call, tool_response] → message.delta×N (reasoning first,
if `reasoning` is set) → message.completed (answer) → [more answers] → message.completed (verbose
generate_answer_finish) → [follow_up×k] → chat.completed (usage) → `event:done` / `data:"[DONE]"`.
The answer is "echo: <last user text>" (or `answer`, or exactly `deltas` joined); with `recall`,
" [after: <the conversation's previous question>]" is added, so context is visible in the answer.

Behaviour per `/v3/chat` request comes from `script` (one entry per request, then normal chats), or
from a question starting "script:<entry>":
  an int >= 1000   Coze's JSON envelope with that code, HTTP 200 (e.g. 5000, 4000, 4013)
  an int < 1000    that bare HTTP status with a non-Coze body (an edge proxy's 502, 429 ...)
  "rate-limit"     the envelope with RATE_LIMIT_CODE (UNVERIFIED code), `retry_after` if set
  "stall"          stream up to the first answer delta, then wait for `release()`
  "drop"           stream up to the first answer delta, then close the connection
  "failed"         chat.created, in_progress, chat.failed {last_error 5000 "event interval error"}, EOF
  "failed-bare"    the same with the doc's schematic chat.failed data `{"code":701231,"msg":"error"}`
  "error"          up to the first delta, then `event:error` `{"code":5000,"msg":...}`, EOF
  "error-empty"    only `event:error` / `data:{}` (cozepy's fixture), EOF
  "requires-action" a function_call, then chat.requires_action with a tool call, then done
With `hold`, every streamed chat waits for `release()` after chat.in_progress (a slow bot the test
controls). A chat is "running" from its acceptance until its terminal event or a cancel; a second chat
on that conversation meanwhile gets 4016. Cancel switches the chat to `canceled`, frees the
conversation and keeps the turn out of the history; like Coze it does not cut the stream, which goes
on to its end once released (the client is expected to hang up: `client_closed` is set when a write
after the hang-up fails, so it is best effort, not a thing to assert right after a hang-up).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

BOT_ID = "7379462189365198898"
TOKEN = "pat_double_token"

OK = 0
INVALID_PARAM = 4000  # §CZ.6
NOT_PUBLISHED = 4015  # UNVERIFIED code ("commonly 4015")
CHAT_IN_PROGRESS = 4016  # §CZ.7
AUTH_INVALID = 4100  # wrong region's token
TOKEN_INCORRECT = 4101
CANNOT_CANCEL = 4104
RATE_LIMIT_CODE = 4013  # UNVERIFIED
SERVER_ERROR = 5000

MSG_SERVER_ERROR = (
    "We're currently experiencing server issues. Please try your request again after a short delay. "
    "If the problem persists, contact our support team."
)
MSG = {
    AUTH_INVALID: "authentication is invalid",
    TOKEN_INCORRECT: "The token you entered is incorrect. Please double-check and try again.",
    NOT_PUBLISHED: "The bot is not currently published to the corresponding platform: Agent As API.",
    CHAT_IN_PROGRESS: "Another chat is in progress in this conversation; wait for it to end or cancel it.",
    CANNOT_CANCEL: "The current chat can't be canceled.",
    RATE_LIMIT_CODE: "Request frequency exceeds the limit. Please try again later.",
    SERVER_ERROR: MSG_SERVER_ERROR,
}
VERBOSE_FINISH = '{"msg_type":"generate_answer_finish","data":"","from_module":null,"from_unit":null}'
RUNNING = ("created", "in_progress")


@dataclass
class Recorded:
    """One request as the double received it."""

    path: str
    query: dict[str, str]
    body: dict[str, Any]
    authorization: str


@dataclass
class Conversation:
    id: str
    bot_id: str
    created_at: int
    section_id: str
    name: str = ""
    meta_data: dict[str, str] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)  # the saved history, oldest first
    running: str | None = None  # the chat in progress (4016 for another)


@dataclass
class Chat:
    id: str
    conversation_id: str
    bot_id: str
    user_id: str
    question: str
    inputs: list[dict[str, Any]]  # additional_messages as sent
    save: bool  # auto_save_history
    created_at: int
    meta_data: dict[str, str] = field(default_factory=dict)
    status: str = "created"
    answer: str = ""  # the first answer message's full text
    outputs: list[dict[str, Any]] = field(default_factory=list)  # completed messages, as message/list shows
    events: list[tuple[str, Any]] = field(default_factory=list)  # every event the stream carried
    usage: dict[str, int] = field(default_factory=lambda: {"token_count": 0, "output_count": 0, "input_count": 0})
    completed_at: int | None = None
    failed_at: int | None = None
    last_error: dict[str, Any] = field(default_factory=lambda: {"code": 0, "msg": ""})
    paused: bool = False  # waiting for release() now
    was_paused: bool = False  # has reached its pause point (hold, "stall")
    client_closed: bool = False  # a write failed: the client had hung up (seen only at a later write)
    finished: bool = False  # the handler is done with this chat
    gate: asyncio.Event = field(default_factory=asyncio.Event)


class _Dropped(Exception):
    """The script closed the connection mid-stream."""


@dataclass
class CozeDouble:
    tokens: set[str] = field(default_factory=lambda: {TOKEN})
    other_region_tokens: set[str] = field(default_factory=set)  # valid on the other site: 4100 here
    bots: set[str] = field(default_factory=lambda: {BOT_ID})  # published to the API channel
    answer: str | None = None
    deltas: list[str] | None = None  # the exact answer deltas (wins over `answer`)
    reasoning: str | None = None  # streamed as reasoning_content deltas before the answer
    extra_answers: list[str] = field(default_factory=list)  # more answer messages after the first
    follow_ups: list[str] = field(default_factory=list)  # suggested questions after the verbose message
    tool_calls: bool = False  # function_call and tool_response messages before the answer
    recall: bool = False  # append " [after: <previous question>]" to the echo
    fragment: bool = False  # write each event in two pieces, cutting inside a UTF-8 character if any
    script: list[int | str] = field(default_factory=list)
    hold: bool = False
    retry_after: str | None = None  # a Retry-After header on "rate-limit" (Coze documents none)
    auth_status: int = 401  # HTTP status with 4100/4101 (UNVERIFIED)
    unknown_conversation: tuple[int, str] = (INVALID_PARAM, "conversation not found")  # UNVERIFIED
    requests: list[Recorded] = field(default_factory=list)  # POST /v3/chat
    cancels: list[Recorded] = field(default_factory=list)  # POST /v3/chat/cancel
    calls: list[Recorded] = field(default_factory=list)  # every request, any endpoint
    chats: dict[str, Chat] = field(default_factory=dict)
    conversations: dict[str, Conversation] = field(default_factory=dict)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(7_400_000_000_000_000_001))
    _logids: itertools.count[int] = field(default_factory=lambda: itertools.count(0x1A7))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v3/chat", self.chat)
        app.router.add_post("/v3/chat/cancel", self.cancel)
        app.router.add_route("*", "/v3/chat/retrieve", self.retrieve)
        app.router.add_route("*", "/v3/chat/message/list", self.message_list)
        app.router.add_post("/v1/conversation/create", self.create_conversation)
        return app

    # ---- what a test uses -------------------------------------------------------------------

    def release(self, chat_id: str | None = None) -> None:
        """Let paused chats (hold, "stall") go on: one chat, or every chat accepted so far."""
        for chat in self.chats.values():
            if chat_id is None or chat.id == chat_id:
                chat.gate.set()

    def history(self, conversation_id: str) -> list[dict[str, Any]]:
        """The conversation's saved messages (what Coze would give the bot as context)."""
        return self.conversations[conversation_id].messages

    def new_id(self) -> str:
        """A 19-digit numeric id, as Coze's chat, conversation and message ids are."""
        return str(next(self._ids))

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def wait_requests(self, count: int) -> None:
        """Until `count` /v3/chat requests have arrived in total."""
        await self.wait_for(lambda: len(self.requests) >= count)

    async def wait_paused(self, count: int = 1) -> Chat:
        """Until `count` chats have reached their pause point (hold, "stall"); the count-th of them."""
        await self.wait_for(lambda: len(self._paused()) >= count)
        return self._paused()[count - 1]

    def _paused(self) -> list[Chat]:
        return [c for c in self.chats.values() if c.was_paused]

    async def wait_cancels(self, count: int) -> None:
        await self.wait_for(lambda: len(self.cancels) >= count)

    async def wait_finished(self, count: int) -> None:
        """Until the handlers of `count` accepted chats are done (stream ended or dropped)."""
        await self.wait_for(lambda: sum(c.finished for c in self.chats.values()) >= count)

    # ---- wire helpers -----------------------------------------------------------------------

    def _logid(self) -> str:
        return time.strftime("%Y%m%d%H%M%S") + f"{next(self._logids):020X}"

    def _json(self, body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        logid = self._logid()
        body.setdefault("detail", {"logid": logid})
        return web.Response(
            body=orjson.dumps(body),
            status=status,
            content_type="application/json",
            headers={"x-tt-logid": logid, **(headers or {})},
        )

    def _error(
        self, code: int, msg: str | None = None, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        return self._json({"code": code, "msg": msg if msg is not None else MSG.get(code, "error")}, status, headers)

    def _ok(self, data: Any) -> web.Response:
        return self._json({"code": OK, "msg": "", "data": data})

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _record(self, request: web.Request, into: list[Recorded] | None) -> Recorded | web.Response:
        """Record the request; its body as JSON, or Coze's 4000 for a body that is not a JSON object."""
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            body = None
        rec = Recorded(request.path, dict(request.query), body if isinstance(body, dict) else {},
                       request.headers.get("Authorization", ""))
        self.calls.append(rec)
        if into is not None:
            into.append(rec)
        await self._notify()
        if not isinstance(body, dict):
            return self._error(INVALID_PARAM, "invalid request body: not a JSON object")
        return rec

    def _refused(self, rec: Recorded) -> web.Response | None:
        scheme, _, token = rec.authorization.partition(" ")
        if scheme != "Bearer" or not token or token in self.other_region_tokens:
            return self._error(AUTH_INVALID, status=self.auth_status)
        if token not in self.tokens:
            return self._error(TOKEN_INCORRECT, status=self.auth_status)
        return None

    def _chat_object(self, chat: Chat, status: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": chat.id,
            "conversation_id": chat.conversation_id,
            "bot_id": chat.bot_id,
            "created_at": chat.created_at,
            "last_error": chat.last_error,
            "status": status or chat.status,
            "usage": dict(chat.usage),
        }
        if chat.completed_at is not None:
            obj["completed_at"] = chat.completed_at
        if chat.failed_at is not None:
            obj["failed_at"] = chat.failed_at
        if chat.meta_data:
            obj["meta_data"] = chat.meta_data
        return obj

    def _message(self, chat: Chat, msg_id: str, kind: str, content: str, **extra: Any) -> dict[str, Any]:
        return {
            "id": msg_id,
            "conversation_id": chat.conversation_id,
            "bot_id": chat.bot_id,
            "role": "assistant",
            "type": kind,
            "content": content,
            "content_type": "text",
            "chat_id": chat.id,
            **extra,
        }

    def reply_text(self, chat: Chat) -> str:
        if self.deltas is not None:
            return "".join(self.deltas)
        text = self.answer if self.answer is not None else f"echo: {chat.question}"
        if self.recall:
            earlier = [m for m in self.conversations[chat.conversation_id].messages if m.get("role") == "user"]
            if earlier:
                text += f" [after: {_text_of(earlier[-1])}]"
        return text

    # ---- POST /v3/chat ----------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        rec = await self._record(request, self.requests)
        self.received.set()
        step: int | str = self.script.pop(0) if self.script else ""
        if isinstance(rec, web.Response):
            return rec
        if (refused := self._refused(rec)) is not None:
            return refused
        body = rec.body
        for name in ("bot_id", "user_id"):
            if not isinstance(body.get(name), str) or not body[name]:
                return self._error(INVALID_PARAM, f"invalid param: {name} is required")
        if body["bot_id"] not in self.bots:
            return self._error(NOT_PUBLISHED)
        messages = body.get("additional_messages") or []
        if not isinstance(messages, list) or len(messages) > 100:
            return self._error(INVALID_PARAM, "invalid param: additional_messages")
        messages = [m for m in messages if isinstance(m, dict)]
        question = next((_text_of(m) for m in reversed(messages) if m.get("role") == "user"), "")
        if question.startswith("script:"):
            word = question.split()[0].removeprefix("script:")
            step = int(word) if word.isdigit() else word
        if isinstance(step, int) and step >= 1000:
            return self._error(step)
        if isinstance(step, int):
            return web.Response(status=step, text=f"<html><body>{step}</body></html>", content_type="text/html")
        if step == "rate-limit":
            return self._error(RATE_LIMIT_CODE, headers={"Retry-After": self.retry_after} if self.retry_after else None)
        stream = body.get("stream") is True
        save = body.get("auto_save_history", True) is not False
        if not stream and not save:
            return self._error(INVALID_PARAM, "invalid param: auto_save_history must be true when stream is false")

        wanted = request.query.get("conversation_id")
        if wanted:
            conv = self.conversations.get(wanted)
            if conv is None:
                code, msg = self.unknown_conversation
                return self._error(code, msg)
            if conv.running is not None:
                return self._error(CHAT_IN_PROGRESS)
        else:
            conv = self._new_conversation(body["bot_id"])
        if not messages and not any(m.get("role") == "user" for m in conv.messages):
            return self._error(INVALID_PARAM, "invalid param: additional_messages is required here")
        if not question and not messages:
            question = next((_text_of(m) for m in reversed(conv.messages) if m.get("role") == "user"), "")
        meta = body.get("meta_data")
        chat = Chat(
            id=self.new_id(),
            conversation_id=conv.id,
            bot_id=body["bot_id"],
            user_id=body["user_id"],
            question=question,
            inputs=messages,
            save=save,
            created_at=int(time.time()),
            meta_data=meta if isinstance(meta, dict) else {},
        )
        self.chats[chat.id] = chat
        conv.running = chat.id  # no await since the 4016 check: one chat at a time
        await self._notify()

        if not stream:
            snapshot = self._chat_object(chat, "in_progress")
            await self._play(chat, step, None, None)
            return self._ok(snapshot)

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-tt-logid": self._logid()})
        await resp.prepare(request)
        try:
            await self._play(chat, step, request, resp)
        except _Dropped:
            pass
        finally:
            chat.finished = True
            await self._notify()
        return resp

    def _new_conversation(self, bot_id: str, name: str = "", meta: dict[str, str] | None = None) -> Conversation:
        conv = Conversation(self.new_id(), bot_id, int(time.time()), self.new_id(), name, meta or {})
        self.conversations[conv.id] = conv
        return conv

    async def _send(self, chat: Chat, resp: web.StreamResponse | None, event: str, data: Any) -> None:
        chat.events.append((event, data))
        if resp is None or chat.client_closed:
            return
        frame = b"event:" + event.encode() + b"\ndata:" + orjson.dumps(data) + b"\n\n"
        try:
            if self.fragment:
                cut = next((i + 1 for i, b in enumerate(frame) if b >= 0xC0), len(frame) // 2)
                await resp.write(frame[:cut])
                await resp.write(frame[cut:])
            else:
                await resp.write(frame)
        except ConnectionResetError:
            chat.client_closed = True

    async def _pause(self, chat: Chat) -> None:
        chat.paused = chat.was_paused = True
        await self._notify()
        await chat.gate.wait()
        chat.paused = False
        await self._notify()

    async def _finish(self, chat: Chat, status: str) -> None:
        conv = self.conversations[chat.conversation_id]
        if conv.running == chat.id:
            conv.running = None
        if chat.status in RUNNING:
            chat.status = status
            now = int(time.time())
            if status == "failed":
                chat.failed_at = now
            else:
                chat.completed_at = now
            if status == "completed" and chat.save:
                conv.messages.extend(dict(m) for m in chat.inputs)
                conv.messages.extend(m for m in chat.outputs if m["type"] == "answer")
        await self._notify()

    async def _play(self, chat: Chat, step: str, request: web.Request | None, resp: web.StreamResponse | None) -> None:
        """Run the chat: its events in Coze's order, to `resp` when streaming."""
        streaming = resp is not None

        async def send(event: str, data: Any) -> None:
            await self._send(chat, resp, event, data)

        if step == "error-empty":
            await send("error", {})
            await self._finish(chat, "failed")
            return
        await send("conversation.chat.created", self._chat_object(chat, "created"))
        if chat.status == "created":
            chat.status = "in_progress"
        await send("conversation.chat.in_progress", self._chat_object(chat, "in_progress"))
        if step in ("failed", "failed-bare"):
            chat.last_error = {"code": SERVER_ERROR, "msg": "event interval error"}
            chat.failed_at = int(time.time())
            data = {"code": 701231, "msg": "error"} if step == "failed-bare" else self._chat_object(chat, "failed")
            await send("conversation.chat.failed", data)
            await self._finish(chat, "failed")
            return
        if self.hold and streaming:
            await self._pause(chat)
        if self.tool_calls or step == "requires-action":
            call = self._message(chat, self.new_id(), "function_call",
                                 '{"name":"double-lookup","arguments":{"q":"x"},"plugin_type":1}')
            chat.outputs.append(call)
            await send("conversation.message.completed", call)
        if step == "requires-action":
            action = {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": [
                {"id": self.new_id(), "type": "function",
                 "function": {"name": "double_local_plugin", "arguments": '{"q":"x"}'}}]}}
            await send("conversation.chat.requires_action", {**self._chat_object(chat, "requires_action"),
                                                             "required_action": action})
            await self._finish(chat, "requires_action")
            await send("done", "[DONE]")
            return
        if self.tool_calls:
            result = self._message(chat, self.new_id(), "tool_response", '{"content_type":1,"response_for_model":"42"}')
            chat.outputs.append(result)
            await send("conversation.message.completed", result)

        text = self.reply_text(chat)
        answers = [(text, list(self.deltas) if self.deltas is not None else _pieces(text))]
        answers += [(extra, _pieces(extra)) for extra in self.extra_answers]
        for n, (full, pieces) in enumerate(answers):
            msg_id = self.new_id()
            thought = self.reasoning if n == 0 and self.reasoning else ""
            for piece in _pieces(thought) if thought else []:
                await send("conversation.message.delta",
                           self._message(chat, msg_id, "answer", "", reasoning_content=piece))
            for i, piece in enumerate(pieces):
                await send("conversation.message.delta", self._message(chat, msg_id, "answer", piece))
                if n == 0 and i == 0 and streaming:
                    if step == "stall":
                        await self._pause(chat)
                    elif step == "drop":
                        assert request is not None and request.transport is not None
                        request.transport.close()
                        await self._finish(chat, "failed")
                        raise _Dropped
                    elif step == "error":
                        chat.last_error = {"code": SERVER_ERROR, "msg": MSG_SERVER_ERROR}
                        await send("error", {"code": SERVER_ERROR, "msg": MSG_SERVER_ERROR})
                        await self._finish(chat, "failed")
                        return
            extra = {"reasoning_content": thought} if thought else {}
            done = self._message(chat, msg_id, "answer", full, **extra)
            chat.outputs.append(done)
            if n == 0:
                chat.answer = full
            await send("conversation.message.completed", done)
        verbose = self._message(chat, self.new_id(), "verbose", VERBOSE_FINISH)
        chat.outputs.append(verbose)
        await send("conversation.message.completed", verbose)
        for question in self.follow_ups:
            follow = self._message(chat, self.new_id(), "follow_up", question)
            chat.outputs.append(follow)
            await send("conversation.message.completed", follow)

        context = self.conversations[chat.conversation_id].messages
        input_count = sum(len(_text_of(m)) for m in [*context, *chat.inputs])
        output_count = sum(len(full) for full, _ in answers)
        chat.usage = {"token_count": input_count + output_count, "output_count": output_count,
                      "input_count": input_count}
        chat.completed_at = int(time.time())
        await send("conversation.chat.completed", self._chat_object(chat, "completed"))
        await self._finish(chat, "completed")
        await send("done", "[DONE]")

    # ---- the other endpoints ----------------------------------------------------------------

    async def cancel(self, request: web.Request) -> web.Response:
        rec = await self._record(request, self.cancels)
        if isinstance(rec, web.Response):
            return rec
        if (refused := self._refused(rec)) is not None:
            return refused
        chat = self.chats.get(str(rec.body.get("chat_id", "")))
        if chat is None or chat.conversation_id != rec.body.get("conversation_id"):
            return self._error(INVALID_PARAM, "invalid param: chat_id or conversation_id")  # UNVERIFIED
        if chat.status not in RUNNING:
            return self._error(CANNOT_CANCEL)
        chat.status = "canceled"
        conv = self.conversations[chat.conversation_id]
        if conv.running == chat.id:
            conv.running = None
        self.cancelled.set()
        await self._notify()
        return self._ok(self._chat_object(chat))

    def _lookup(self, rec: Recorded) -> Chat | web.Response:
        args = {**rec.query, **{k: str(v) for k, v in rec.body.items()}}
        chat = self.chats.get(args.get("chat_id", ""))
        if chat is None or chat.conversation_id != args.get("conversation_id"):
            return self._error(INVALID_PARAM, "invalid param: chat_id or conversation_id")
        return chat

    async def retrieve(self, request: web.Request) -> web.Response:
        rec = await self._record(request, None)
        if isinstance(rec, web.Response):
            return rec
        if (refused := self._refused(rec)) is not None:
            return refused
        chat = self._lookup(rec)
        return chat if isinstance(chat, web.Response) else self._ok(self._chat_object(chat))

    async def message_list(self, request: web.Request) -> web.Response:
        rec = await self._record(request, None)
        if isinstance(rec, web.Response):
            return rec
        if (refused := self._refused(rec)) is not None:
            return refused
        chat = self._lookup(rec)
        return chat if isinstance(chat, web.Response) else self._ok(list(chat.outputs))

    async def create_conversation(self, request: web.Request) -> web.Response:
        rec = await self._record(request, None)
        if isinstance(rec, web.Response):
            return rec
        if (refused := self._refused(rec)) is not None:
            return refused
        bot_id = rec.body.get("bot_id")
        if bot_id is not None and bot_id not in self.bots:
            return self._error(SERVER_ERROR)  # UNVERIFIED: what coze-js#179 suggests for a wrong bot_id
        meta = rec.body.get("meta_data")
        conv = self._new_conversation(str(bot_id or ""), str(rec.body.get("name") or ""),
                                      meta if isinstance(meta, dict) else None)
        seed = rec.body.get("messages")
        if isinstance(seed, list):
            conv.messages.extend(m for m in seed if isinstance(m, dict))
        return self._ok({
            "id": conv.id,
            "name": conv.name,
            "meta_data": conv.meta_data,
            "created_at": conv.created_at,
            "updated_at": conv.created_at,
            "creator_id": "2478774393250000",
            "connector_id": str(rec.body.get("connector_id") or "1024"),
            "last_section_id": conv.section_id,
        })


def _text_of(message: dict[str, Any]) -> str:
    """A message's text: `content` for text, the text items of an object_string."""
    content = message.get("content")
    if not isinstance(content, str):
        return ""
    if message.get("content_type") == "object_string":
        try:
            items = orjson.loads(content)
        except orjson.JSONDecodeError:
            return ""
        if isinstance(items, list):
            return " ".join(str(i.get("text", "")) for i in items if isinstance(i, dict) and i.get("type") == "text")
        return ""
    return content


def _pieces(text: str) -> list[str]:
    """Delta pieces: word by word (spaces kept in front), long runs (CJK) cut every 4 characters."""
    out: list[str] = []
    for i, word in enumerate(text.split(" ")):
        piece = word if i == 0 else " " + word
        out.extend([piece] if len(piece) <= 6 else [piece[j : j + 4] for j in range(0, len(piece), 4)])
    return [p for p in out if p] or [""]
