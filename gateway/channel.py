"""The seam between the core and a platform adapter: `Channel`, its state, and `ReplyStream`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from .budget import BudgetStatus
from .messages import Attachment, InboundMessage, Reply


class ChannelState(StrEnum):
    DISABLED = "disabled"  # not configured
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    REFUSED = "refused"  # the platform refused us in a way retrying soon cannot fix
    # Another instance on the shared store holds the bot's one allowed connection; this one takes
    # over when that one goes. Healthy, so ready: its inbox answers go on (docs/wecom.md).
    STANDBY = "standby"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class ChannelStatus:
    """A snapshot for /readyz, metrics and the status page."""

    platform: str
    state: ChannelState
    transports: tuple[str, ...] = ()
    connected_since: float | None = None
    reconnects: int = 0
    attempt: int = 0
    last_error: str = ""
    last_event_at: float | None = None
    detail: str = ""  # e.g. "not configured: set BOTGATE_DINGTALK__ENABLED=true ..."
    budget: BudgetStatus | None = None  # the bot's monthly API budget (None: the channel has none)
    bot: str = "default"  # which app of its platform (config: [[<platform>.bots]] name)

    @property
    def key(self) -> str:
        """"<platform>/<bot>": how /readyz, the status page and the core name the channel."""
        return f"{self.platform}/{self.bot}"

    @property
    def ready(self) -> bool:
        # A webhook-only channel has nothing to connect; it is ready while running.
        return self.state in (ChannelState.CONNECTED, ChannelState.STANDBY)


@dataclass(slots=True)
class StatusTracker:
    """Mutable holder adapters update; `snapshot()` hands out frozen copies."""

    status: ChannelStatus
    # Kept apart from `status`: event_seen runs per frame, a dataclasses.replace each time cost
    # more than the rest of the frame's bookkeeping; snapshot() merges it in.
    _last_event_at: float | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)  # replaced on every set()

    def set(self, **changes: object) -> None:
        self.status = replace(self.status, **changes)  # type: ignore[arg-type]
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[ChannelStatus], bool]) -> ChannelStatus:
        """Until the status satisfies `predicate` (checked on every `set`); bound it yourself."""
        while not predicate(status := self.snapshot()):
            await self._changed.wait()
        return status

    def event_seen(self) -> None:
        self._last_event_at = time.time()

    def snapshot(self) -> ChannelStatus:
        seen = self._last_event_at
        if seen is not None and seen != self.status.last_event_at:
            self.status = replace(self.status, last_event_at=seen)
        return self.status


class ReplyStream(Protocol):
    """Progressive delivery of one answer (AI card, card updates, web chat deltas).

    `update` receives the whole text so far; the stream decides how often to push it (throttling is
    the adapter's job). `finish` delivers the final text exactly once and must fall back to a plain
    message itself if streaming broke: the user gets one answer, never none and never two.
    """

    def wants_update(self) -> bool:
        """Would `update` push now? The caller then skips building the text for one that would not
        (a throttled card takes about one update a second of the many deltas a model sends)."""

    async def update(self, text: str) -> None: ...

    async def finish(self, text: str) -> None: ...

    def fold(self, reasoning: str) -> None:
        """The model's thinking so far (`[model] reasoning = "fold"`), the whole text each time. A
        stream that can show it apart from the answer, collapsed (a Feishu card's panel), sends it
        with the next `update` or `finish`; any other stream ignores it."""


class Channel(Protocol):
    @property
    def platform(self) -> str: ...

    def status(self) -> ChannelStatus: ...

    async def send(self, reply: Reply) -> None:
        """Deliver a complete reply; raises `PlatformError` when the platform refused it."""

    async def open_stream(self, message: InboundMessage) -> ReplyStream | None:
        """A stream for progressive answers, or None when this channel/message cannot stream."""

    async def fetch(self, message: InboundMessage, attachment: Attachment) -> tuple[bytes, str]:
        """Download an attachment: (bytes, mime type). Raises `PlatformError`."""

    async def reconnect(self) -> None:
        """Drop the current long connection and connect afresh (admin action)."""
