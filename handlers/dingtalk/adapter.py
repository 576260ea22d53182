"""`DingTalkAdapter`: one DingTalk robot (app) on the shared `Adapter` skeleton.

Inbound: Stream CALLBACK frames and outgoing-robot webhooks carry the same robot message JSON,
parsed by `parse_message`. Outbound, a reply goes through the message's sessionWebhook while it is
valid, otherwise (or when DingTalk refuses it) through the robot OpenAPI; with a card template an
answer streams into an AI card.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web

from gateway.access import AccessList
from gateway.adapter import DEFAULT_BOT, Adapter, Runtime
from gateway.admission import Dropped
from gateway.backoff import Backoff
from gateway.config import DingTalkConfig
from gateway.errors import PlatformError
from gateway.i18n import N_, translator
from gateway.images_out import OutFile, OutImage
from gateway.keys import CONFIG, METRICS
from gateway.messages import Attachment, InboundMessage, Reply
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter, per_second
from gateway.retry import retry_transient
from gateway.store import CardRecord, OutboxEntry
from gateway.streaming import INTERRUPTED, CardBook

from ..webhook import install
from .api import DingTalkApi, SessionWebhookRejected
from .card import AICardStream, can_carry_card
from .images import send_files, send_images
from .parse import PLATFORM, Filters, parse_message
from .render import PUSH_LIMIT, openapi_markdown, openapi_text, render, session_markdown, title_of
from .stream import StreamClient
from .webhook import stale, webhook

log = logging.getLogger(__name__)

# A sessionWebhook this close to its expiry is not used: the reply could arrive after it.
SESSION_MARGIN_MS = 60_000
RECONNECT_CAP = 60.0


class DingTalkAdapter(Adapter[DingTalkConfig, DingTalkApi]):
    platform = PLATFORM
    long_transport = "stream"
    cards: CardBook
    identity = "client_id"

    def __init__(self, cfg: DingTalkConfig, metrics: Metrics, name: str = DEFAULT_BOT) -> None:
        super().__init__(cfg, metrics, name)
        self._filters = Filters(
            robot_code=cfg.robot_code or cfg.client_id,
            senders=AccessList.of(cfg.allow_senders, cfg.deny_senders),
            conversations=AccessList.of(cfg.allow_conversations, cfg.deny_conversations),
        )
        self.cards = CardBook(PLATFORM, name)

    # -- the skeleton's hooks --------------------------------------------------------------------
    def make_api(self, http: aiohttp.ClientSession) -> DingTalkApi:
        return DingTalkApi(http, self.cfg, self.budget, self.limiter)

    def use_secrets(self, api: DingTalkApi) -> None:
        api.use_secret(self.cfg.client_secret)

    def make_limiter(self) -> RateLimiter:
        # Standard orgs: 20 calls a second per app and API; card streaming: 50 a second per robot
        # (docs/protocols/dingtalk.md §A.9).
        return RateLimiter(
            apis={"card_streaming": per_second(self.cfg.card_qps)}, default=per_second(self.cfg.api_qps)
        )

    def make_client(self, runtime: Runtime[DingTalkApi]) -> StreamClient:
        backoff = Backoff(first=self.cfg.reconnect_delay, cap=RECONNECT_CAP)
        # The client reads the config per connection: a reload's new secret opens the next one.
        return StreamClient(runtime.http, lambda: self.cfg, self.budget, self.prepare_payload, backoff)

    async def parse(self, body: object, transport: str) -> InboundMessage | Dropped:
        message = parse_message(body, self._filters, transport, self.locale())
        if isinstance(message, InboundMessage):
            # A webhook body is not signed, so there a missing createAt counts as stale too.
            too_old = stale(body, self.cfg.max_message_age, time.time(), required=transport == "webhook")
            if too_old:
                return Dropped("stale", too_old)
        return message

    # -- outbound --------------------------------------------------------------------------------
    def _session_webhook(self, handle: dict[str, Any]) -> str:
        """The sessionWebhook if it is still valid and really DingTalk's (it came from a payload)."""
        url = handle.get("session_webhook", "")
        expires = handle.get("session_webhook_expires", 0)
        if not isinstance(url, str) or not url.startswith(self.cfg.oapi_base.rstrip("/") + "/"):
            return ""
        if not isinstance(expires, int | float) or expires - SESSION_MARGIN_MS <= time.time() * 1000:
            return ""
        return url

    async def send(self, reply: Reply) -> None:
        adopted = self.cards.adopt(reply.to)
        if adopted is not None:  # a card a previous process opened for this message ends with it
            await self._card(reply.to, adopted).finish(reply.text)
            return
        parts = render(reply.text, locale=reply.to.locale)
        title = title_of(parts[0].text) or translator(reply.to.locale)(N_("Reply"))
        url = self._session_webhook(reply.to.reply_handle)
        for i, part in enumerate(parts):
            # Each part is retried on its own, so a retry never repeats a part already delivered.
            url = await retry_transient(
                partial(self._send_part, reply, url, title, part.text, i == 0),
                platform=PLATFORM,
                what="reply",
                metrics=self.metrics,
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
                await self.runtime.api.send_session(
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
        api = self.runtime.api
        robot_code = handle.get("robot_code") or self._filters.robot_code
        if handle.get("conversation_type") == "2":
            # The group send API has no @mention; naming the asker keeps the reply attributable.
            nick = handle.get("sender_nick", "")
            msg_key, param = openapi_markdown(title, f"@{nick} {text}" if mention_name and nick else text)
            await api.send_group(robot_code, handle.get("conversation_id", ""), msg_key, param)
            return
        staff_id = handle.get("sender_staff_id", "")
        if not staff_id:
            raise PlatformError("sessionWebhook expired and the sender has no staff id", retryable=False)
        msg_key, param = openapi_markdown(title, text)
        await api.send_direct(robot_code, staff_id, msg_key, param)

    # -- proactive (gateway/outbox.py) -------------------------------------------------------------
    def push_limit(self, markdown: bool) -> int:
        return PUSH_LIMIT

    async def push(self, entry: OutboxEntry) -> None:
        """A message into a group (`groupMessages/send`) or to a user by staffId (`batchSend`). Neither
        takes an idempotency key: only a refusal that says it was not taken is retried."""
        api, robot_code = self.runtime.api, self._filters.robot_code
        if entry.markdown:
            title = title_of(entry.text) or translator(self.locale())(N_("Message"))
            msg_key, param = openapi_markdown(title, entry.text)
        else:
            msg_key, param = openapi_text(entry.text)
        if entry.to_kind == "conversation":
            await api.send_group(robot_code, entry.to, msg_key, param)
        else:
            await api.send_direct(robot_code, entry.to, msg_key, param)

    async def send_images(self, message: InboundMessage, images: Sequence[OutImage], hosts: Sequence[str]) -> None:
        """The answer's data-URL images as image messages after it (`handlers/dingtalk/images.py`)."""
        robot_code = message.reply_handle.get("robot_code") or self._filters.robot_code
        runtime = self.runtime
        await send_images(runtime.api, runtime.http, self.metrics, message.reply_handle, robot_code, images, hosts)

    async def send_files(self, message: InboundMessage, files: Sequence[OutFile], hosts: Sequence[str]) -> None:
        """The answer's generated files as file messages after it (`handlers/dingtalk/images.py`)."""
        robot_code = message.reply_handle.get("robot_code") or self._filters.robot_code
        runtime = self.runtime
        await send_files(runtime.api, runtime.http, self.metrics, message.reply_handle, robot_code, files, hosts)

    async def open_stream(self, message: InboundMessage) -> AICardStream | None:
        adopted = self.cards.adopt(message)
        if adopted is not None:  # the card a previous process opened for this message
            return self._card(message, adopted)
        if not self.cfg.card_template_id or not can_carry_card(message.reply_handle):
            return None
        if self.budget.spent:  # no card: the sessionWebhook costs no API call
            return None
        return self._card(message)

    def _card(self, message: InboundMessage, record: CardRecord | None = None) -> AICardStream:
        async def fallback(text: str) -> None:
            await self.send(Reply(message, text))

        return AICardStream(
            self.runtime.api,
            self.cards,
            message,
            self.cfg.card_template_id,
            self.cfg.stream_interval,
            self.metrics,
            fallback,
            final_only=self.budget.degraded,
            record=record,
        )

    async def settle_card(self, record: CardRecord) -> None:
        await self._card(record.message, record).settle(record.text or translator(record.message.locale)(INTERRUPTED))

    async def fetch(self, message: InboundMessage, attachment: Attachment) -> tuple[bytes, str]:
        robot_code = message.reply_handle.get("robot_code") or self._filters.robot_code
        return await retry_transient(
            partial(self.runtime.api.download, robot_code, attachment.ref),
            platform=PLATFORM,
            what="file download",
            metrics=self.metrics,
        )


def setup(app: web.Application) -> None:
    """Register every enabled DingTalk robot: `[dingtalk]` (the bot "default") and `[[dingtalk.bots]]`."""
    for bot in app[CONFIG].enabled_bots(PLATFORM):
        cfg = bot.settings
        assert isinstance(cfg, DingTalkConfig)
        install(app, webhook(DingTalkAdapter(cfg, app[METRICS], bot.name)))
