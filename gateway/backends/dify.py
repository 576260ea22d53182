"""A Dify app's service API (docs/protocols/dify.md): chatbot, agent, chatflow, and workflow or text
generator apps, on Dify Cloud (`https://api.dify.ai/v1`) or self-hosted (`http(s)://<host>/v1`).

Dify keeps the conversation (`keeps_history`): botgate sends only the new text (`query`) with the
`conversation_id` Dify gave the conversation's last answer (`Completion.session`), and an id Dify no
longer knows (404 "Conversation Not Exists.", 400 `conversation_completed`) is `conversation_gone`,
which `HttpBackend` asks once more without it (§6). `user` is the platform user key (in a group
whose context its members share, the group's own: a Dify conversation belongs to one user); `inputs`
carry the sender's user key and display name, the platform and its conversation id (`IDENTITY`) and
the configured `inputs` table, each cut to the length the app's form allows; Dify drops inputs its
app did not declare (§3).

The app's mode (`GET /info`) and form (`GET /parameters`) are learnt before the first message: the
mode picks the route (chat-family apps `/chat-messages`, workflow apps `/workflows/run`, text
generators `/completion-messages`; those two keep no conversation and read the text from their
`query` input), the form the lengths. `doctor`'s probe is the same two requests: no message is sent.

The stream (§4): `message` / `agent_message` / `text_chunk` deltas are the answer, a New Agent's closing
full `message` and `message_replace` replace it, `message_file` images are shown and other files
(documents) sent as files (a relative URL is resolved against the base URL without `/v1`),
`reasoning_chunk` is thinking, `message_end` brings the usage and, with `[model] sources`, the knowledge
sources; a workflow that streamed no text is answered from its outputs. `agent_thought`, pings and the
graph's progress are not for the chat. An `error` event or a failed run is a `ModelError`, and so is a
stream that ends without its terminal event (§4.5): an incomplete answer is never passed off as a
complete one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import aiohttp
import orjson

from ..config import ModelConfig
from ..errors import ModelError
from ..metrics import Metrics
from ..sse import read_events
from .base import BackendRequest, Completion, Delta, DeltaKind, Source
from .http import Call, HttpBackend, retry_after

log = logging.getLogger(__name__)

# The inputs botgate fills in (an app sees those it declares in its start form, §3).
IDENTITY = ("sender_id", "sender_name", "platform", "conversation_id")
QUERY_INPUT = "query"  # where a workflow or text generator app reads the message
CHAT_MODES = frozenset({"chat", "agent-chat", "advanced-chat", "agent"})
ROUTES = {"workflow": "/workflows/run", "completion": "/completion-messages"}  # else /chat-messages
STOP_ROUTES = {"workflow": "/workflows/tasks/{}/stop", "completion": "/completion-messages/{}/stop"}
# A workflow's answer in its outputs: the first of these that holds text, else its only text output.
OUTPUT_KEYS = ("answer", "text", "result", "output")
# Older Dify wrapped an LLM's thinking in this block, sent as chunks of their own (§8).
LEGACY_OPEN = re.compile(r"\A\s*<details\b[^>]*>\s*<summary>\s*Thinking\.\.\.\s*</summary>\s*")
LEGACY_CLOSE = "</details>"
RELEARN_AFTER = 60.0  # seconds before a failed look at the app is tried again
MALFORMED = "Dify sent malformed stream data"
# Codes that say the route does not fit the app (its mode is looked up again before the next message).
WRONG_ROUTE = frozenset({"not_chat_app", "not_workflow_app", "app_unavailable"})


@dataclass(slots=True)
class App:
    """What `GET /info` and `GET /parameters` told about the app."""

    mode: str = "chat"  # chat | agent-chat | advanced-chat | agent | workflow | completion
    name: str = ""
    variables: tuple[str, ...] = ()  # the inputs it declares (it drops any other)
    max_length: dict[str, int] = field(default_factory=dict)  # text variables' length limits
    required: tuple[str, ...] = ()  # variables the app refuses to run without


class DifyBackend(HttpBackend):
    keeps_history = True

    def __init__(self, cfg: ModelConfig, session: aiohttp.ClientSession, metrics: Metrics) -> None:
        super().__init__(cfg, session, metrics)
        self.name = "dify"  # `[model] model` means nothing to a Dify app: its app decides
        self._base = cfg.base_url.rstrip("/")
        # Relative file URLs are under the base URL without its API prefix (§4.3 message_file).
        self._files_base = self._base.removesuffix("/v1")
        self._app: App | None = None
        self._learn_after = 0.0
        self._learning = asyncio.Lock()
        # Answers streaming now: id(completion) -> (user, stop path template), for `stop`.
        self._running: dict[int, tuple[str, str]] = {}

    # -- the app ------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._app.mode if self._app is not None else "chat"

    async def _get(
        self, path: str, key: str | None, params: Mapping[str, str] | None = None, missing_ok: bool = False
    ) -> dict[str, Any] | None:
        """The JSON object Dify answers `GET {base_url}{path}` with; None for a 404 if `missing_ok`."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        timeout = aiohttp.ClientTimeout(total=min(self.cfg.total_timeout, 30.0), sock_connect=self.cfg.connect_timeout)
        url = self._base + path
        try:
            async with self._session.get(url, headers=headers, params=params, timeout=timeout) as resp:
                if resp.status == 404 and missing_ok and resp.content_type == "application/json":
                    return None
                if resp.status != 200:
                    await self._refused(resp, key)
                raw = await resp.read()
                if resp.content_type != "application/json":
                    why = f"GET {path} answered {resp.content_type or 'no content type'}, not Dify's JSON"
                    raise ModelError(f"{why}: base_url should be the app API's, usually ending in /v1", "bad_response")
        except TimeoutError as e:
            raise ModelError(f"Dify did not answer GET {path} in time", "timeout", True) from e
        except aiohttp.ClientError as e:
            raise ModelError(f"Dify unreachable: {type(e).__name__}", "connection", True) from e
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ModelError(f"Dify sent unreadable JSON for GET {path}", "bad_response") from e
        if not isinstance(body, dict):
            raise ModelError(f"Dify sent unreadable JSON for GET {path}", "bad_response")
        return body

    async def _look(self, key: str | None) -> App:
        """The app's mode and form. A Dify from before `/info` answers it 404: a chat-family app."""
        app = App()
        info = await self._get("/info", key, missing_ok=True)
        if info is not None:
            app.mode = _text(info.get("mode")) or "chat"
            app.name = _text(info.get("name"))
        parameters = await self._get("/parameters", key, {"user": "botgate"})
        form = parameters.get("user_input_form") if parameters is not None else None
        variables: list[str] = []
        required: list[str] = []
        for entry in form if isinstance(form, list) else []:
            for kind, spec in entry.items() if isinstance(entry, dict) else ():
                if not isinstance(spec, dict) or not isinstance(spec.get("variable"), str):
                    continue
                name = spec["variable"]
                variables.append(name)
                limit = spec.get("max_length")
                if kind in ("text-input", "paragraph") and isinstance(limit, int) and limit > 0:
                    app.max_length[name] = limit
                if spec.get("required"):
                    required.append(name)
        app.variables, app.required = tuple(variables), tuple(required)
        return app

    async def _learn(self) -> None:
        """Look at the app once (again after a failure, at most every `RELEARN_AFTER` seconds).
        A failed look leaves the chat route and the values uncut: the message still goes."""
        if self._app is not None or time.monotonic() < self._learn_after:
            return
        async with self._learning:
            if self._app is not None or time.monotonic() < self._learn_after:
                return
            try:
                self._app = await self._look(self._keys.pick())
            except ModelError as e:
                self._learn_after = time.monotonic() + RELEARN_AFTER
                log.warning("could not look at the Dify app: %s", e, extra={"backend": self.name})

    async def probe(self) -> str:
        """`GET /info` and `GET /parameters`: the base URL and the key work, no message is sent."""
        app = await self._look(self._keys.pick())
        self._app = app
        given = {*IDENTITY, *self.cfg.inputs}
        if app.mode not in CHAT_MODES:
            if QUERY_INPUT not in app.variables:
                why = f"a {app.mode} app gets the message in its input {QUERY_INPUT!r}, which this app does not declare"
                raise ModelError(why, "bad_request")
            given.add(QUERY_INPUT)
        missing = [name for name in app.required if name not in given]
        if missing:
            names = ", ".join(missing)
            raise ModelError(f"the Dify app requires inputs botgate does not send: {names}", "bad_request")
        named = f"the app {app.name!r}" if app.name else "the app"
        return f"reached {named} ({app.mode}) with the key; no message sent"

    # -- the call ---------------------------------------------------------------------------------------
    async def stream(self, request: BackendRequest, completion: Completion) -> AsyncGenerator[Delta, None]:
        await self._learn()
        stop = STOP_ROUTES.get(self.mode, "/chat-messages/{}/stop")
        self._running[id(completion)] = (_user(request), stop)
        try:
            async with aclosing(super().stream(request, completion)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            self._running.pop(id(completion), None)

    def _inputs(self, request: BackendRequest) -> dict[str, str]:
        who = (request.user, request.sender_name, request.platform, request.conversation_id)
        values = dict(zip(IDENTITY, who, strict=True))
        values = {name: value for name, value in values.items() if value}  # none: the app's default
        values.update(self.cfg.inputs)
        if self.mode not in CHAT_MODES:
            values[QUERY_INPUT] = request.text
        limits = self._app.max_length if self._app is not None else {}
        # Dify refuses a value longer than its variable's max_length instead of cutting it (§3).
        return {name: value[: limits[name]] if name in limits else value for name, value in values.items()}

    def _call(self, request: BackendRequest, key: str | None) -> Call:
        mode = self.mode
        body: dict[str, Any] = {
            "inputs": self._inputs(request),
            "user": _user(request),
            "response_mode": "streaming",
            "files": [],
        }
        if mode in CHAT_MODES:
            body["query"] = request.text
            body["conversation_id"] = request.session or ""
            body["auto_generate_name"] = False  # else another LLM call names every conversation
        elif mode == "completion":
            body["query"] = request.text
        return Call(self._base + ROUTES.get(mode, "/chat-messages"), body)

    async def _refused(self, resp: aiohttp.ClientResponse, key: str | None) -> NoReturn:
        """Dify's envelope {"code", "message", "status"} (§7); nginx's HTML pages in front of a
        self-hosted Dify have none."""
        status = resp.status
        raw = await resp.read()
        code, message = _envelope(raw)
        said = f"{status} {code}: {message}" if code else f"{status}: {_gist(raw, resp.content_type)}"
        wait = retry_after(resp.headers)
        if status == 404 and "conversation not exists" in message.lower():
            raise ModelError(f"Dify no longer knows the conversation ({said})", "conversation_gone")
        if code == "conversation_completed":
            raise ModelError(f"Dify ended the conversation ({said})", "conversation_gone")
        if status in (401, 403):
            self._keys.bench(key)
            raise ModelError(f"Dify refused the API key ({said})", "auth", len(self._keys) > 1)
        if status == 429:
            self._keys.bench(key, wait)
            # too_many_requests: the app's concurrency ceiling, worth a retry; rate_limit_error: a
            # Dify Cloud plan quota, which only the quota period clears.
            again = code != "rate_limit_error"
            raise ModelError(f"Dify is rate limiting ({said})", "rate_limited", again, wait)
        if status >= 500:
            raise ModelError(f"Dify error ({said})", "server_error", True, wait)
        if code in WRONG_ROUTE:
            self._app = None  # looked at again before the next message
            self._learn_after = 0.0
        raise ModelError(f"Dify rejected the request ({said})", "bad_request")

    async def _read(self, resp: aiohttp.ClientResponse, completion: Completion) -> AsyncGenerator[Delta, None]:
        reading = _Stream(completion, self._files_base, self.cfg.sources)
        async for event in read_events(resp.content.iter_any()):
            completion.last_byte_at = time.monotonic()
            for delta in reading.feed(event.data):
                if completion.first_byte_at is None:
                    completion.first_byte_at = completion.last_byte_at
                yield delta
        for delta in reading.end():
            yield delta

    async def stop(self, completion: Completion) -> None:
        """Dify's stop API (§4.6), as the user who asked: Dify then ends the stream the way it ends
        a complete answer (`message_end`). A finished answer has nothing to stop, nor one whose
        first event (which names its task) has not come yet."""
        running = self._running.get(id(completion))
        if running is None or not completion.task_id:
            return
        user, path = running
        key = self._keys.pick()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        timeout = aiohttp.ClientTimeout(total=10.0, sock_connect=self.cfg.connect_timeout)
        url = self._base + path.format(completion.task_id)
        try:
            async with self._session.post(url, json={"user": user}, headers=headers, timeout=timeout) as resp:
                if resp.status != 200:
                    code, message = _envelope(await resp.read())
                    log.warning("Dify refused to stop an answer: %s %s %s", resp.status, code, message)
        except (TimeoutError, aiohttp.ClientError) as e:
            log.warning("could not ask Dify to stop an answer: %s", type(e).__name__)


class _Stream:
    """One answer's events (§4.3, §4.4) turned into deltas."""

    def __init__(self, completion: Completion, files_base: str, sources: bool) -> None:
        self._completion = completion
        self._files_base = files_base
        self._sources = sources
        self._done = False  # the terminal event came
        self._text = False  # some answer text came
        self._agent = False  # agent_message deltas came: a closing `message` is the whole answer
        self._legacy = False  # inside an old Dify's <details> thinking block

    def feed(self, data: str) -> list[Delta]:
        """The deltas of one event; its name is inside the JSON (§4.1)."""
        data = data.strip()
        if not data:
            return []  # `event: ping`: a keep-alive, nothing of the answer
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise ModelError(MALFORMED, "bad_response") from e
        if not isinstance(event, dict):
            raise ModelError(MALFORMED, "bad_response")
        self._note_ids(event)
        kind = event.get("event")
        body = event.get("data")
        body = body if isinstance(body, dict) else {}
        if kind == "error":
            raise _stream_error(event)
        if kind in ("message", "agent_message"):
            answer = _text(event.get("answer"))
            if kind == "agent_message":
                self._agent = True
            elif self._agent:  # the New Agent's closing message: the complete answer, not a delta
                return [Delta(DeltaKind.REPLACE, self._unwrap_all(answer))]
            return self._answer(answer)
        if kind == "text_chunk":  # a workflow app's answer
            return self._answer(_text(body.get("text")))
        if kind == "message_replace":  # output moderation: the whole answer from now on
            self._text = True
            return [Delta(DeltaKind.REPLACE, self._unwrap_all(_text(event.get("answer"))))]
        if kind == "reasoning_chunk":
            thought = _text(body.get("reasoning"))
            return [Delta(DeltaKind.REASONING, thought)] if thought else []
        if kind == "message_file":
            url = self._file_url(event)
            if not url:
                return []
            if event.get("type") == "image":
                return [Delta(DeltaKind.IMAGE, url)]
            # A generated document (or other file): no name in the event, the URL's last segment has one.
            name = unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or "file"
            return [Delta(DeltaKind.FILE, url, name=name)]
        if kind == "message_end":
            self._done = True
            metadata = event.get("metadata")
            metadata = metadata if isinstance(metadata, dict) else {}
            self._note_usage(metadata.get("usage"))
            found = _sources(metadata.get("retriever_resources")) if self._sources else ()
            return [Delta(DeltaKind.SOURCES, sources=found)] if found else []
        if kind == "workflow_finished":
            return self._finished(body)
        return []  # agent_thought, workflow_started, node_*, tts_*, and whatever comes next

    def end(self) -> list[Delta]:
        if not self._done:
            # A worker killed, a proxy's timeout: whatever came is not the whole answer (§4.5).
            raise ModelError("Dify's stream ended before its final event: the answer is incomplete", "connection", True)
        return []

    def _note_ids(self, event: dict[str, Any]) -> None:
        conversation = event.get("conversation_id")
        if isinstance(conversation, str) and conversation:
            # Saved from the first event: the conversation exists before the answer does (§6).
            self._completion.session = conversation
        task = event.get("task_id")
        if isinstance(task, str) and task:
            self._completion.task_id = task

    def _note_usage(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        for name in ("prompt_tokens", "completion_tokens"):
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self._completion.usage, name, value)

    def _answer(self, text: str) -> list[Delta]:
        if not text:
            return []
        text = self._unwrap(text)
        if text.strip():
            self._text = True
        return [Delta(DeltaKind.ANSWER, text)]

    def _unwrap(self, text: str) -> str:
        """An old Dify's `<details …><summary> Thinking... </summary>` … `</details>` chunks as the
        `<think>` tags the reasoning splitter knows (they come before any answer text)."""
        if not self._legacy and not self._text:
            opened = LEGACY_OPEN.match(text)
            if opened is not None:
                self._legacy = True
                text = "<think>\n" + text[opened.end() :]
        if self._legacy and LEGACY_CLOSE in text:
            self._legacy = False
            text = text.replace(LEGACY_CLOSE, "</think>", 1)
        return text

    def _unwrap_all(self, text: str) -> str:
        """A whole answer (a replacement) with the legacy block mapped the same way."""
        opened = LEGACY_OPEN.match(text)
        if opened is None:
            return text
        rest = text[opened.end() :]
        return "<think>\n" + rest.replace(LEGACY_CLOSE, "</think>", 1)

    def _file_url(self, event: dict[str, Any]) -> str:
        if event.get("belongs_to", "assistant") != "assistant":
            return ""
        url = _text(event.get("url")).strip()
        if url.startswith("/"):
            url = self._files_base + url  # self-hosted Dify sends the path alone
        return url if url.startswith(("https://", "http://")) else ""

    def _finished(self, body: dict[str, Any]) -> list[Delta]:
        status = body.get("status")
        if status == "failed":
            error = _text(body.get("error")) or "no reason given"
            raise ModelError(f"Dify's workflow run failed: {error[:200]}", "server_error")
        self._done = True
        outputs = body.get("outputs")
        if status == "stopped" or self._text or not isinstance(outputs, dict):
            return []
        # A workflow that streamed nothing (no text_chunk, or an answer node that never streams).
        return self._answer(_output(outputs))


def _user(request: BackendRequest) -> str:
    """Dify's end user: the sender, or in a group whose context its members share, the group.
    A Dify conversation belongs to the user who started it (another user's id is a 404, §6), so a
    shared one needs one user; who is speaking is in the query ("<name>: …") and `sender_id`."""
    if request.shared:
        return f"{request.platform}:group:{request.conversation_id}"
    return request.user


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _output(outputs: dict[str, Any]) -> str:
    for key in OUTPUT_KEYS:
        if isinstance(outputs.get(key), str):
            return str(outputs[key])
    texts = [v for v in outputs.values() if isinstance(v, str)]
    return texts[0] if len(texts) == 1 else ""


def _stream_error(event: dict[str, Any]) -> ModelError:
    """An `error` event (§4.5): the HTTP status stayed 200, the event says what went wrong."""
    code = _text(event.get("code")) or "error"
    message = _text(event.get("message"))[:200]
    status = event.get("status")
    said = f"Dify error in the stream ({status} {code}): {message}"
    if code in ("invalid_param", "bad_request"):
        return ModelError(said, "bad_request")
    return ModelError(said, "server_error", isinstance(status, int) and status >= 500)


def _sources(resources: object) -> tuple[Source, ...]:
    """`retriever_resources` as the documents they came from: one per document, in Dify's order."""
    out: list[Source] = []
    for item in resources if isinstance(resources, list) else []:
        if not isinstance(item, dict):
            continue
        title = _text(item.get("document_name")) or _text(item.get("dataset_name"))
        if not title.strip():
            continue
        meta = item.get("doc_metadata")
        meta = meta if isinstance(meta, dict) else {}
        url = next(
            (
                u
                for u in (item.get("url"), item.get("source_url"), meta.get("url"), meta.get("source_url"))
                if isinstance(u, str) and u.startswith(("https://", "http://"))
            ),
            "",
        )
        source = Source(" ".join(title.split()), url)
        if source not in out:
            out.append(source)
    return tuple(out)


def _envelope(raw: bytes) -> tuple[str, str]:
    """(code, message) of Dify's error body; ("", "") when it is not one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    return _text(body.get("code")), _text(body.get("message"))[:200]


def _gist(raw: bytes, content_type: str) -> str:
    if content_type == "text/html":
        title = re.search(rb"<title>([^<]{0,100})</title>", raw, re.IGNORECASE)
        page = title.group(1).decode("utf-8", "replace").strip() if title else "a page"
        return f"an HTML page ({page}) from a proxy in front of Dify"
    return raw[:200].decode("utf-8", "replace")
