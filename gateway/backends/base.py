"""The seam between the answer step and an answer backend: what it is asked (`BackendRequest`),
what it streams (`Delta`), what it reports (`Completion`), and the `Backend` protocol itself.

A backend turns one request into a stream of deltas and raises `gateway.errors.ModelError` with a
bounded `reason` when it fails (see `ModelError`). It never sees a platform: whatever a backend
needs to know about the sender is in the request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from ..i18n import Locale

Message = dict[str, Any]  # one OpenAI chat message


@dataclass(frozen=True, slots=True)
class BackendRequest:
    """One question to a backend."""

    # OpenAI-format messages: the system prompt, the kept history, the question (with any images).
    messages: list[Message]
    # The question alone, as the user turn reads ("<speaker>: ..." in a group): what a backend
    # that keeps the history itself (`Backend.keeps_history`) is sent instead of `messages`.
    text: str
    user: str  # the platform user key, e.g. "dingtalk:<staffId>", "feishu:<open_id>", "web:<session>"
    sender_name: str = ""  # the display name the platform sent ("" when none, as on Feishu)
    platform: str = ""  # "dingtalk" | "feishu" | "web"
    conversation_id: str = ""  # the platform's conversation id
    # botgate's key of this context ("<platform>:<conversation>", a member's own in a `per_user`
    # agent's group): a stable conversation id for a backend that takes one from us (FastGPT's chatId).
    context: str = ""
    # The backend's own conversation id kept from an earlier answer (`Completion.session`), or None.
    session: str | None = None
    # True: `context` is a group's, shared by its members (not one member's, as a `per_user` agent's
    # is): a backend whose conversations belong to one user (Dify) needs a user of the group's own.
    shared: bool = False
    # The message's language (`InboundMessage.locale`; None: the default): a backend's own texts (echo's).
    locale: Locale | None = None


class DeltaKind(StrEnum):
    ANSWER = "answer"  # more answer text; may hold inline <think>…</think> (`gateway.reasoning`)
    REASONING = "reasoning"  # more of the model's thinking, from a field of its own
    REPLACE = "replace"  # `text` replaces the whole answer so far (Dify's message_replace)
    IMAGE = "image"  # the answer shows an image: `text` is its URL
    FILE = "file"  # the answer comes with a generated file: `text` is its URL, `name` its file name
    SOURCES = "sources"  # where the answer came from: `sources`


@dataclass(frozen=True, slots=True)
class Source:
    """One document an answer was drawn from (a knowledge-base hit)."""

    title: str
    url: str = ""


@dataclass(frozen=True, slots=True)
class Delta:
    kind: DeltaKind
    text: str = ""
    sources: tuple[Source, ...] = ()
    name: str = ""  # a FILE's file name


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
    # The backend's conversation id for this conversation (new, or the request's), to send as
    # `BackendRequest.session` next time; None for a backend that keeps no history.
    session: str | None = None
    task_id: str = ""  # the backend's id of the running answer, to stop it (Dify's task_id, Coze's chat_id)


class Backend(Protocol):
    """What answers: an OpenAI-compatible API, a Dify/Coze/FastGPT app, the echo."""

    name: str  # the configured model or app, for logs and cache keys
    # True: the backend keeps the conversation's history itself (Dify, Coze). It is sent only
    # `BackendRequest.text` with the `session` kept from its last answer, and botgate keeps no turns.
    keeps_history: bool

    def stream(self, request: BackendRequest, completion: Completion) -> AsyncGenerator[Delta, None]:
        """Yield the answer's deltas; raise `ModelError` on failure. Callers close it
        (`contextlib.aclosing`) so an abandoned call releases its connection at once."""

    async def probe(self) -> str:
        """`doctor`'s check: the cheapest request that proves base_url and key work (no chat
        kept, no answer paid for where the provider allows). Returns what it proved, e.g.
        "answered a one-token request"; raises `ModelError`."""

    async def stop(self, completion: Completion) -> None:
        """Ask the backend to stop making the answer `completion` tracks (Dify's stop API, Coze's
        cancel), for `/stop`. Closing the stream is enough for the others: then it does nothing."""
