"""One message being answered (`Exchange`), the `Step` the responder runs it through, and the
reply delivery every step shares (`Delivery`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from .backends import Backend, BackendRequest, Completion, Message
from .budget import CallCount
from .channel import Channel, ReplyStream
from .config import DEFAULT_NAME, Config
from .draft import Draft
from .errors import PlatformError
from .i18n import N_, translator
from .messages import Attachment, ConversationKind, InboundMessage, Reply, ReplyKind
from .metrics import Metrics, Outcome
from .store import Turn

# Every step logs as the responder, so log queries by logger keep working whichever step it is.
log = logging.getLogger("gateway.responder")

MEMBER = N_("member")  # a group speaker whose display name the platform did not send
SPEAKER_CHARS = 32
# Whatever could make a name look like the end of the speaker prefix or a new line of the turn.
_NOT_IN_NAME = re.compile(r"[\s:：\x00-\x1f\x7f\u2028\u2029]+")


def speaker(message: InboundMessage) -> str:
    """Who wrote a group message, as the model sees it: the display name when the platform sent
    one (DingTalk's senderNick), else "member" in its language ("成员") plus the end of the sender
    id (Feishu sends no name)."""
    name = _NOT_IN_NAME.sub(" ", message.sender_name).strip()[:SPEAKER_CHARS].strip()
    if name:
        return name
    short = _NOT_IN_NAME.sub("", message.sender_id)[-6:]
    member = translator(message.locale)(MEMBER)
    return f"{member}-{short}" if short else member


class Flow(Enum):
    CONTINUE = "continue"  # on to the next step
    DONE = "done"  # the user has been answered or told why not: no further step runs


@dataclass(slots=True)
class Exchange:
    """One message being answered, filled in by the steps in turn."""

    message: InboundMessage
    ready_at: float  # see the dispatcher's `Responder.handle`
    # As at the message's start: a reload applies from the next message on.
    cfg: Config
    model: Backend
    text: str  # what the user wrote, stripped: their remembered turn
    question: str  # the text the model is asked
    completion: Completion
    history: list[Turn] = field(default_factory=list)
    parts: list[dict[str, object]] = field(default_factory=list)  # non-text content for the model
    prefix: str = ""  # a note in front of the answer
    prompt: list[Message] = field(default_factory=list)
    cache_key: str | None = None  # None: not cached
    answer: str | None = None  # set by the step that delivered it
    # The model's answer as it came (ModelAnswer's; None from the cache): what `gateway.images_out` sends.
    draft: Draft | None = None
    cached: bool = False
    # The billable platform API calls answering it cost (`gateway.budget.counting`).
    api_calls: CallCount = field(default_factory=CallCount)
    # "" in a DM; in a group, who wrote it: every user turn there is "<speaker>: <text>".
    speaker: str = ""
    agent: str = DEFAULT_NAME  # the `[[agents]]` entry answering it (its model is `cfg.model`)
    # Where its context is kept: the conversation's, or in a `per_user` agent's group the sender's own.
    context_key: str = ""
    # For a backend that keeps the history (`Backend.keeps_history`): its conversation id, kept
    # under `context_key` from its last answer (None: a new conversation).
    session: str | None = None

    @classmethod
    def start(
        cls,
        message: InboundMessage,
        ready_at: float,
        cfg: Config,
        model: Backend,
        agent: str = DEFAULT_NAME,
        per_user: bool = False,
    ) -> Exchange:
        text = message.text.strip()
        exchange = cls(message, ready_at, cfg, model, text, text, Completion(model=model.name), agent=agent)
        exchange.context_key = message.conversation_key
        if message.conversation_kind is ConversationKind.GROUP:
            exchange.speaker = speaker(message)
            if per_user:
                exchange.context_key = f"{message.conversation_key}:user:{message.sender_id}"
        return exchange

    def user_turn(self, text: str) -> str:
        """A user turn as the model sees and the context keeps it: in a group, with its speaker,
        so one member's words are never taken for another's (or for the operator's)."""
        return f"{self.speaker}: {text}" if self.speaker else text

    def request(self) -> BackendRequest:
        """What the backend is asked."""
        m = self.message
        text = self.user_turn(self.question)
        shared = m.conversation_kind is ConversationKind.GROUP and self.context_key == m.conversation_key
        return BackendRequest(
            self.prompt, text, m.user_key, m.sender_name, m.platform, m.conversation_id, self.context_key, self.session,
            shared=shared, locale=m.locale,
        )

    @property
    def command(self) -> str:
        """`/name` (lower case) when the text starts with one, else ""."""
        return self.text.split(maxsplit=1)[0].lower() if self.text.startswith("/") else ""

    @property
    def images(self) -> list[Attachment]:
        return [a for a in self.message.attachments if a.kind == "image"]


class Step(Protocol):
    async def __call__(self, exchange: Exchange) -> Flow: ...


class Delivery:
    """Replies through the message's channel, each counted in the reply metrics.

    Keeps the streams cut off mid-answer (deadline, failure), by request id: a later notice for
    that message then finishes the stream instead of arriving as a second message next to a stuck
    card. Only streams cut off by shutdown stay here, and they go with the process."""

    def __init__(self, channels: Mapping[str, Channel], metrics: Metrics) -> None:
        self._channels = channels
        self._metrics = metrics
        self._interrupted: dict[str, ReplyStream] = {}

    def channel(self, message: InboundMessage) -> Channel:
        return self._channels[message.channel_key]

    def cut_off(self, message: InboundMessage, stream: ReplyStream) -> None:
        self._interrupted[message.request_id] = stream

    async def notify(self, message: InboundMessage, text: str, outcome: Outcome = Outcome.NOTICE) -> None:
        stream = self._interrupted.pop(message.request_id, None)
        if stream is not None:
            await self.finish(stream, message, text, outcome)
        else:
            await self.send(Reply(message, text, ReplyKind.NOTICE), outcome)

    async def fail(self, message: InboundMessage, stream: ReplyStream | None, notice: str) -> None:
        """Tell the user the answer failed. An open stream (a card already shown) gets the notice
        as its final text, so the user sees one message, not a stuck card plus a second one."""
        if stream is not None:
            await self.finish(stream, message, notice, Outcome.MODEL_ERROR)
        else:
            await self.send(Reply(message, notice, ReplyKind.NOTICE), Outcome.MODEL_ERROR)

    async def send(self, reply: Reply, outcome: Outcome) -> None:
        try:
            await self.channel(reply.to).send(reply)
        except PlatformError:
            self._metrics.reply(reply.to.platform, Outcome.FAILED)
            raise
        self._metrics.reply(reply.to.platform, outcome)

    async def finish(self, stream: ReplyStream, message: InboundMessage, text: str, outcome: Outcome) -> None:
        try:
            await stream.finish(text)
        except PlatformError:
            self._metrics.reply(message.platform, Outcome.FAILED)
            raise
        self._metrics.reply(message.platform, outcome)


def fields(message: InboundMessage) -> dict[str, object]:
    return {"request_id": message.request_id, "user_id": message.user_key}
