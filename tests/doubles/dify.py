"""A Dify service-API double: chat, agent, chatflow, workflow and completion apps (docs/protocols/dify.md).

One double is one Dify app (`mode`), reached with any key in `api_keys` (`Authorization: Bearer app-…`).
Routes, as Dify's service API has them under `/v1`:
  POST /v1/chat-messages                      chat, agent-chat, advanced-chat (chatflow) and agent apps
  POST /v1/chat-messages/{task_id}/stop       ends the running stream the way Dify does (§4.6)
  POST /v1/completion-messages (+ /stop)      completion apps
  POST /v1/workflows/run                      workflow apps, answered from `outputs[output_key]`
  POST /v1/workflows/tasks/{task_id}/stop
  GET  /v1/info, GET /v1/parameters           what `doctor` can check cheaply (mode, user_input_form)
  POST /v1/files/upload                       201, as Dify answers it
  GET  /files/tools/{name}                    the image a `message_file` event points at (no auth: signed URL)

Streams are framed as Dify frames them: `data: {json}\\n\\n` with the event name inside the JSON, `event: ping\\n\\n`
(no data line) after the data frames listed in `ping_after` and every `idle_ping` seconds while a stream is
stalled, each frame that holds a multi-byte character written in two pieces cut inside that character
(`split_utf8`), no `[DONE]`: the stream ends after its terminal event.

Behaviour per request comes from `script` (one entry per generate request, then normal answers). An entry is
one behaviour or several joined with "+" (e.g. "file+sources"); "" (or 200) is a normal answer:
  an int               that HTTP status: Dify's envelope {"code","message","status"} (502/503/504: nginx's HTML)
  a Dify error code    that HTTP error before any stream ("too_many_requests", "rate_limit_error",
                       "provider_quota_exceeded", "conversation_completed", "not_found", ...; see HTTP_ERRORS)
  "error"              one delta, then an `error` event (internal_server_error, status 500) and EOF; HTTP 200.
                       Chatflow: node_finished(failed) → workflow_finished(failed) → error, no message_end.
                       Workflow: node_finished(failed) → workflow_finished(failed). Blocking: the HTTP error.
  "error:<code>"       the same with that code (completion_request_error, provider_quota_exceeded, ...)
  "drop"               one delta, then the TCP connection is closed: no terminal event
  "stall"              one delta, then nothing until `release()` (the rest follows) or a stop (§4.6)
  "replace"            the deltas, then `message_replace` with `replacement`, then message_end
  "file"               a `message_file` image with an absolute URL on this double; "file-relative": the
                       relative `/files/tools/<uuid>.png?timestamp=…&nonce=…&sign=…` self-hosted Dify sends;
                       "file-document": a `document` (`/files/tools/<uuid>.xlsx?…`, absolute: XLSX_BODY)
  "sources"            `metadata.retriever_resources` on message_end (SAMPLE_SOURCES unless
                       `retriever_resources` is set, which puts them on every answer)
  "think"              the answer starts with `<think>\\n{thought}\\n</think>\\n\\n`, tags split across deltas
  "think-unopened"     `{thought}\\n</think>\\n\\n` before the answer: the closing tag only
  "think-details"      the legacy `<details …> <summary> Thinking... </summary>\\n` … `</details>` chunks
  "reasoning"          `reasoning_chunk` events before the answer (chatflow and workflow apps)
  "no-text-chunk"      workflow apps: no `text_chunk` events, the answer only in `outputs`
With `hold` set, every generate request waits for `release()` before answering.

Conversations live in `conversations` (id → Conversation with its user, inputs and messages): a request without
`conversation_id` (or "") starts one; a known id under the same `user` continues it (the `reply` callback sees
the history in `Turn.history`); an unknown id, or another user's, is a 404 "Conversation Not Exists.".
`user_input_form` declares the app's inputs (as GET /v1/parameters returns them): undeclared inputs are dropped,
a missing required one is 400 invalid_param, declared ones missing take their default.

Recorded: `requests` (every generate body), `auth_headers`, `statuses` (HTTP status per generate request, in
the order the answers ended), `turns` (accepted messages, their outcome), `stops`, `uploads`, `calls` (method
and path of every request), `idle_pings`, `split_frames`. Awaitable: `received`, `wait_requests(n)`, `wait_stalled(n)`,
`wait_finished(n)`, `wait_stops(n)`, `wait_for(predicate)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

from tests.doubles.waiting import Waitable

Mode = Literal["chat", "agent-chat", "advanced-chat", "agent", "workflow", "completion"]
CHAT_MODES: frozenset[str] = frozenset({"chat", "agent-chat", "advanced-chat", "agent"})

# code → (HTTP status, message) for errors answered before a stream opens (controllers/service_api/app/error.py,
# controllers/web/error.py, services/api_token_service.py, werkzeug's defaults).
HTTP_ERRORS: dict[str, tuple[int, str]] = {
    "invalid_param": (400, "Invalid parameter."),
    "bad_request": (400, "Workflow not published"),
    "app_unavailable": (400, "App unavailable, please check your app configurations."),
    "not_chat_app": (400, "Please check if your Chat app mode matches the right API route."),
    "not_workflow_app": (400, "Please check if your app mode matches the right API route."),
    "provider_not_initialize": (
        400,
        "No valid model provider credentials found. "
        "Please go to Settings -> Model Provider to complete your provider credentials.",
    ),
    "provider_quota_exceeded": (
        400,
        "Your quota for Dify Hosted Model Provider has been exhausted. "
        "Please go to Settings -> Model Provider to complete your own provider credentials.",
    ),
    "model_currently_not_support": (400, "Dify Hosted OpenAI trial currently not support the GPT-4 model."),
    "completion_request_error": (400, "[openai] Error: Rate limit reached for requests"),
    "conversation_completed": (400, "The conversation has ended. Please start a new conversation."),
    "unauthorized": (401, "Access token is invalid"),
    "forbidden": (403, "The app's API service has been disabled."),
    "not_found": (404, "Conversation Not Exists."),
    "file_too_large": (413, "File size exceeded. "),
    "unsupported_file_type": (415, "File type not allowed."),
    "too_many_requests": (
        429,
        "Too many requests. Please try again later. The current maximum concurrent requests allowed for {app_id} is "
        "{limit}.",
    ),
    "rate_limit_error": (429, "Rate limit exceeded, please upgrade your plan or your RPD was 5000 requests/day"),
    "internal_server_error": (
        500,
        "The server encountered an internal error and was unable to complete your request. Either the server is "
        "overloaded or there is an error in the application.",
    ),
}
CODE_BY_STATUS = {
    400: "invalid_param",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    413: "file_too_large",
    415: "unsupported_file_type",
    429: "too_many_requests",
    500: "internal_server_error",
}
# What an `error` event says for an exception raised after the stream opened
# (core/app/apps/base_app_generate_response_converter.py `_error_to_stream_response`).
STREAM_ERRORS: dict[str, tuple[int, str]] = {
    **{code: HTTP_ERRORS[code] for code in ("invalid_param", "provider_not_initialize", "provider_quota_exceeded")},
    "model_currently_not_support": HTTP_ERRORS["model_currently_not_support"],
    "completion_request_error": HTTP_ERRORS["completion_request_error"],
    "internal_server_error": (500, "Internal Server Error, please contact support."),
}
STOP_REASON = "Stopped by user."
LEGACY_THINK_OPEN = (
    '<details style="color:gray;background-color: #f8f8f8;padding: 8px;border-radius: 4px;" open> '
    "<summary> Thinking... </summary>\n"
)
SAMPLE_SOURCES: list[dict[str, Any]] = [
    {
        "position": 1,
        "dataset_id": "101b4c97-fc2e-463c-90b1-5261a4cdcafb",
        "dataset_name": "Handbook",
        "document_id": "8dd1ad74-0b5f-4175-b735-7d98bbbb4e00",
        "document_name": "Leave policy.pdf",
        "segment_id": "ed599c7f-2766-4294-9d1d-e5235a61270a",
        "score": 0.98457545,
        "content": "Annual leave is 15 days.",
    },
    {
        "position": 2,
        "dataset_id": "101b4c97-fc2e-463c-90b1-5261a4cdcafb",
        "dataset_name": "Handbook",
        "document_id": "1a7b2c3d-0b5f-4175-b735-7d98bbbb4e01",
        "document_name": "Holidays 2025.md",
        "segment_id": "0b6f1c2e-2766-4294-9d1d-e5235a61270b",
        "score": 0.71,
        "content": "Public holidays are listed here.",
    },
]
# A 1×1 transparent PNG: what /files/tools/<name> serves.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)
# What /files/tools/<name>.xlsx serves: a generated document (its bytes only need to arrive intact).
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
XLSX_BODY = b"PK\x03\x04 a generated spreadsheet"
_STALL = "stall"
_DROP = "drop"
Item = dict[str, Any] | Callable[[], dict[str, Any]] | str


@dataclass
class Message:
    """One answered message of a conversation, as Dify keeps it."""

    id: str
    query: str
    answer: str
    inputs: dict[str, Any]
    status: str  # "normal" | "error" | "stopped"


@dataclass
class Conversation:
    id: str
    user: str
    inputs: dict[str, Any]
    messages: list[Message] = field(default_factory=list)

    @property
    def queries(self) -> list[str]:
        return [m.query for m in self.messages]


@dataclass
class Turn:
    """One accepted generate request (past validation) and what became of it."""

    path: str
    mode: str
    user: str
    query: str
    inputs: dict[str, Any]  # as the app kept them: declared variables only, defaults applied
    conversation_id: str | None  # None for workflow and completion apps
    new_conversation: bool
    task_id: str
    message_id: str
    workflow_run_id: str | None
    streaming: bool
    files: list[dict[str, Any]]
    behaviours: frozenset[str]
    history: list[Message]  # the conversation's messages before this one
    answer: str = ""  # what was sent so far (message_replace replaces it)
    stalled: bool = False
    outcome: str = "running"  # completed | error | stopped | dropped | client-gone


@dataclass
class Stop:
    path: str
    task_id: str
    user: str
    effective: bool  # False: unknown or finished task, or another user's (Dify answers success all the same)


@dataclass
class _Task:
    turn: Turn
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def _words(text: str) -> list[str]:
    parts = text.split(" ")
    return [p if i == 0 else " " + p for i, p in enumerate(parts)]


def _split_inside_char(data: bytes) -> int:
    """An offset inside the first multi-byte UTF-8 character of `data`, or 0 if it has none."""
    for i, byte in enumerate(data):
        if byte >= 0xC0:  # a lead byte: cut after it, before its continuation bytes
            return i + 1
    return 0


@dataclass
class DifyDouble(Waitable):
    mode: Mode = "chat"
    api_keys: set[str] = field(default_factory=lambda: {"app-double"})
    app_id: str = "8f1c1d0e-0b1e-4d4b-9a5a-4f0c2b6b7d11"
    app_name: str = "botgate double"
    answer: str | None = None  # the answer text; default "echo: <query>"
    reply: Callable[[Turn], str] | None = None  # or computed per turn (sees inputs and history)
    thought: str = "The user greeted me, so I greet back."  # for the think/reasoning behaviours
    files_origin: str = ""  # where absolute `message_file` URLs point ("": this double's own origin)
    replacement: str = "Sorry, I can't talk about that."  # what message_replace sends
    user_input_form: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    retriever_resources: list[dict[str, Any]] = field(default_factory=list)  # on every message_end when set
    output_key: str = "answer"  # workflow apps: the outputs variable holding the answer
    sticky_inputs: bool = False  # later turns keep the first turn's inputs (some Dify versions)
    script: list[int | str] = field(default_factory=list)
    hold: bool = False
    max_active: int = 0  # concurrent generate requests per app before 429 too_many_requests; 0: unlimited
    retry_after: str | None = None  # a Retry-After header on 429s (Dify documents none)
    ping_after: tuple[int, ...] = (1,)  # a ping frame after these data frames (1-based)
    idle_ping: float | None = None  # seconds between pings while a stream is stalled
    split_utf8: bool = True
    legacy_json: bool = False  # json.dumps framing (spaces, \\u escapes) as older Dify wrote it
    # recorded
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    conversations: dict[str, Conversation] = field(default_factory=dict)
    idle_pings: int = 0
    split_frames: int = 0
    received: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: dict[str, _Task] = field(default_factory=dict)
    _active: int = 0
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat-messages", self.chat_messages)
        app.router.add_post("/v1/chat-messages/{task_id}/stop", self.stop_chat)
        app.router.add_post("/v1/completion-messages", self.completion_messages)
        app.router.add_post("/v1/completion-messages/{task_id}/stop", self.stop_completion)
        app.router.add_post("/v1/workflows/run", self.workflows_run)
        app.router.add_post("/v1/workflows/tasks/{task_id}/stop", self.stop_workflow)
        app.router.add_get("/v1/info", self.info)
        app.router.add_get("/v1/parameters", self.parameters)
        app.router.add_post("/v1/files/upload", self.files_upload)
        app.router.add_get("/files/tools/{name}", self.tool_file)
        return app

    # --- control and waiting -------------------------------------------------------------------------

    def release(self) -> None:
        """Let held and stalled requests finish."""
        self._released.set()

    def forget(self, conversation_id: str) -> None:
        """The conversation is deleted on the Dify side: its id now gets 404."""
        self.conversations.pop(conversation_id, None)

    async def wait_requests(self, count: int) -> None:
        """Until `count` generate requests have arrived in total."""
        await self.wait_for(lambda: len(self.requests) >= count)

    async def wait_stalled(self, count: int = 1) -> None:
        """Until `count` streams have sent their first delta and stalled (their task_id is on the wire)."""
        await self.wait_for(lambda: sum(t.stalled for t in self.turns) >= count)

    async def wait_finished(self, count: int = 1) -> None:
        await self.wait_for(lambda: sum(t.outcome != "running" for t in self.turns) >= count)

    async def wait_stops(self, count: int = 1) -> None:
        await self.wait_for(lambda: len(self.stops) >= count)

    # --- envelopes -------------------------------------------------------------------------------------

    def _error(self, code: str, message: str | None = None, status: int | None = None) -> web.Response:
        default_status, default_message = HTTP_ERRORS.get(code, (status or 500, code))
        status = status or default_status
        text = message if message is not None else default_message
        text = text.format(app_id=self.app_id, limit=self.max_active)
        headers = {"Retry-After": self.retry_after} if status == 429 and self.retry_after is not None else None
        return web.json_response({"code": code, "message": text, "status": status}, status=status, headers=headers)

    def _scripted_status(self, status: int) -> web.Response:
        if status in (502, 503, 504):  # what the nginx in front of Dify answers, not Dify's envelope
            reason = {502: "Bad Gateway", 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}[status]
            html = f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n<center><h1>{status} "
            html += f"{reason}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
            return web.Response(status=status, text=html, content_type="text/html")
        return self._error(CODE_BY_STATUS.get(status, "internal_server_error"), status=status)

    def _auth(self, request: web.Request) -> web.Response | None:
        """services/api_token_service.py and controllers/service_api/wraps.py, in their order."""
        header = request.headers.get("Authorization")
        if header is None or " " not in header:
            return self._error("unauthorized", "Authorization header must be provided and start with 'Bearer'")
        scheme, token = header.split(None, 1)
        if scheme.lower() != "bearer":
            return self._error("unauthorized", "Authorization scheme must be 'Bearer'")
        if token not in self.api_keys:
            return self._error("unauthorized")
        return None

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return self._error("bad_request", "Failed to decode JSON object: invalid JSON body")
        if not isinstance(body, dict):
            return self._error("bad_request", "Failed to decode JSON object: not an object")
        return body

    def _frame(self, event: dict[str, Any]) -> bytes:
        if self.legacy_json:
            return b"data: " + json.dumps(event).encode() + b"\n\n"
        return b"data: " + orjson.dumps(event) + b"\n\n"

    # --- inputs ----------------------------------------------------------------------------------------

    def _declared(self) -> list[tuple[str, dict[str, Any]]]:
        """(type, spec) per declared variable: `{"text-input": {"variable": ..., "required": ...}}` entries."""
        out: list[tuple[str, dict[str, Any]]] = []
        for entry in self.user_input_form:
            ((kind, spec),) = entry.items()
            out.append((kind, spec))
        return out

    def _keep_inputs(self, given: dict[str, Any]) -> dict[str, Any]:
        """core/app/apps/base_app_generator.py `_prepare_user_inputs` / `_validate_inputs`; raises ValueError."""
        kept: dict[str, Any] = {}
        for kind, spec in self._declared():
            name = spec["variable"]
            value = given.get(name)
            if value is None:
                if spec.get("required"):
                    raise ValueError(f"{name} is required in input form")
                value = spec.get("default")
                if value is None:
                    kept[name] = None
                    continue
            if kind in ("text-input", "paragraph", "select") and not isinstance(value, str):
                raise ValueError(f"(type '{kind}') {name} in input form must be a string")
            if kind == "number":
                if isinstance(value, str):
                    try:
                        value = float(value) if "." in value else int(value)
                    except ValueError:
                        raise ValueError(f"{name} in input form must be a valid number") from None
            elif kind == "select" and value not in spec.get("options", []):
                raise ValueError(f"{name} in input form must be one of the following: {spec.get('options', [])}")
            elif kind in ("text-input", "paragraph"):
                max_length = spec.get("max_length")
                if max_length and len(value) > max_length:
                    raise ValueError(f"{name} in input form must be less than {max_length} characters")
            kept[name] = value.replace("\x00", "") if isinstance(value, str) else value
        return kept

    # --- generate endpoints ----------------------------------------------------------------------------

    async def chat_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completion_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def workflows_run(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "workflow")

    async def _generate(self, request: web.Request, route: str) -> web.StreamResponse:
        self.calls.append((request.method, request.path))
        raw = await self._body(request)
        body = raw if isinstance(raw, dict) else {}
        self.requests.append(body)
        self.auth_headers.append(request.headers.get("Authorization", ""))
        self.received.set()
        await self._notify()
        step: int | str = self.script.pop(0) if self.script else ""
        response = await self._answer(request, route, raw, step)
        self.statuses.append(response.status)
        await self._notify()
        return response

    async def _answer(
        self, request: web.Request, route: str, raw: dict[str, Any] | web.Response, step: int | str
    ) -> web.StreamResponse:
        refused = self._auth(request)
        if refused is not None:
            return refused
        if isinstance(raw, web.Response):
            return raw
        body = raw
        user = body.get("user")
        if not user:
            return self._error("invalid_param", "Arg user must be provided.")
        user = str(user)
        if route == "chat" and self.mode not in CHAT_MODES:
            return self._error("not_chat_app")
        if route == "completion" and self.mode != "completion":
            return self._error("app_unavailable")
        if route == "workflow" and self.mode != "workflow":
            return self._error("not_workflow_app")
        if isinstance(step, int) and step != 200:
            return self._scripted_status(step)
        behaviours = frozenset(b for b in str(step).split("+") if b) if isinstance(step, str) else frozenset()
        for b in behaviours:
            if b in HTTP_ERRORS:
                return self._error(b)
        # the payload model (controllers/service_api/app/completion.py ChatRequestPayload)
        inputs = body.get("inputs")
        if not isinstance(inputs, dict):
            return self._error("invalid_param", "inputs is required and must be an object")
        query = body.get("query", "")
        if route == "chat" and not isinstance(body.get("query"), str):
            return self._error("invalid_param", "query is required and must be a string")
        mode = body.get("response_mode")
        if mode not in (None, "blocking", "streaming"):
            return self._error("invalid_param", "response_mode must be 'blocking' or 'streaming'")
        streaming = mode == "streaming"
        files = body.get("files") or []
        conversation_id = str(body.get("conversation_id") or "").strip() if route == "chat" else ""
        if conversation_id:
            try:
                conversation_id = str(uuid.UUID(conversation_id))
            except ValueError:
                return self._error("invalid_param", "conversation_id must be a valid UUID")
        if self.max_active and self._active >= self.max_active:
            return self._error("too_many_requests")
        if self.mode in ("agent-chat", "agent") and not streaming:
            return self._error("invalid_param", "Agent Chat App does not support blocking mode")
        conversation: Conversation | None = None
        if conversation_id:
            conversation = self.conversations.get(conversation_id)
            if conversation is None or conversation.user != user:  # services/conversation_service.py
                return self._error("not_found")
        try:
            kept = self._keep_inputs(inputs)
        except ValueError as exc:
            return self._error("invalid_param", str(exc))
        if conversation is not None and self.sticky_inputs:
            kept = dict(conversation.inputs)
        if route == "workflow":  # a workflow's text comes in as a declared input, undeclared ones are gone
            query = str(kept.get("query") or "")
        elif route == "completion":
            query = str(query or kept.get("query") or "")
        new = False
        if route == "chat" and conversation is None:
            conversation = Conversation(id=str(uuid.uuid4()), user=user, inputs=kept)
            self.conversations[conversation.id] = conversation
            new = True
        elif conversation is not None:
            conversation.inputs = kept
        turn = Turn(
            path=request.path,
            mode=self.mode,
            user=user,
            query=str(query),
            inputs=kept,
            conversation_id=conversation.id if conversation else None,
            new_conversation=new,
            task_id=str(uuid.uuid4()),
            message_id=str(uuid.uuid4()),
            workflow_run_id=str(uuid.uuid4()) if self.mode in ("advanced-chat", "workflow") else None,
            streaming=streaming,
            files=list(files),
            behaviours=behaviours,
            history=list(conversation.messages) if conversation else [],
        )
        self.turns.append(turn)
        self._active += 1
        try:
            if self.hold:
                await self._released.wait()
            text = self._text(turn)
            if not streaming:
                return await self._blocking(turn, text)
            task = _Task(turn)
            self._tasks[turn.task_id] = task
            try:
                return await self._stream(request, task, text)
            finally:
                self._tasks.pop(turn.task_id, None)
        finally:
            self._active -= 1
            if conversation is not None and route == "chat":
                status = {"error": "error", "stopped": "stopped"}.get(turn.outcome, "normal")
                conversation.messages.append(Message(turn.message_id, turn.query, turn.answer, kept, status))
            await self._notify()

    def _text(self, turn: Turn) -> str:
        if self.reply is not None:
            return self.reply(turn)
        if self.answer is not None:
            return self.answer
        return f"echo: {turn.query}"

    def _error_code(self, turn: Turn) -> str | None:
        for b in turn.behaviours:
            if b == "error":
                return "internal_server_error"
            if b.startswith("error:"):
                return b.split(":", 1)[1]
        return None

    def _usage(self, turn: Turn, completion_tokens: int) -> dict[str, Any]:
        prompt = len(turn.query) + sum(len(m.query) + len(m.answer) for m in turn.history)
        prompt_price = prompt * 0.000001
        completion_price = completion_tokens * 0.000002
        return {
            "prompt_tokens": prompt,
            "prompt_unit_price": "0.001",
            "prompt_price_unit": "0.001",
            "prompt_price": f"{prompt_price:.7f}",
            "completion_tokens": completion_tokens,
            "completion_unit_price": "0.002",
            "completion_price_unit": "0.001",
            "completion_price": f"{completion_price:.7f}",
            "total_tokens": prompt + completion_tokens,
            "total_price": f"{prompt_price + completion_price:.7f}",
            "currency": "USD",
            "latency": 0.42,
        }

    def _sources(self, turn: Turn) -> list[dict[str, Any]]:
        if self.retriever_resources:
            return self.retriever_resources
        return SAMPLE_SOURCES if "sources" in turn.behaviours else []

    def _deltas(self, turn: Turn, text: str) -> list[str]:
        """The answer's deltas, with the thinking the behaviours ask for in front."""
        thought = _words(self.thought)
        if "think" in turn.behaviours:
            return ["<th", "ink>\n", *thought, "\n</th", "ink>\n\n", *_words(text)]
        if "think-unopened" in turn.behaviours:
            return [*thought, "\n</think>\n\n", *_words(text)]
        if "think-details" in turn.behaviours:
            return [LEGACY_THINK_OPEN, *thought, "</details>", *_words(text)]
        return _words(text)

    # --- blocking --------------------------------------------------------------------------------------

    async def _blocking(self, turn: Turn, text: str) -> web.Response:
        if _STALL in turn.behaviours:
            await self._released.wait()
        code = self._error_code(turn)
        deltas = self._deltas(turn, text)
        turn.answer = self.replacement if "replace" in turn.behaviours else "".join(deltas)
        created = int(time.time())
        if self.mode == "workflow":
            failed = code is not None
            turn.outcome = "error" if failed else "completed"
            return web.json_response(
                {
                    "task_id": turn.task_id,
                    "workflow_run_id": turn.workflow_run_id,
                    "data": {
                        "id": turn.workflow_run_id,
                        "workflow_id": "wf-" + self.app_id,
                        "status": "failed" if failed else "succeeded",
                        "outputs": {} if failed else {self.output_key: turn.answer},
                        "error": STREAM_ERRORS.get(code or "", (0, code))[1] if failed else None,
                        "elapsed_time": 0.42,
                        "total_tokens": len(deltas),
                        "total_steps": 3,
                        "created_at": created,
                        "finished_at": created,
                    },
                }
            )
        if code is not None:  # blocking raises what the stream would have sent (EasyUI `_to_blocking_response`)
            turn.answer = ""
            turn.outcome = "error"
            status, message = STREAM_ERRORS.get(code, HTTP_ERRORS.get(code, (500, code)))
            if code == "internal_server_error":
                return self._error(code)
            return self._error(code, message, status)
        turn.outcome = "completed"
        metadata: dict[str, Any] = {"usage": self._usage(turn, len(deltas))}
        if sources := self._sources(turn):
            metadata["retriever_resources"] = sources
        body: dict[str, Any] = {
            "event": "message",
            "task_id": turn.task_id,
            "id": turn.message_id,
            "message_id": turn.message_id,
            "mode": self.mode,
            "answer": turn.answer,
            "metadata": metadata,
            "created_at": created,
        }
        if turn.conversation_id is not None:
            body["conversation_id"] = turn.conversation_id
        return web.json_response(body)

    # --- streaming -------------------------------------------------------------------------------------

    async def _stream(self, request: web.Request, task: _Task, text: str) -> web.StreamResponse:
        turn = task.turn
        created = int(time.time())
        plan, on_stop = self._plan(request, turn, text, created)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        frames = 0
        last: dict[str, Any] = {}
        try:
            for item in plan:
                if task.stop.is_set():
                    for stop_event in on_stop():
                        await self._write(resp, stop_event)
                    turn.outcome = "stopped"
                    return resp
                if item == _DROP:
                    assert request.transport is not None
                    request.transport.close()
                    turn.outcome = "dropped"
                    return resp
                if item == _STALL:
                    turn.stalled = True
                    await self._notify()
                    if not await self._stall(request, resp, task):
                        turn.outcome = "client-gone"
                        return resp
                    continue
                event = item() if callable(item) else item
                assert isinstance(event, dict)
                self._account(turn, event)
                await self._write(resp, event)
                last = event
                frames += 1
                if frames in self.ping_after:
                    await resp.write(b"event: ping\n\n")
            failed = last.get("event") == "error" or last.get("data", {}).get("status") == "failed"
            turn.outcome = "error" if failed else "completed"
        except ConnectionResetError:
            turn.outcome = "client-gone"
        return resp

    async def _stall(self, request: web.Request, resp: web.StreamResponse, task: _Task) -> bool:
        """Wait for release() or a stop; ping while idle. False when the client went away."""
        while not (self._released.is_set() or task.stop.is_set()):
            released = asyncio.ensure_future(self._released.wait())
            stopped = asyncio.ensure_future(task.stop.wait())
            try:
                await asyncio.wait(
                    {released, stopped}, timeout=self.idle_ping or 0.05, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in (released, stopped):
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
            if self._released.is_set() or task.stop.is_set():
                break
            if request.transport is None or request.transport.is_closing():
                return False
            if self.idle_ping:
                try:
                    await resp.write(b"event: ping\n\n")
                except ConnectionResetError:
                    return False
                self.idle_pings += 1
                await self._notify()
        return True

    async def _write(self, resp: web.StreamResponse, event: dict[str, Any]) -> None:
        data = self._frame(event)
        cut = _split_inside_char(data) if self.split_utf8 else 0
        if cut:
            await resp.write(data[:cut])  # two writes, two sends: the character straddles them
            await resp.write(data[cut:])
            self.split_frames += 1
        else:
            await resp.write(data)

    def _account(self, turn: Turn, event: dict[str, Any]) -> None:
        """Keep `turn.answer` as what a correct client shows so far."""
        name = event.get("event")
        if name in ("message", "agent_message"):
            if self.mode == "agent" and name == "message":
                turn.answer = event["answer"]  # the New Agent's closing full message
            else:
                turn.answer += event["answer"]
        elif name == "message_replace":
            turn.answer = event["answer"]
        elif name == "text_chunk":
            turn.answer += event["data"]["text"]
        elif name == "workflow_finished" and self.mode == "workflow" and event["data"].get("outputs"):
            turn.answer = str(event["data"]["outputs"].get(self.output_key, turn.answer))

    def _plan(
        self, request: web.Request, turn: Turn, text: str, created: int
    ) -> tuple[list[Item], Callable[[], list[dict[str, Any]]]]:
        """The events of one stream, in Dify's order for the app mode, and what a stop sends instead."""
        b = turn.behaviours
        code = self._error_code(turn)
        deltas = self._deltas(turn, text)
        run_id = turn.workflow_run_id
        # the converters' common fields: chat apps {"conversation_id", "message_id", "created_at"}, completion
        # apps {"message_id", "created_at"}, workflow apps {"workflow_run_id"}
        common: dict[str, Any]
        if self.mode == "workflow":
            common = {"workflow_run_id": run_id}
        elif self.mode == "completion":
            common = {"message_id": turn.message_id, "created_at": created}
        else:
            common = {"conversation_id": turn.conversation_id, "message_id": turn.message_id, "created_at": created}

        def ev(name: str, **fields: Any) -> dict[str, Any]:
            # converter: {"event", "conversation_id", "message_id", "created_at"} then the response's own fields
            out: dict[str, Any] = {"event": name, **common}
            if name != "error":
                out["task_id"] = turn.task_id
            out.update(fields)
            return out

        def message_end() -> dict[str, Any]:
            metadata: dict[str, Any] = {"usage": self._usage(turn, len(deltas))}
            if sources := self._sources(turn):
                metadata["retriever_resources"] = sources
            extra: dict[str, Any] = {"files": []} if self.mode == "advanced-chat" else {}
            return ev("message_end", id=turn.message_id, metadata=metadata, **extra)

        def error_event() -> dict[str, Any]:
            status, message = STREAM_ERRORS.get(code or "", HTTP_ERRORS.get(code or "", (500, code or "")))
            return ev("error", status=status, code=code, message=message)

        def file_event() -> dict[str, Any]:
            document = "file-document" in b
            name = f"{uuid.uuid4()}.xlsx" if document else f"{uuid.uuid4()}.png"
            path = f"/files/tools/{name}?timestamp={created}&nonce=3f5a9c2e&sign=c2lnbmVkLWJ5LWRvdWJsZQ%3D%3D"
            url = path if "file-relative" in b else (self.files_origin or str(request.url.origin())) + path
            kind = "document" if document else "image"
            return ev("message_file", id=name.rsplit(".", 1)[0], type=kind, belongs_to="assistant", url=url)

        wants_file = "file" in b or "file-relative" in b or "file-document" in b
        plan: list[Item] = []

        def stop_events() -> list[dict[str, Any]]:  # EasyUI pipeline: QueueStopEvent → message_end
            return [message_end()]

        def answer_deltas(name: str, **extra: Any) -> None:
            for i, delta in enumerate(deltas):
                plan.append(ev(name, id=turn.message_id, answer=delta, **extra))
                if i == 0:
                    if code is not None:
                        return
                    if _DROP in b:
                        plan.append(_DROP)
                        return
                    if _STALL in b:
                        plan.append(_STALL)

        if self.mode in ("chat", "completion"):
            if wants_file and self.mode == "chat":
                plan.append(file_event)
            answer_deltas("message")
            if code is not None:
                plan.append(error_event)
            elif _DROP not in b:
                if "replace" in b:
                    plan.append(lambda: ev("message_replace", answer=self.replacement, reason="output_moderation"))
                plan.append(message_end)
            return plan, stop_events

        if self.mode in ("agent-chat", "agent"):

            def thought(position: int, tid: str, **fields: Any) -> dict[str, Any]:
                base = {"thought": "", "observation": "", "tool": "", "tool_labels": {}, "tool_input": ""}
                return ev("agent_thought", id=tid, position=position, **{**base, **fields, "message_files": []})

            first, second = str(uuid.uuid4()), str(uuid.uuid4())
            position = 1
            if wants_file:
                tool_input = json.dumps({"dalle3": {"prompt": turn.query}}, ensure_ascii=False)
                plan.append(thought(1, first))
                plan.append(thought(1, first, tool="dalle3", tool_labels={"dalle3": "DALL-E 3"}, tool_input=tool_input))
                file = file_event()
                plan.append(file)
                observation = json.dumps({"dalle3": "image has been created and sent to user already"})
                after = thought(1, first, tool="dalle3", tool_input=tool_input, observation=observation)
                after["message_files"] = [file["id"]]
                plan.append(after)
                position, second = 2, str(uuid.uuid4())
            plan.append(thought(position, second))
            answer_deltas("agent_message")
            if code is not None:
                plan.append(error_event)
                return plan, stop_events
            if _DROP in b:
                return plan, stop_events
            plan.append(lambda: thought(position, second, thought=turn.answer))
            if self.mode == "agent":
                plan.append(lambda: ev("message", id=turn.message_id, answer="".join(deltas)))
            if "replace" in b:
                plan.append(lambda: ev("message_replace", answer=self.replacement, reason="output_moderation"))
            plan.append(message_end)
            return plan, stop_events

        # chatflow (advanced-chat) and workflow: graph events under "data", workflow_run_id at the top
        started_at = created

        def wf(name: str, **data: Any) -> dict[str, Any]:
            return ev(name, workflow_run_id=run_id, data=data)

        def node(name: str, index: int, node_id: str, node_type: str, title: str, **data: Any) -> dict[str, Any]:
            fields: dict[str, Any] = {"id": f"{run_id}-{index}", "node_id": node_id, "node_type": node_type}
            fields.update(title=title, index=index, predecessor_node_id=None, created_at=created)
            return wf(name, **fields, **data)

        def finished(status: str, outputs: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
            return wf(
                "workflow_finished",
                id=run_id,
                workflow_id="wf-" + self.app_id,
                status=status,
                outputs=outputs,
                error=error,
                elapsed_time=0.42,
                total_tokens=len(deltas),
                total_steps=3,
                created_at=started_at,
                finished_at=int(time.time()),
                exceptions_count=0,
                files=[],
            )

        chatflow = self.mode == "advanced-chat"
        end_node = ("answer", "answer", "Answer") if chatflow else ("end", "end", "End")
        plan.append(
            wf("workflow_started", id=run_id, workflow_id="wf-" + self.app_id, inputs=turn.inputs, created_at=created)
        )
        plan.append(node("node_started", 1, "start", "start", "Start"))
        plan.append(node("node_finished", 1, "start", "start", "Start", status="succeeded", outputs=turn.inputs))
        plan.append(node("node_started", 2, "llm", "llm", "LLM"))
        if "reasoning" in b:
            for piece in [*_words(self.thought), ""]:
                data = {"message_id": turn.message_id, "reasoning": piece, "node_id": "llm", "is_final": not piece}
                plan.append(ev("reasoning_chunk", data=data))
        if chatflow:
            answer_deltas("message", from_variable_selector=["llm", "text"])
        elif "no-text-chunk" not in b:
            for i, delta in enumerate(deltas):
                plan.append(wf("text_chunk", text=delta, from_variable_selector=["llm", "text"]))
                if i == 0 and code is not None:
                    break
                if i == 0 and _DROP in b:
                    plan.append(_DROP)
                    break
                if i == 0 and _STALL in b:
                    plan.append(_STALL)
        elif _STALL in b:
            plan.append(_STALL)
        if _DROP in b:
            return plan, stop_events
        answer = "".join(deltas)

        def stopped() -> list[dict[str, Any]]:
            events = [finished("stopped", {}, STOP_REASON)]
            return [*events, message_end()] if chatflow else events

        if code is not None:
            reason = STREAM_ERRORS.get(code, HTTP_ERRORS.get(code, (500, code)))[1]
            plan.append(node("node_finished", 2, "llm", "llm", "LLM", status="failed", outputs=None, error=reason))
            plan.append(lambda: finished("failed", None, reason))
            if chatflow:  # a failed run is reported as ValueError(f"Run failed: …") → invalid_param
                plan.append(lambda: ev("error", status=400, code="invalid_param", message=f"Run failed: {reason}"))
            return plan, stopped
        plan.append(node("node_finished", 2, "llm", "llm", "LLM", status="succeeded", outputs={"text": answer}))
        out_key = "answer" if chatflow else self.output_key
        plan.append(node("node_started", 3, *end_node))
        plan.append(node("node_finished", 3, *end_node, status="succeeded", outputs={out_key: answer}))
        if chatflow:
            if "replace" in b:
                plan.append(lambda: ev("message_replace", answer=self.replacement, reason="output_moderation"))
            plan.append(message_end)
        plan.append(lambda: finished("succeeded", {out_key: turn.answer if chatflow else answer}, None))
        return plan, stopped

    # --- stop ------------------------------------------------------------------------------------------

    async def stop_chat(self, request: web.Request) -> web.Response:
        return await self._stop(request, CHAT_MODES, "not_chat_app", check_user=True)

    async def stop_completion(self, request: web.Request) -> web.Response:
        return await self._stop(request, frozenset({"completion"}), "app_unavailable", check_user=True)

    async def stop_workflow(self, request: web.Request) -> web.Response:
        return await self._stop(request, frozenset({"workflow"}), "not_workflow_app", check_user=False)

    async def _stop(
        self, request: web.Request, modes: frozenset[str], wrong_mode: str, check_user: bool
    ) -> web.Response:
        """AppQueueManager.set_stop_flag: only the user who started the task stops it; success either way."""
        self.calls.append((request.method, request.path))
        refused = self._auth(request)
        if refused is not None:
            return refused
        raw = await self._body(request)
        if isinstance(raw, web.Response):
            return raw
        user = raw.get("user")
        if not user:
            return self._error("invalid_param", "Arg user must be provided.")
        if self.mode not in modes:
            return self._error(wrong_mode)
        task_id = request.match_info["task_id"]
        task = self._tasks.get(task_id)
        effective = task is not None and (not check_user or task.turn.user == str(user))
        if task is not None and effective:
            task.stop.set()
        self.stops.append(Stop(request.path, task_id, str(user), effective))
        await self._notify()
        return web.json_response({"result": "success"})

    # --- app metadata, files ---------------------------------------------------------------------------

    async def info(self, request: web.Request) -> web.Response:
        self.calls.append((request.method, request.path))
        refused = self._auth(request)
        if refused is not None:
            return refused
        return web.json_response(
            {"name": self.app_name, "description": "", "tags": [], "mode": self.mode, "author_name": "botgate"}
        )

    async def parameters(self, request: web.Request) -> web.Response:
        self.calls.append((request.method, request.path))
        refused = self._auth(request)
        if refused is not None:
            return refused
        off = {"enabled": False}
        return web.json_response(
            {
                "opening_statement": "",
                "suggested_questions": [],
                "suggested_questions_after_answer": off,
                "speech_to_text": off,
                "text_to_speech": off,
                "retriever_resource": {"enabled": True},
                "annotation_reply": off,
                "more_like_this": off,
                "sensitive_word_avoidance": off,
                "user_input_form": self.user_input_form,
                "file_upload": {"image": {"enabled": True, "number_limits": 3, "transfer_methods": ["remote_url"]}},
                "system_parameters": {
                    "file_size_limit": 15,
                    "image_file_size_limit": 10,
                    "audio_file_size_limit": 50,
                    "video_file_size_limit": 100,
                    "workflow_file_upload_limit": 10,
                },
            }
        )

    async def files_upload(self, request: web.Request) -> web.Response:
        self.calls.append((request.method, request.path))
        refused = self._auth(request)
        if refused is not None:
            return refused
        form = await request.post()
        part = form.get("file")
        if not isinstance(part, web.FileField):
            return self._error("no_file_uploaded", "Please upload your file.", 400)
        if not part.filename or "/" in part.filename or "\\" in part.filename:
            return self._error("filename_not_exists_error", "The specified filename does not exist.", 400)
        content = part.file.read()
        user = str(form.get("user") or "DEFAULT-USER")
        record = {
            "id": str(uuid.uuid4()),
            "name": part.filename,
            "size": len(content),
            "extension": part.filename.rsplit(".", 1)[-1] if "." in part.filename else "",
            "mime_type": part.content_type,
            "created_by": user,
            "created_at": int(time.time()),
            "preview_url": None,
            "source_url": "",
            "original_url": None,
            "user_id": None,
            "tenant_id": "tenant-double",
            "conversation_id": None,
            "file_key": None,
            "reference": None,
        }
        self.uploads.append({**record, "content": content})
        await self._notify()
        return web.json_response(record, status=201)

    async def tool_file(self, request: web.Request) -> web.Response:
        self.calls.append((request.method, request.path))
        if request.path.endswith(".xlsx"):
            return web.Response(body=XLSX_BODY, content_type=XLSX)
        return web.Response(body=PNG_1X1, content_type="image/png")
