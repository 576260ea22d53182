"""A backend that keeps the history itself (`Backend.keeps_history`, as Dify and Coze do): the shared
HTTP machinery asks once more without a conversation the backend lost, and the answer path sends
only the new text, keeps the backend's conversation id per conversation (not turns, not the cache)
and forgets it on /reset. The backend is a minimal provider on `HttpBackend` against a local server."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import aiohttp
import pytest
from aiohttp import web

from gateway.backends import BackendRequest, Completion, Delta, DeltaKind
from gateway.backends.http import Call, HttpBackend
from gateway.errors import ModelError
from gateway.messages import ConversationKind, InboundMessage, Reply
from gateway.metrics import Metrics
from gateway.responder import Responder
from gateway.store import MemoryStore
from tests.conftest import make_config


@dataclass
class ConversationServer:
    """Answers `POST /chat {"query", "conversation", "user"}`; "" starts a conversation, an id it does
    not know gets 404 (like Dify's "Conversation Not Exists.")."""

    known: set[str] = field(default_factory=set)
    asked: list[dict[str, Any]] = field(default_factory=list)
    forgetful: bool = False  # every conversation, a new one too, is gone at once

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/chat", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.asked.append(body)
        conversation = body["conversation"]
        if self.forgetful or (conversation and conversation not in self.known):
            return web.json_response({"code": "not_found"}, status=404)
        if not conversation:
            conversation = f"c{len(self.known) + 1}"
            self.known.add(conversation)
        return web.json_response({"conversation": conversation, "answer": f"you said {body['query']}"})


class Conversations(HttpBackend):
    keeps_history = True

    def _call(self, request: BackendRequest, key: str | None) -> Call:
        body = {"query": request.text, "conversation": request.session or "", "user": request.user}
        body["context"] = request.context
        return Call(self.cfg.base_url + "/chat", body)

    async def _refused(self, resp: aiohttp.ClientResponse, key: str | None) -> NoReturn:
        if resp.status == 404:
            raise ModelError("conversation not found", "conversation_gone")
        await super()._refused(resp, key)

    async def _read(self, resp: aiohttp.ClientResponse, completion: Completion) -> AsyncGenerator[Delta, None]:
        body = await resp.json()
        completion.session = body["conversation"]
        completion.first_byte_at = completion.last_byte_at = time.monotonic()
        yield Delta(DeltaKind.ANSWER, body["answer"])


@pytest.fixture
async def server(aiohttp_server: Callable[..., Any]) -> tuple[ConversationServer, str]:
    double = ConversationServer()
    return double, str((await aiohttp_server(double.app())).make_url("")).rstrip("/")


@pytest.fixture
async def backend(server: tuple[ConversationServer, str]) -> Any:
    async with aiohttp.ClientSession() as session:
        yield Conversations(make_config(model={"base_url": server[1]}).model, session, Metrics())


class RecordingChannel:
    """A Channel without streaming that keeps what it was asked to send."""

    platform = "web"

    def __init__(self) -> None:
        self.sent: list[Reply] = []

    async def send(self, reply: Reply) -> None:
        self.sent.append(reply)

    async def open_stream(self, message: InboundMessage) -> None:
        return None


def message(text: str, n: int) -> InboundMessage:
    return InboundMessage(
        platform="web",
        transport="websocket",
        conversation_id="c-web",
        conversation_kind=ConversationKind.DM,
        sender_id="u1",
        sender_name="Ann",
        text=text,
        mentioned=True,
        message_id=f"m{n}",
    )


async def test_a_conversation_the_backend_lost_is_asked_once_more_as_a_new_one(
    server: tuple[ConversationServer, str], backend: Conversations
) -> None:
    double, _ = server
    lost = BackendRequest([], "hi", "dingtalk:staff1", session="gone")
    completion = Completion(session="gone")
    deltas = [d.text async for d in backend.stream(lost, completion)]
    assert (deltas, completion.session) == (["you said hi"], "c1")
    assert [a["conversation"] for a in double.asked] == ["gone", ""]
    double.forgetful = True
    with pytest.raises(ModelError) as err:  # gone again as a new one: asked once more only
        async for _ in backend.stream(BackendRequest([], "hi", "u", session="c1"), Completion()):
            pass
    assert err.value.reason == "conversation_gone"
    assert [a["conversation"] for a in double.asked[2:]] == ["c1", ""]


async def test_the_answer_path_sends_the_text_and_keeps_the_backends_conversation(
    server: tuple[ConversationServer, str], backend: Conversations
) -> None:
    double, _ = server
    store, channel = MemoryStore(), RecordingChannel()
    responder = Responder(make_config(), store, backend, {"web/default": channel}, Metrics())  # type: ignore[dict-item]
    key = message("", 0).conversation_key
    for n, text in enumerate(["hi", "hi", "/reset", "hi"]):
        await responder.handle(message(text, n), time.time())
    assert [r.text for r in channel.sent][:2] == ["you said hi", "you said hi"]  # asked twice: no cache
    assert [(a["query"], a["conversation"], a["user"]) for a in double.asked] == [
        ("hi", "", "web:u1"),
        ("hi", "c1", "web:u1"),  # the same conversation, only the new text
        ("hi", "", "web:u1"),  # /reset forgot it
    ]
    assert {a["context"] for a in double.asked} == {key}
    assert await store.backend_session(key) == "c2"
    assert await store.context(key) == []  # no turns: the backend keeps them
