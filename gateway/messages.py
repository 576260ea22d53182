"""The normalized message types every adapter converts to and from; the core sees nothing else."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .i18n import Locale

DEFAULT_BOT = "default"  # a single-app platform section's bot; the web chat's

# Request ids count up from a random 64-bit start drawn from the OS for each process (and again in a
# forked child): unique within a process, and two processes sharing a store would need their runs of
# ids to overlap, about (messages of both) / 2**64. Not `uuid4`, which took 3.5 µs a message (the
# UUID object) and scattered the SQLite inbox's request_id index over random pages: consecutive
# ids land on the same index page, ~5 µs less SQLite work a message in a group commit. The price:
# two refs of one process, quoted in notices, tell how many messages it took in between. Ids are
# not secrets.
_MASK = (1 << 64) - 1
_next_id = itertools.count(int.from_bytes(os.urandom(8))).__next__


def _reseed() -> None:
    global _next_id
    _next_id = itertools.count(int.from_bytes(os.urandom(8))).__next__


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    """16 hex digits, unique for every message this process takes in (0.4 µs)."""
    return f"{_next_id() & _MASK:016x}"


class ConversationKind(StrEnum):
    DM = "dm"
    GROUP = "group"


@dataclass(frozen=True, slots=True)
class Attachment:
    """A non-text part of a message. `ref` is whatever the adapter needs to fetch it later
    (DingTalk download code, Feishu file key); nothing is downloaded before the ACK."""

    kind: str  # "image" | "file" | "audio" | "video" | "sticker" | ...
    ref: str
    name: str = ""
    # The message it belongs to when that is not the message itself (a quoted one): Feishu
    # downloads a resource under the id of the message that carries it.
    source: str = ""

    def to_dict(self) -> dict[str, str]:
        data = {"kind": self.kind, "ref": self.ref, "name": self.name}
        if self.source:
            data["source"] = self.source
        return data


@dataclass(frozen=True, slots=True)
class Quote:
    """The message a reply quotes. Complete from the payload (DingTalk `repliedMsg`), or only its
    `ref` until the adapter fetches it (`fetch(message, Attachment(QUOTE, ref))`, Feishu
    `parent_id`). Its attachments (a quoted picture or file) are handled like sent ones."""

    ref: str = ""  # the quoted message's id; while `pending`, the adapter fetches it by this
    pending: bool = False  # not fetched yet
    sender: str = ""  # the author as the model is told: a name, "you" (the bot), "" unknown
    kind: str = "text"  # the quoted message's type on its platform
    text: str = ""
    attachments: tuple[Attachment, ...] = ()
    unreadable: bool = False  # a card (or other message) whose content the bot cannot read
    failed: bool = False  # it could not be fetched: answered without it
    inner: Quote | None = None  # the message it quotes in turn (one level deep, no further)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "pending": self.pending,
            "sender": self.sender,
            "kind": self.kind,
            "text": self.text,
            "attachments": [a.to_dict() for a in self.attachments],
            "unreadable": self.unreadable,
            "failed": self.failed,
            "inner": self.inner.to_dict() if self.inner is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Quote:
        data = dict(data)
        data["attachments"] = tuple(Attachment(**a) for a in data.get("attachments", ()))
        inner = data.get("inner")
        data["inner"] = cls.from_dict(inner) if isinstance(inner, dict) else None
        return cls(**data)


QUOTE = "quote"  # the `Attachment.kind` an adapter's `fetch` answers with the quoted message
QUOTE_MIME = "application/vnd.botgate.quote+json"  # ... as `Quote.to_dict()` JSON


@dataclass(frozen=True, slots=True)
class InboundMessage:
    platform: str  # "dingtalk" | "feishu" | "web"
    transport: str  # "stream" | "ws" | "webhook" | "websocket"
    conversation_id: str
    conversation_kind: ConversationKind
    sender_id: str
    sender_name: str
    text: str
    mentioned: bool
    message_id: str
    # JSON-serializable, adapter-specific data needed to answer (session webhook and its expiry,
    # message id to reply under, ...). It is persisted with the message in the inbox.
    reply_handle: dict[str, Any] = field(default_factory=dict)
    attachments: tuple[Attachment, ...] = ()
    # Set by the adapter when it already knows the answer must be a notice (unsupported type).
    unsupported: str = ""
    # When the gateway received it (wall clock), not the platform's send time: latency and
    # gateway overhead are measured from here.
    created_at: float = field(default_factory=time.time)
    request_id: str = field(default_factory=new_request_id)
    # The bot (app) of its platform that received it: replies leave through that bot.
    bot: str = DEFAULT_BOT
    # The language its notices are worded in (`gateway.i18n.locale_for`), chosen at intake by the
    # adapter; None until then, and in entries stored before messages carried one: the default.
    locale: Locale | None = None
    # The message this one replies to (quotes), if any.
    quote: Quote | None = None

    @property
    def channel_key(self) -> str:
        """The channel that received it and answers it: "<platform>/<bot>"."""
        return f"{self.platform}/{self.bot}"

    @property
    def _scope(self) -> str:
        # The default bot keeps the keys of a single-app gateway (stored state stays valid); another
        # bot has its own: two bots in one group are two conversations, each with its own dedup.
        return self.platform if self.bot == DEFAULT_BOT else self.channel_key

    @property
    def conversation_key(self) -> str:
        return f"{self._scope}:{self.conversation_id}"

    @property
    def user_key(self) -> str:
        return f"{self.platform}:{self.sender_id}"

    @property
    def dedup_key(self) -> str:
        return f"{self._scope}:{self.message_id}"

    def to_dict(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies recursively and took 24-34 µs per message, a
        # tenth of SQLite intake. reply_handle is copied one level deep, as the adapters build it.
        return {
            "platform": self.platform,
            "transport": self.transport,
            "conversation_id": self.conversation_id,
            "conversation_kind": self.conversation_kind,
            "sender_id": self.sender_id,
            "sender_name": self.sender_name,
            "text": self.text,
            "mentioned": self.mentioned,
            "message_id": self.message_id,
            "reply_handle": dict(self.reply_handle),
            "attachments": [a.to_dict() for a in self.attachments],
            "unsupported": self.unsupported,
            "created_at": self.created_at,
            "request_id": self.request_id,
            "bot": self.bot,
            "locale": self.locale,
            **({"quote": self.quote.to_dict()} if self.quote is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InboundMessage:
        data = dict(data)
        data["conversation_kind"] = ConversationKind(data["conversation_kind"])
        data["attachments"] = tuple(Attachment(**a) for a in data.get("attachments", ()))
        data["locale"] = Locale.of(data["locale"]) if data.get("locale") else None
        quote = data.get("quote")
        data["quote"] = Quote.from_dict(quote) if isinstance(quote, dict) else None
        return cls(**data)


class ReplyKind(StrEnum):
    ANSWER = "answer"  # the model's answer
    NOTICE = "notice"  # busy / apology / help / unsupported: short, never streamed


@dataclass(frozen=True, slots=True)
class Reply:
    """One outbound reply to `to`, in Markdown. Adapters render and split it for their platform."""

    to: InboundMessage
    text: str
    kind: ReplyKind = ReplyKind.ANSWER
