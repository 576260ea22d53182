"""`WeComAdapter`: one WeCom (企业微信) AI bot on the shared `Adapter` skeleton.

Inbound: long-connection callbacks and callback-mode POSTs carry the same body, parsed by
`parse_callback`; both go through the one admission (dedup on msgid, the durable inbox).
Outbound: answers stream into WeCom streams (`stream.py`); what no stream can carry any more goes
as proactive messages over the long connection, or to the callback's `response_url`. Every new
message waits for its conversation's quota (`api.py`). One connection per bot: on a shared store
the instances take turns under a lease (`holder.py`), the others stand by.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web

from gateway.access import AccessList
from gateway.adapter import DEFAULT_BOT, Adapter, Runtime
from gateway.admission import Dropped, Verdict
from gateway.channel import ChannelState
from gateway.config import WeComConfig
from gateway.errors import PlatformError
from gateway.keys import CONFIG, METRICS, STORE
from gateway.messages import Attachment, InboundMessage, Reply
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.retry import retry_transient
from gateway.store import OutboxEntry, Store

from ..webhook import install
from . import frame as wf
from .api import WeComApi, quota
from .holder import ConnectionHolder
from .parse import PLATFORM, Delivery, Rules, parse_callback, welcome
from .render import CONTENT_LIMIT, FRAME_ROOM, fit, render
from .render import markdown as markdown_body
from .stream import LinkStream, PolledStream, Polls, poll_stream_id
from .webhook import WeComWebhook, webhook
from .ws import Link, WeComWsClient

log = logging.getLogger(__name__)

PUSH_LIMIT = CONTENT_LIMIT - FRAME_ROOM  # UTF-8 bytes of one proactive message


class WeComAdapter(Adapter[WeComConfig, WeComApi]):
    platform = PLATFORM
    long_transport = "ws"
    identity = "bot_id"

    def __init__(self, cfg: WeComConfig, metrics: Metrics, name: str = DEFAULT_BOT) -> None:
        super().__init__(cfg, metrics, name)
        self._rules = Rules(
            bot_id=cfg.bot_id,
            bot_name=cfg.bot_name,
            users=AccessList.of(cfg.allow_users, cfg.deny_users),
            chats=AccessList.of(cfg.allow_chats, cfg.deny_chats),
            max_age=cfg.max_message_age,
        )
        self.polls = Polls(name, cfg.stream_life)
        self._ws: WeComWsClient | None = None
        self._linked = asyncio.Event()
        self._store: Store | None = None

    # -- the skeleton's hooks --------------------------------------------------------------------
    def make_limiter(self) -> RateLimiter:
        return quota(self.cfg.replies_per_minute, self.cfg.replies_per_hour)

    def make_api(self, http: aiohttp.ClientSession) -> WeComApi:
        return WeComApi(http, self.limiter, self.link, self._linked)

    def link(self) -> Link | None:
        """The long connection's subscribed socket on this instance, if any."""
        return self._ws.link if self._ws is not None else None

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        self._store = app[STORE]  # the connection lease lives there
        if self._store.shared:  # WeCom's polls may reach another instance than the answering one
            self.polls.store = self._store
        async for _ in super().ctx(app):
            yield

    def make_client(self, runtime: Runtime[WeComApi]) -> WeComWsClient:
        assert self._store is not None
        cfg = self.cfg
        owner = runtime.dispatcher.instance_id
        holder = ConnectionHolder(self._store, self.name, owner, cfg.connection_lease, cfg.kicked_retry)
        self._ws = WeComWsClient(
            lambda: self.cfg, runtime.http, self._on_message, self._on_event, holder, self._standby, self._linked
        )
        return self._ws

    def _standby(self, why: str) -> None:
        if why:
            self.tracker.set(state=ChannelState.STANDBY, detail=why)
        else:
            self.tracker.set(detail="")

    async def _on_message(self, delivery: Delivery) -> Verdict:
        return await self.prepare(delivery.to_dict(), self.long_transport)

    async def parse(self, body: object, transport: str) -> InboundMessage | Dropped:
        delivery = Delivery.of(body)
        if delivery is None:
            return Dropped("malformed", "not a callback")
        return parse_callback(delivery, self._rules, transport, time.time(), self.locale())

    # -- events ----------------------------------------------------------------------------------
    async def _on_event(self, delivery: Delivery, link: Link) -> None:
        """An event on the long connection: `enter_chat` gets the welcome, within its 5 s."""
        self.tracker.event_seen()
        words = await self.welcome_words(dict(delivery.body))
        if not words:
            return
        try:
            async with asyncio.timeout(wf.EVENT_REPLY_DEADLINE):
                await link.request(wf.welcome_reply(delivery.req_id, words))
        except (PlatformError, TimeoutError) as e:
            log.warning("welcome not sent: %s", e or "too late", extra={"platform": PLATFORM, "bot": self.name})

    async def welcome_words(self, body: dict[str, Any]) -> str:
        """The welcome for an `enter_chat` event, once its conversation's quota allows it within
        the event's 5 s ("" otherwise, and for any other event)."""
        try:
            event = wf.parse_event(body)
        except wf.FrameError as e:
            log.info("event dropped: %s", e, extra={"platform": PLATFORM})
            return ""
        if event.eventtype != wf.ENTER_CHAT or not event.userid:
            return ""
        try:
            async with asyncio.timeout(wf.EVENT_REPLY_DEADLINE - 1.0):  # room for the frame itself
                await self.runtime.api.turn(event.userid)
        except TimeoutError:
            log.warning(
                "welcome not sent: the conversation's quota is used up", extra={"platform": PLATFORM, "bot": self.name}
            )
            return ""
        return welcome(self.locale())

    # -- outbound --------------------------------------------------------------------------------
    async def open_stream(self, message: InboundMessage) -> LinkStream | PolledStream | None:
        cfg = self.cfg
        if message.transport == "webhook":
            stream_id = poll_stream_id(message.message_id)
            poll = self.polls.get(stream_id)
            if poll is None and self.polls.store is not None:  # received by another instance
                poll = self.polls.open(stream_id, message.created_at)
            if poll is None or poll.finished:  # WeCom polls no stream for it (a restart)
                return None
            return PolledStream(self.polls, poll, cfg.stream_life, partial(self._later, message))
        link = self.link()
        handle = message.reply_handle
        if link is None or link.closed or not handle.get("req_id") or handle.get("connection") != link.id:
            return None  # the req_id is gone with its connection: proactive messages instead
        return LinkStream(
            self.runtime.api, link, message, cfg.stream_interval, cfg.stream_life, self.metrics,
            partial(self._later, message),
        )

    async def send(self, reply: Reply) -> None:
        stream = await self.open_stream(reply.to)
        if stream is not None:
            await stream.finish(reply.text)
            return
        await self._later(reply.to, "".join(render(reply.text, reply.to.locale)))

    async def _later(self, message: InboundMessage, text: str) -> None:
        """Text no stream carries: proactive messages on the long connection; in callback mode
        without one, the callback's `response_url` (once, one message). Raises `PlatformError`."""
        api, pieces = self.runtime.api, fit(text)
        if self.runs(self.long_transport):
            for piece in pieces:
                await api.push(message.conversation_id, piece)
            return
        url = str(message.reply_handle.get("response_url", ""))
        if not url.startswith(self.cfg.api_base.rstrip("/") + "/"):
            # Only WeCom's own reply endpoint: the URL came in a callback, not from our config.
            raise PlatformError("wecom: no way left to deliver the answer (no long connection, no response_url)")
        await api.turn(message.conversation_id)
        await api.response_url(url, markdown_body(pieces[0]))
        if len(pieces) > 1:
            log.error(
                "answer cut: callback mode without a long connection delivers one more message",
                extra={"platform": PLATFORM, "bot": self.name, "request_id": message.request_id},
            )

    # -- proactive (the outbox's `Pusher`: gateway/outbox.py) -------------------------------------------
    def push_limit(self, markdown: bool) -> int:
        return PUSH_LIMIT

    async def push(self, entry: OutboxEntry) -> None:
        """A proactive message (`aibot_send_msg`) into a group (`to_kind` "conversation", its chatid)
        or a single chat ("user", the userid); WeCom takes only chats that messaged the bot
        before. Markdown either way: the AI bot sends no plain text messages. Not idempotent: only
        a refusal that says it was not taken may be repeated. Raises `PlatformError`."""
        if not self.runs(self.long_transport):
            raise PlatformError("wecom push: needs the long connection (mode ws or both)", retryable=False)
        for piece in render(entry.text):
            await self.runtime.api.push(entry.to, piece)

    async def fetch(self, message: InboundMessage, attachment: Attachment) -> tuple[bytes, str]:
        keys = message.reply_handle.get("aeskeys") or {}
        # The long connection sends each URL's key; callback mode encrypts with the bot's own.
        key = keys.get(attachment.ref) or (self.cfg.encoding_aes_key if message.transport == "webhook" else "")
        if not key:
            raise PlatformError("wecom media: no key to decrypt it with", retryable=False)
        return await retry_transient(
            partial(self.runtime.api.download, attachment.ref, key),
            platform=PLATFORM,
            what="media download",
            metrics=self.metrics,
        )


def setup(app: web.Application) -> None:
    """Register every enabled WeCom bot: `[wecom]` (the bot "default") and `[[wecom.bots]]`."""
    for bot in app[CONFIG].enabled_bots(PLATFORM):
        cfg = bot.settings
        assert isinstance(cfg, WeComConfig)
        hook: WeComWebhook = webhook(WeComAdapter(cfg, app[METRICS], bot.name))
        install(app, hook)
        if hook.bot.runs("webhook"):
            for path in hook.bot.webhook_paths:
                app.router.add_get(path, hook.verify)
