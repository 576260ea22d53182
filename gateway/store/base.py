"""The store interface: inbox, dedup keys, conversation context and backend sessions, model cache,
rate limits; and per-conversation leases for a store several instances share (`LeaseStore`).

Backends: `memory://` (tests, single process), `sqlite:///PATH` (default), `redis://` (several
instances). Every method may raise `StoreError`; callers decide whether that refuses the message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import orjson

from ..errors import StoreError
from ..messages import InboundMessage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Turn:
    role: str  # "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class CardRecord:
    """A streaming card on the platform that may outlive the process filling it: recorded while
    it is open, so the next start (or, on a shared store, another instance) can finish it."""

    platform: str
    bot: str
    card_id: str  # DingTalk outTrackId, Feishu CardKit card_id
    message: InboundMessage  # the message it answers
    sequence: int = 0  # Feishu: every CardKit sequence number used on the card is at most this
    text: str | None = None  # what the card is to end with, once known
    opened_at: float = 0.0  # wall clock

    @property
    def key(self) -> str:
        return f"{self.platform}:{self.bot}:{self.card_id}"

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "platform": self.platform,
                "bot": self.bot,
                "card_id": self.card_id,
                "message": self.message.to_dict(),
                "sequence": self.sequence,
                "text": self.text,
                "opened_at": self.opened_at,
            }
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> CardRecord:
        data: dict[str, Any] = orjson.loads(raw)
        data["message"] = InboundMessage.from_dict(data["message"])
        return cls(**data)


# What usage is counted by (`Store.add_usage`): each answered message adds to one subject of each.
USAGE_KINDS = ("user", "conversation", "group", "bot", "agent")


@dataclass(frozen=True, slots=True)
class UsageCount:
    """One subject's usage over a day (or the sum of several days): answered messages and tokens,
    `estimated` of the tokens being botgate's estimate (the backend reported none)."""

    messages: int = 0
    tokens: int = 0
    estimated: int = 0

    def __add__(self, other: UsageCount) -> UsageCount:
        return UsageCount(
            self.messages + other.messages, self.tokens + other.tokens, self.estimated + other.estimated
        )


# An outbox entry's states: waiting for (another) delivery attempt, delivered, given up.
QUEUED, SENT, FAILED = "queued", "sent", "failed"


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A proactive message (the send API, a schedule, an alert to a conversation) from the moment it
    is accepted (a 202: durably queued) until it is delivered or given up (gateway/outbox.py)."""

    id: str
    platform: str
    bot: str
    to_kind: str  # "conversation" (a group) | "user" (a 1:1 chat)
    to: str  # the platform's id of it: DingTalk openConversationId / staffId, Feishu chat_id / open_id
    text: str
    markdown: bool
    origin: str  # who asked, for the audit log: "token:<name>", "schedule:<name>", "alertmanager"
    created_at: float  # wall clock
    idempotency_key: str = ""  # "" = none; scoped by the caller ("<origin>:<key>")
    state: str = QUEUED
    reason: str = ""  # why it failed, or what the last failed attempt said while still queued
    attempts: int = 0
    next_at: float = 0.0  # queued: no attempt before this (wall clock)
    done_at: float | None = None  # when it was sent or given up

    @property
    def done(self) -> bool:
        return self.state != QUEUED

    def encode(self) -> bytes:
        return orjson.dumps({f: getattr(self, f) for f in self.__slots__})

    @classmethod
    def decode(cls, raw: bytes | str) -> OutboxEntry:
        return cls(**orjson.loads(raw))


class Store(Protocol):
    backend: str  # "memory" | "sqlite" | "redis"
    # True when several gateway processes may use the store at once (Redis): then it is a
    # `LeaseStore`, a conversation is answered under its lease and its pending inbox is re-read.
    # SQLite is locked to one process.
    shared: bool

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise `StoreError` unless the store is usable right now."""

    # -- dedup -----------------------------------------------------------------------------
    async def claim(self, key: str, ttl: float) -> bool:
        """Atomically mark `key` seen for `ttl` seconds; False if it already was."""

    # -- inbox: accepted but not yet answered ----------------------------------------------
    async def admit(self, message: InboundMessage, ttl: float) -> bool:
        """Claim `message.dedup_key` for `ttl` seconds and durably add the message to the inbox,
        as ONE atomic step: True when admitted, False (nothing written) when the key was already
        claimed. On `StoreError` neither happened, so the platform's redelivery is admitted later
        instead of being dropped as a duplicate of a message that never reached the inbox.
        Backends batch these into group commits."""

    async def inbox_done(self, message: InboundMessage) -> None: ...

    async def inbox_pending(self, conversation: str | None = None) -> list[InboundMessage]:
        """Messages accepted but not yet answered, oldest first: all of them (resumed at start)
        or those of one conversation (what a lease holder answers, in order)."""

    # -- conversation context ---------------------------------------------------------------
    async def context(self, conversation: str) -> list[Turn]: ...

    async def append_turns(
        self, conversation: str, turns: list[Turn], max_turns: int, max_chars: int, idle_ttl: float
    ) -> None:
        """Append and trim to the newest `max_turns` turns within `max_chars` characters."""

    async def reset(self, conversation: str) -> None:
        """Forget the context of `conversation` and its backend session (a fresh start)."""

    # -- backend-side conversations (Dify, Coze keep the history; we keep their id) ----------
    async def backend_session(self, key: str) -> str | None:
        """The backend's conversation id kept for the context key `key` (the key `context()`
        uses), or None: none was kept, it expired, or `reset(key)` forgot it."""

    async def set_backend_session(self, key: str, session: str, ttl: float) -> None:
        """Keep `session` for `key` (replacing any other) until `ttl` seconds pass without it
        being stored again: store it after every answer, even unchanged, so a conversation in use
        keeps it, as `append_turns` keeps the context (the same `[context] idle_ttl`)."""

    # -- model result cache -------------------------------------------------------------------
    async def cache_get(self, key: str) -> str | None: ...

    async def cache_put(self, key: str, value: str, ttl: float) -> None: ...

    # -- rate limit -----------------------------------------------------------------------------
    async def take_token(self, bucket: str, per_minute: int) -> bool:
        """Token bucket of `per_minute` capacity refilling continuously; False when empty."""

    # -- usage accounting (gateway.usage) ----------------------------------------------------------
    async def add_usage(
        self, day: str, subjects: Sequence[tuple[str, str]], tokens: int, estimated: bool, ttl: float
    ) -> None:
        """One answered message of `tokens` tokens (`estimated`: botgate's estimate) on `day`
        ("YYYY-MM-DD", local), added to each `(kind, subject)` (kind in `USAGE_KINDS`); the
        figures are kept `ttl` seconds after their last addition."""

    async def usage(self, days: Sequence[str], kind: str, subject: str) -> UsageCount:
        """The sum of `subject`'s figures over `days` (zero where none were kept)."""

    async def usage_top(self, day: str, kind: str, limit: int) -> list[tuple[str, UsageCount]]:
        """The `limit` subjects of `kind` with the most tokens on `day` (then messages), most first."""

    # -- outbox: proactive messages accepted but not yet delivered (gateway/outbox.py) ------------
    async def outbox_add(self, entry: OutboxEntry, keep: float) -> OutboxEntry:
        """Durably queue `entry`, as ONE atomic step with its idempotency key: when
        `entry.idempotency_key` is set and an entry kept under the same key exists, nothing is
        written and that entry is returned (as it is now: queued, sent or failed); otherwise
        `entry` is written and returned. The key lives as long as its entry: until `keep` seconds
        after the entry is done (see `outbox_update`)."""

    async def outbox_get(self, entry_id: str) -> OutboxEntry | None:
        """The entry with this id (queued, or done and still kept), or None."""

    async def outbox_update(self, entry: OutboxEntry, keep: float) -> None:
        """Replace the entry with the same id (its state, attempts, next_at, reason). A done entry
        (sent / failed) leaves the queue and is kept, with its idempotency key, for `keep`
        seconds from now, then forgotten. Nothing for an entry no longer kept."""

    async def outbox_queued(self, limit: int = 1000) -> list[OutboxEntry]:
        """Up to `limit` queued entries (by any process using this store), oldest first by
        `created_at`; an unreadable one is logged and left out."""

    # -- streaming cards still open on a platform -------------------------------------------------
    async def card_open(self, record: CardRecord) -> None:
        """Record an open card (replacing a record with the same key)."""

    async def card_update(self, record: CardRecord) -> None:
        """Replace the record of a card still open; nothing for a card already done."""

    async def card_done(self, key: str) -> None:
        """The card is finished (or gone): forget it."""

    async def cards_open(self) -> list[CardRecord]:
        """Every card recorded open, oldest first (by any process using this store)."""


@runtime_checkable
class LeaseStore(Store, Protocol):
    """A shared store: per-conversation leases, so one instance at a time answers a conversation.
    An unshared store has none: the one process's per-conversation worker already orders it."""

    async def acquire_lease(self, conversation: str, owner: str, ttl: float) -> bool:
        """Take or renew the lease for `ttl` seconds; False while another owner holds it."""

    async def lease_pending(self, conversation: str, owner: str, ttl: float) -> list[InboundMessage] | None:
        """`acquire_lease` and, once held, the conversation's `inbox_pending` in the same step
        (one round trip: what a worker does before each answer); None while another owner holds it."""

    async def release_lease(self, conversation: str, owner: str) -> None:
        """Give the lease up if `owner` still holds it (never someone else's)."""


def lease_store(store: Store) -> LeaseStore | None:
    """`store` with its leases when it is shared; None when only this process uses it."""
    if not store.shared:
        return None
    if not isinstance(store, LeaseStore):
        raise TypeError(f"the {store.backend} store is shared but has no leases")
    return store


def trim_turns(turns: list[Turn], max_turns: int, max_chars: int) -> list[Turn]:
    """Keep the newest turns that fit both budgets (shared by every backend)."""
    kept: list[Turn] = []
    used = 0
    for turn in reversed(turns[-max_turns:] if max_turns > 0 else []):
        used += len(turn.content)
        if used > max_chars and kept:
            break
        kept.append(turn)
    kept.reverse()
    return kept


def top_usage(rows: list[tuple[str, UsageCount]], limit: int) -> list[tuple[str, UsageCount]]:
    """The `limit` rows with the most tokens, then messages, then by subject (a stable order)."""
    return sorted(rows, key=lambda r: (-r[1].tokens, -r[1].messages, r[0]))[: max(0, limit)]


def encode_message(message: InboundMessage) -> bytes:
    return orjson.dumps(message.to_dict())


def decode_cards(rows: list[bytes]) -> list[CardRecord]:
    """Card rows back to records, oldest first; an unreadable one is logged and left out."""
    cards = []
    for raw in rows:
        try:
            cards.append(CardRecord.decode(raw))
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError) as e:
            log.error("unreadable card record skipped: %s", e, extra={"entry": raw[:200].decode(errors="replace")})
    return sorted(cards, key=lambda c: c.opened_at)


def decode_outbox(rows: list[bytes]) -> list[OutboxEntry]:
    """Outbox rows back to entries, in the order given; an unreadable one is logged and left out."""
    entries = []
    for raw in rows:
        try:
            entries.append(OutboxEntry.decode(raw))
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError) as e:
            log.error("unreadable outbox entry skipped: %s", e, extra={"entry": raw[:200].decode(errors="replace")})
    return entries


def decode_kept(raw: bytes, offered: OutboxEntry) -> OutboxEntry:
    """The entry `outbox_add` found kept under `offered`'s idempotency key (or id), to return
    instead of `offered`; unreadable, it cannot be returned and `offered` cannot be written."""
    found = decode_outbox([raw])
    if not found:
        raise StoreError(f"outbox entry kept for {offered.idempotency_key or offered.id!r} is unreadable")
    return found[0]


def decode_messages(rows: list[bytes]) -> list[InboundMessage]:
    """Inbox rows back to messages. An entry this version cannot read (written by a different
    one) is logged and left out, rather than stopping every other entry from being resumed."""
    messages = []
    for raw in rows:
        try:
            messages.append(InboundMessage.from_dict(orjson.loads(raw)))
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError) as e:
            log.error("unreadable inbox entry skipped: %s", e, extra={"entry": raw[:200].decode(errors="replace")})
    return messages
