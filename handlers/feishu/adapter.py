"""`FeishuAdapter`: the Feishu/Lark `Channel` — intake from the long connection and the webhook
(one dedup behind both), threaded replies, and answers streamed into a CardKit card.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from gateway.access import AccessList
from gateway.budget import ApiBudget
from gateway.channel import ChannelState, ChannelStatus, StatusTracker
from gateway.config import FeishuConfig
from gateway.connection import ConnectionLoop, stop_task
from gateway.dispatcher import Dispatcher
from gateway.errors import PlatformError
from gateway.intake import Submission
from gateway.keys import CHANNELS, CONFIG, DISPATCHER, HTTP, METRICS
from gateway.messages import Attachment, InboundMessage, Reply, ReplyKind
from gateway.metrics import Metrics
from gateway.retry import retry_transient
from gateway.streaming import CardStream

from . import webhook
from .api import FeishuApi
from .parse import PLATFORM, Dropped, Rules, envelope_id, parse_event
from .render import MANY_TABLES_NOTE, Part, render, stream_view, streaming_card
from .ws import FeishuWsClient

log = logging.getLogger(__name__)

SEEN_EVENTS_MAX = 10_000


def reply_uuid(message_id: str, kind: str, index: int) -> str:
    """Feishu's idempotency key for one reply part: a resend of the same part (a retry, a restart
    that answers again) is swallowed by Feishu instead of showing twice. At most 50 characters."""
    return hashlib.sha256(f"{message_id}|{kind}|{index}".encode()).hexdigest()[:40]


class SeenEvents:
    """`event_id`s acknowledged recently, so a redelivered envelope is ACKed without a second
    look; the dispatcher's message_id dedup (shared by every transport and instance) stays the
    authority. Bounded in size and time."""

    def __init__(self, ttl: float, limit: int = SEEN_EVENTS_MAX) -> None:
        self._ttl, self._limit = ttl, limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._seen and (len(self._seen) > self._limit or next(iter(self._seen.values())) < now):
            self._seen.popitem(last=False)

    def seen(self, event_id: str, now: float) -> bool:
        self._expire(now)
        return event_id in self._seen

    def add(self, event_id: str, now: float) -> None:
        self._seen[event_id] = now + self._ttl
        self._seen.move_to_end(event_id)
        self._expire(now)


@dataclass(frozen=True, slots=True)
class _Runtime:
    """What the adapter uses once the app started (the HTTP session exists only then)."""

    api: FeishuApi
    budget: ApiBudget
    dispatcher: Dispatcher
    metrics: Metrics


class FeishuCardStream(CardStream):
    """An answer typed into a CardKit streaming card (created and sent as a reply on the first
    text, then its markdown element replaced, each call with a higher `sequence`). The final
    text follows `render`: if it needs several parts, the card ends with the first and the rest
    follow as replies; if it needs a post (too many tables), the card ends with a pointer to it."""

    def __init__(self, adapter: FeishuAdapter, runtime: _Runtime, message: InboundMessage, interval: float) -> None:
        super().__init__(interval, fallback=self._deliver_rest)
        self._adapter, self._api, self._message = adapter, runtime.api, message
        self._card_id = ""
        self._sequence = 0
        self._shown = ""
        self._rest: list[Part] | None = None  # set once the card holds its final text
        self._rest_from = 0

    async def _open(self, text: str) -> None:
        view = stream_view(text)
        self._card_id = await self._api.create_card(streaming_card(view))
        card = Part("interactive", {"type": "card", "data": {"card_id": self._card_id}})
        # Idempotent per card, not per message: a card made after a restart must still be shown.
        await self._adapter.reply_parts(self._message, [card], f"card:{self._card_id}")
        self._shown = view

    async def _set(self, text: str) -> None:
        if text != self._shown:
            self._sequence += 1
            await self._api.set_card_text(self._card_id, text, self._sequence)
            self._shown = text

    async def _push(self, text: str, final: bool) -> None:
        if not final:
            await self._set(stream_view(text))
            return
        parts = render(text)
        in_card = parts[0].msg_type == "interactive"
        await self._set(parts[0].text if in_card else MANY_TABLES_NOTE)
        self._rest, self._rest_from = (parts[1:], 1) if in_card else (parts, 0)
        self._sequence += 1
        try:
            await self._api.close_card(self._card_id, text, self._sequence)
        except PlatformError as e:
            # The text is complete; the card merely keeps its "generating" look until Feishu
            # closes streaming itself (after 10 minutes). Not worth a second answer.
            log.warning("could not close the streaming card: %s", e, extra={"platform": PLATFORM})
        await self._deliver_rest(text)

    async def _deliver_rest(self, text: str) -> None:
        """Send what the card does not show: all of `text` when the card broke before its final
        text, else the parts not delivered yet (so a failure halfway never repeats a part)."""
        if self._rest is None:
            self._rest, self._rest_from = render(text), 0
        while self._rest:
            await self._adapter.reply_parts(self._message, self._rest[:1], "answer", self._rest_from)
            self._rest, self._rest_from = self._rest[1:], self._rest_from + 1


class FeishuAdapter:
    platform = PLATFORM

    def __init__(self, cfg: FeishuConfig, dedup_ttl: float) -> None:
        self.cfg = cfg
        transports = {"ws": ("ws",), "webhook": ("webhook",), "both": ("ws", "webhook")}[cfg.mode]
        self.tracker = StatusTracker(ChannelStatus(PLATFORM, ChannelState.CONNECTING, transports=transports))
        self._users = AccessList.of(cfg.allow_users, cfg.deny_users)
        self._chats = AccessList.of(cfg.allow_chats, cfg.deny_chats)
        self._seen = SeenEvents(dedup_ttl)
        self._runtime: _Runtime | None = None
        self._loop: ConnectionLoop | None = None

    @property
    def runtime(self) -> _Runtime:
        if self._runtime is None:
            raise PlatformError("feishu adapter is not running", retryable=True)
        return self._runtime

    @property
    def connection(self) -> ConnectionLoop | None:
        return self._loop

    # -- Channel -------------------------------------------------------------------------------
    def status(self) -> ChannelStatus:
        return self.tracker.snapshot()

    async def send(self, reply: Reply) -> None:
        kind = "notice" if reply.kind is ReplyKind.NOTICE else "answer"
        await self.reply_parts(reply.to, render(reply.text), kind)

    async def open_stream(self, message: InboundMessage) -> FeishuCardStream | None:
        runtime = self.runtime
        if runtime.budget.degraded:
            return None  # one reply instead of card create + reply + updates + close
        return FeishuCardStream(self, runtime, message, self.cfg.stream_interval)

    async def fetch(self, message: InboundMessage, attachment: Attachment) -> tuple[bytes, str]:
        kind = "image" if attachment.kind == "image" else "file"
        return await self.runtime.api.download(message.reply_handle["message_id"], attachment.ref, kind)

    async def reconnect(self) -> None:
        if self._loop is not None:
            self._loop.reconnect()

    async def reply_parts(self, message: InboundMessage, parts: list[Part], kind: str, first: int = 0) -> None:
        """Send `parts` in order as replies to the message (in its thread if it came from one)."""
        handle = message.reply_handle
        runtime = self.runtime
        for index, part in enumerate(parts, first):
            # Retried part by part; the uuid makes a retry of a reply that did arrive a no-op.
            await retry_transient(
                partial(
                    runtime.api.reply,
                    handle["message_id"],
                    part,
                    reply_uuid(message.message_id, kind, index),
                    in_thread=bool(handle.get("thread_id")),
                ),
                platform=PLATFORM,
                what="reply",
                metrics=runtime.metrics,
            )

    # -- intake ------------------------------------------------------------------------------
    async def intake(self, body: dict[str, Any], transport: str) -> bool:
        """One delivered event -> dispatcher. True when Feishu may consider it delivered."""
        verdict = await self._prepare(body, transport)
        return await verdict.submit() if isinstance(verdict, Submission) else verdict

    async def _prepare(self, body: dict[str, Any], transport: str) -> bool | Submission:
        """Dedup and parse an event: a verdict at once (duplicate, dropped, not checkable) or the
        message's `Submission`."""
        runtime = self.runtime
        event_id, now = envelope_id(body), time.time()
        if event_id and self._seen.seen(event_id, now):
            runtime.metrics.dedup_dropped.labels(PLATFORM).inc()
            log.info("duplicate event dropped", extra={"platform": PLATFORM, "event_id": event_id})
            return True
        try:
            bot_open_id = await runtime.api.bot_open_id()
        except PlatformError as e:
            log.error("cannot check mentions without the bot's open_id: %s", e, extra={"platform": PLATFORM})
            return False
        rules = Rules(bot_open_id, self._users, self._chats, self.cfg.max_message_age)
        result = parse_event(body, rules, transport, now)
        if isinstance(result, Dropped):
            runtime.metrics.dropped.labels(PLATFORM, result.reason).inc()
            # Unaddressed group chatter is the normal case in groups: not worth an INFO line each.
            log.log(
                logging.DEBUG if result.reason == "not_mentioned" else logging.INFO,
                "event dropped",
                extra={"platform": PLATFORM, "event_id": event_id, "reason": result.reason, "detail": result.detail},
            )
            self._delivered(event_id, now)
            return True
        return Submission(result.conversation_key, partial(self._submit, result, event_id, now))

    async def _submit(self, message: InboundMessage, event_id: str, now: float) -> bool:
        accepted = (await self.runtime.dispatcher.submit(message)).acknowledge
        if accepted:
            self._delivered(event_id, now)
        return accepted

    def _delivered(self, event_id: str, now: float) -> None:
        self.tracker.event_seen()
        if event_id:
            self._seen.add(event_id, now)

    async def _on_ws_event(self, payload: bytes) -> bool | Submission:
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            # Redelivery cannot fix it: acknowledge and count it.
            self.runtime.metrics.dropped.labels(PLATFORM, "malformed").inc()
            log.warning("event payload is not a JSON object", extra={"platform": PLATFORM})
            return True
        return await self._prepare(body, "ws")

    # -- lifecycle ----------------------------------------------------------------------------
    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        metrics = app[METRICS]
        budget = ApiBudget(PLATFORM, self.cfg.monthly_api_budget, metrics)
        api = FeishuApi(app[HTTP], self.cfg.domain, self.cfg.app_id, self.cfg.app_secret, budget)
        self._runtime = _Runtime(api, budget, app[DISPATCHER], metrics)
        task: asyncio.Task[None] | None = None
        if "ws" in self.tracker.snapshot().transports:
            client = FeishuWsClient(api, app[HTTP], self._on_ws_event)
            self._loop = ConnectionLoop(PLATFORM, self.tracker, metrics, client.session, client.backoff)
            task = asyncio.create_task(self._loop.run(), name="feishu-ws")
        else:
            # Webhook only: nothing to connect, ready while running.
            self.tracker.set(state=ChannelState.CONNECTED, connected_since=time.time())
        try:
            yield
        finally:
            if task is not None:
                await stop_task(task)
            self.tracker.set(state=ChannelState.STOPPED)
            self._loop = None


def setup(app: web.Application) -> None:
    cfg = app[CONFIG].feishu
    adapter = FeishuAdapter(cfg, app[CONFIG].dispatcher.dedup_ttl)
    app[CHANNELS][PLATFORM] = adapter
    if cfg.mode in ("webhook", "both"):
        webhook.setup(app, cfg, adapter.intake)
    app.cleanup_ctx.append(adapter.ctx)
