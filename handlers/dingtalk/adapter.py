"""`DingTalkAdapter`: the DingTalk `Channel` (status, send, streaming cards, attachments, reconnect)
and `setup(app)`, which registers it with its webhook route and Stream connection.

Inbound, both transports end in `intake()`: parse, drop what must not be answered, then
`dispatcher.submit()`; the Stream frame is ACKed as soon as that returns an acknowledging
admission, never after the model. Outbound, a reply goes through the message's sessionWebhook while
it is valid, otherwise (or when DingTalk refuses it) through the robot OpenAPI.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from gateway.access import AccessList
from gateway.backoff import Backoff
from gateway.budget import ApiBudget
from gateway.channel import ChannelState, ChannelStatus, StatusTracker
from gateway.config import DingTalkConfig
from gateway.connection import ConnectionLoop, stop_task
from gateway.admission import Admission
from gateway.dispatcher import Dispatcher
from gateway.errors import PlatformError
from gateway.intake import Submission
from gateway.keys import CHANNELS, CONFIG, DISPATCHER, HTTP, METRICS
from gateway.messages import Attachment, InboundMessage, Reply
from gateway.metrics import Metrics
from gateway.retry import retry_transient

from .api import DingTalkApi, SessionWebhookRejected
from .card import AICardStream, can_carry_card
from .parse import PLATFORM, Dropped, Filters, parse_message
from .render import openapi_markdown, render_parts, session_markdown, title_of
from .stream import StreamSession
from .webhook import webhook_handler

log = logging.getLogger(__name__)

# A sessionWebhook this close to its expiry is not used: the reply could arrive after it.
SESSION_MARGIN_MS = 60_000
RECONNECT_CAP = 60.0


class DingTalkAdapter:
    platform = PLATFORM

    def __init__(self, cfg: DingTalkConfig, metrics: Metrics) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self.budget = ApiBudget(PLATFORM, cfg.monthly_api_budget, metrics)
        self._filters = Filters(
            robot_code=cfg.robot_code or cfg.client_id,
            senders=AccessList.of(cfg.allow_senders, cfg.deny_senders),
            conversations=AccessList.of(cfg.allow_conversations, cfg.deny_conversations),
        )
        transports = {"stream": ("stream",), "webhook": ("webhook",), "both": ("stream", "webhook")}
        self._tracker = StatusTracker(
            ChannelStatus(PLATFORM, ChannelState.CONNECTING, transports=transports[cfg.mode])
        )
        self._api: DingTalkApi | None = None
        self._dispatcher: Dispatcher | None = None
        self.loop: ConnectionLoop | None = None
        self.stream: StreamSession | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: bind the shared session and dispatcher, run the Stream connection if enabled."""
        self._api = DingTalkApi(app[HTTP], self._cfg, self.budget)
        self._dispatcher = app[DISPATCHER]
        task: asyncio.Task[None] | None = None
        if self._cfg.mode in ("stream", "both"):
            self.stream = StreamSession(
                app[HTTP], self._cfg, self.budget, self._on_stream_message, self._tracker.event_seen
            )
            backoff = Backoff(first=self._cfg.reconnect_delay, cap=RECONNECT_CAP)
            self.loop = ConnectionLoop(PLATFORM, self._tracker, self._metrics, self.stream, backoff)
            task = asyncio.create_task(self.loop.run(), name="dingtalk-stream")
        else:  # webhook only: nothing to connect, ready while running
            self._tracker.set(state=ChannelState.CONNECTED, connected_since=time.time())
        try:
            yield
        finally:
            if task is not None:
                await stop_task(task)
            self._tracker.set(state=ChannelState.STOPPED)

    @property
    def api(self) -> DingTalkApi:
        if self._api is None:
            raise PlatformError("dingtalk adapter is not running", retryable=False)
        return self._api

    # -- inbound -------------------------------------------------------------------------------
    async def intake(self, body: Any, transport: str) -> Admission | Dropped:
        """One robot message body from either transport -> the dispatcher (or a counted drop)."""
        result = self._parse(body, transport)
        if isinstance(result, Dropped):
            return result
        if self._dispatcher is None:
            return Admission.UNAVAILABLE
        return await self._dispatcher.submit(result)

    def _parse(self, body: Any, transport: str) -> InboundMessage | Dropped:
        self._tracker.event_seen()
        result = parse_message(body, self._filters, transport)
        if isinstance(result, Dropped):
            self._metrics.dropped.labels(PLATFORM, result.reason).inc()
            log.info(
                "message dropped",
                extra={
                    "platform": PLATFORM,
                    "transport": transport,
                    "reason": result.reason,
                    "detail": result.detail,
                },
            )
        return result

    def _on_stream_message(self, data: str) -> bool | Submission:
        """Parsed at once (pure, cheap); the submit runs in the conversation's order."""
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            body = None  # counted as malformed and ACKed: a redelivery would be just as broken
        result = self._parse(body, "stream")
        if isinstance(result, Dropped):
            return True
        return Submission(result.conversation_key, partial(self._submit, result))

    async def _submit(self, message: InboundMessage) -> bool:
        if self._dispatcher is None:
            return False
        return (await self._dispatcher.submit(message)).acknowledge

    # -- outbound ------------------------------------------------------------------------------
    def status(self) -> ChannelStatus:
        return self._tracker.snapshot()

    def _session_webhook(self, handle: dict[str, Any]) -> str:
        """The sessionWebhook if it is still valid and really DingTalk's (it came from a payload)."""
        url = handle.get("session_webhook", "")
        expires = handle.get("session_webhook_expires", 0)
        if not isinstance(url, str) or not url.startswith(self._cfg.oapi_base.rstrip("/") + "/"):
            return ""
        if not isinstance(expires, int | float) or expires - SESSION_MARGIN_MS <= time.time() * 1000:
            return ""
        return url

    async def send(self, reply: Reply) -> None:
        parts = render_parts(reply.text)
        title = title_of(parts[0])
        url = self._session_webhook(reply.to.reply_handle)
        for i, part in enumerate(parts):
            # Each part is retried on its own, so a retry never repeats a part already delivered.
            url = await retry_transient(
                partial(self._send_part, reply, url, title, part, i == 0),
                platform=PLATFORM,
                what="reply",
                metrics=self._metrics,
            )

    async def _send_part(self, reply: Reply, url: str, title: str, part: str, first: bool) -> str:
        """Deliver one part; returns the sessionWebhook for the next part ("" once it was refused)."""
        handle = reply.to.reply_handle
        group = handle.get("conversation_type") == "2"
        if url:
            staff_id = handle.get("sender_staff_id", "")
            # In groups the asker is @mentioned; the text must name the id for DingTalk to render it.
            mention = f"@{staff_id} " if group and staff_id and first else ""
            try:
                await self.api.send_session(
                    url, session_markdown(title, mention + part, [staff_id] if mention else [])
                )
                return url
            except SessionWebhookRejected as e:
                log.info(
                    "sessionWebhook refused, sending through the OpenAPI: %s",
                    e,
                    extra={"platform": PLATFORM, "request_id": reply.to.request_id},
                )
        await self._send_openapi(handle, title, part, mention_name=group and first)
        return ""

    async def _send_openapi(self, handle: dict[str, Any], title: str, text: str, mention_name: bool) -> None:
        robot_code = handle.get("robot_code") or self._filters.robot_code
        if handle.get("conversation_type") == "2":
            # The group send API has no @mention; naming the asker keeps the reply attributable.
            nick = handle.get("sender_nick", "")
            msg_key, param = openapi_markdown(title, f"@{nick} {text}" if mention_name and nick else text)
            await self.api.send_group(robot_code, handle.get("conversation_id", ""), msg_key, param)
            return
        staff_id = handle.get("sender_staff_id", "")
        if not staff_id:
            raise PlatformError("sessionWebhook expired and the sender has no staff id", retryable=False)
        msg_key, param = openapi_markdown(title, text)
        await self.api.send_direct(robot_code, staff_id, msg_key, param)

    async def open_stream(self, message: InboundMessage) -> AICardStream | None:
        if not self._cfg.card_template_id or not can_carry_card(message.reply_handle):
            return None

        async def fallback(text: str) -> None:
            await self.send(Reply(message, text))

        return AICardStream(
            self.api,
            message.reply_handle,
            self._cfg.card_template_id,
            self._cfg.stream_interval,
            fallback,
            final_only=self.budget.degraded,
        )

    async def fetch(self, message: InboundMessage, attachment: Attachment) -> tuple[bytes, str]:
        robot_code = message.reply_handle.get("robot_code") or self._filters.robot_code
        return await self.api.download(robot_code, attachment.ref)

    async def reconnect(self) -> None:
        if self.loop is not None:
            self.loop.reconnect()


def setup(app: web.Application) -> None:
    """Register the DingTalk channel, its webhook route (webhook/both) and its Stream connection."""
    cfg = app[CONFIG].dingtalk
    adapter = DingTalkAdapter(cfg, app[METRICS])
    app[CHANNELS][PLATFORM] = adapter
    if cfg.mode in ("webhook", "both"):
        app.router.add_post("/dingtalk/webhook", webhook_handler(cfg.client_secret, adapter.intake))
    app.cleanup_ctx.append(adapter.ctx)
