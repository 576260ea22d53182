"""`FeishuAdapter`: one Feishu/Lark app on the shared `Adapter` skeleton.

Inbound: long-connection data frames and webhook deliveries carry the same event JSON, parsed by
`parse_event` with the bot's own open_id (needed to tell a mention of the bot from others).
Outbound: threaded replies, idempotent per part, and answers streamed into a CardKit card.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import aiohttp
import orjson
from aiohttp import web

from gateway.access import AccessList
from gateway.adapter import DEFAULT_BOT, Adapter, Runtime
from gateway.admission import Dropped
from gateway.config import FeishuConfig
from gateway.errors import PlatformError
from gateway.i18n import translator
from gateway.images_out import OutFile, OutImage
from gateway.keys import CONFIG, METRICS
from gateway.messages import (
    QUOTE,
    QUOTE_MIME,
    Attachment,
    ConversationKind,
    InboundMessage,
    Quote,
    Reply,
    ReplyKind,
)
from gateway.metrics import Metrics
from gateway.ratelimit import Rate, RateLimiter, per_second
from gateway.render import Part
from gateway.retry import retry_transient
from gateway.store import CardRecord, OutboxEntry
from gateway.streaming import INTERRUPTED, CardBook

from ..webhook import install
from .api import FeishuApi
from .card import FeishuCardStream
from .images import Uploaded, send_files, send_images, send_uploaded, upload_images, with_images
from .parse import PLATFORM, Rules, parse_event, parse_quoted
from .render import defuse, mention_element, render
from .webhook import webhook
from .ws import FeishuWsClient

log = logging.getLogger(__name__)

# With the budget spent an answer is one reply whatever its length: a text message holds far more
# than a card (150 KB against 30 KB), at the price of showing the markdown as it is written.
TEXT_LIMIT_BYTES = 60_000
# The reaction on the user's message while an answer without a card is made ("OnIt": the emoji
# list of the message reactions API, docs/protocols/feishu.md).
WORKING_EMOJI = "OnIt"
UPLOADS_KEPT = 256  # answers' uploaded images waiting for their answer (one each while it is delivered)


def reply_uuid(message_id: str, kind: str, index: int) -> str:
    """Feishu's idempotency key for one reply part: a resend of the same part (a retry, a restart
    that answers again) is swallowed by Feishu instead of showing twice. At most 50 characters."""
    return hashlib.sha256(f"{message_id}|{kind}|{index}".encode()).hexdigest()[:40]


def cheapest(text: str, mention: str = "") -> list[Part]:
    """The parts of `text` when every call counts: one text message if it would need several
    (a text message's mention is `<at user_id="open_id"></at>`)."""
    parts = render(text, mention)
    if len(parts) > 1 and len(text.encode()) <= TEXT_LIMIT_BYTES:
        at = f'<at user_id="{mention}"></at> ' if mention and mention_element(mention) else ""
        return [Part(text, "text", {"text": at + defuse(text)})]
    return parts


def mention_of(message: InboundMessage) -> str:
    """Whom a reply @mentions (docs/chat.md "Group etiquette"): the asker in a group, else nobody."""
    return message.sender_id if message.conversation_kind is ConversationKind.GROUP else ""


class FeishuAdapter(Adapter[FeishuConfig, FeishuApi]):
    platform = PLATFORM
    long_transport = "ws"
    cards: CardBook
    identity = "app_id"

    def __init__(self, cfg: FeishuConfig, metrics: Metrics, name: str = DEFAULT_BOT) -> None:
        super().__init__(cfg, metrics, name)
        self._users = AccessList.of(cfg.allow_users, cfg.deny_users)
        self._chats = AccessList.of(cfg.allow_chats, cfg.deny_chats)
        self.cards = CardBook(PLATFORM, name)
        # message_id -> the answer's images uploaded before it is delivered (`upload_answer_images`)
        self._uploads: dict[str, Uploaded] = {}

    # -- the skeleton's hooks --------------------------------------------------------------------
    def make_api(self, http: aiohttp.ClientSession) -> FeishuApi:
        return FeishuApi(http, self.cfg.domain, self.cfg.app_id, self.cfg.app_secret, self.budget, self.limiter)

    def use_secrets(self, api: FeishuApi) -> None:
        api.use_secret(self.cfg.app_secret)  # encrypt_key, verification_token: the webhook reads cfg

    def make_limiter(self) -> RateLimiter:
        # Per app and API: 1000 calls a minute and 50 a second; replies also 5 a second per chat,
        # shared by every bot in it (docs/protocols/feishu.md §B.13).
        qpm = (Rate(self.cfg.api_qpm, 60.0),) if self.cfg.api_qpm > 0 else ()
        return RateLimiter(
            default=per_second(self.cfg.api_qps) + qpm, scoped={"reply": per_second(self.cfg.chat_qps)}
        )

    def make_client(self, runtime: Runtime[FeishuApi]) -> FeishuWsClient:
        return FeishuWsClient(runtime.api, runtime.http, self.prepare_payload, self.cfg.stale_after)

    async def parse(self, body: object, transport: str) -> InboundMessage | Dropped:
        if not isinstance(body, dict):
            return Dropped("malformed", "event is not a JSON object")
        # Raises PlatformError while the bot's open_id is unknown: the event stays unacknowledged.
        bot_open_id = await self.runtime.api.bot_open_id()
        rules = Rules(bot_open_id, self._users, self._chats, self.cfg.max_message_age)
        return parse_event(body, rules, transport, time.time(), self.locale())

    # -- outbound --------------------------------------------------------------------------------
    async def send(self, reply: Reply) -> None:
        adopted = self.cards.adopt(reply.to)
        if adopted is not None:  # a card a previous process opened for this message ends with it
            await self._card(reply.to, adopted).finish(reply.text)
            return
        kind = "notice" if reply.kind is ReplyKind.NOTICE else "answer"
        mention = mention_of(reply.to)
        parts = cheapest(reply.text, mention) if self.budget.spent else render(reply.text, mention)
        if kind == "answer":
            parts = with_images(parts, self._uploads.get(reply.to.message_id))
        await self.reply_parts(reply.to, parts, kind)

    async def upload_answer_images(
        self, message: InboundMessage, images: Sequence[OutImage], hosts: Sequence[str]
    ) -> None:
        """The answer's images uploaded before it is delivered, so that its card or post shows
        them (`handlers/feishu/images.py`); `send_images` sends those it does not show."""
        uploaded = await upload_images(self.runtime.api, self.runtime.http, self.metrics, images, hosts)
        while len(self._uploads) >= UPLOADS_KEPT:  # answers whose delivery failed: the oldest go
            del self._uploads[next(iter(self._uploads))]
        self._uploads[message.message_id] = uploaded

    async def send_images(self, message: InboundMessage, images: Sequence[OutImage], hosts: Sequence[str]) -> None:
        """The answer's images its message does not show, as image replies after it
        (`handlers/feishu/images.py`): those uploaded ahead, else all of them."""
        uploaded = self._uploads.pop(message.message_id, None)
        if uploaded is not None:
            if not uploaded.shown:
                await send_uploaded(self.reply_parts, message, uploaded)
            return
        api, http = self.runtime.api, self.runtime.http
        await send_images(api, http, self.reply_parts, self.metrics, message, images, hosts)

    async def send_files(self, message: InboundMessage, files: Sequence[OutFile], hosts: Sequence[str]) -> None:
        """The answer's generated files, as file replies after it (`handlers/feishu/images.py`)."""
        api, http = self.runtime.api, self.runtime.http
        await send_files(api, http, self.reply_parts, self.metrics, message, files, hosts)

    async def open_stream(self, message: InboundMessage) -> FeishuCardStream | None:
        adopted = self.cards.adopt(message)
        if adopted is not None:  # the card a previous process opened for this message
            return self._card(message, adopted)
        if self.budget.degraded:
            return None  # one reply instead of card create + reply + updates + close
        return self._card(message)

    def _card(self, message: InboundMessage, record: CardRecord | None = None) -> FeishuCardStream:
        async def deliver(parts: Sequence[Part], kind: str, first: int) -> None:
            await self.reply_parts(message, parts, kind, first)

        api, interval = self.runtime.api, self.cfg.stream_interval
        mention = mention_of(message) if record is None else ""  # an adopted card has its own already
        uploads = partial(self._uploads.get, message.message_id)
        return FeishuCardStream(api, self.cards, message, deliver, interval, self.metrics, record, mention, uploads)

    async def settle_card(self, record: CardRecord) -> None:
        await self._card(record.message, record).settle(record.text or translator(record.message.locale)(INTERRUPTED))

    async def fetch(self, message: InboundMessage, attachment: Attachment) -> tuple[bytes, str]:
        if attachment.kind == QUOTE:
            return orjson.dumps((await self.quote(message, attachment.ref)).to_dict()), QUOTE_MIME
        kind = "image" if attachment.kind == "image" else "file"  # audio, video, files: "file"
        # A quoted message's picture or file is a resource of that message, not of the reply.
        owner = attachment.source or message.reply_handle["message_id"]
        return await retry_transient(
            partial(self.runtime.api.download, owner, attachment.ref, kind),
            platform=PLATFORM,
            what="file download",
            metrics=self.metrics,
        )

    async def quote(self, message: InboundMessage, parent_id: str) -> Quote:
        """The message `parent_id` (the one `message` replies to) and, one level deeper, the one
        that quotes in turn. Raises `PlatformError` when the first cannot be fetched; a failed
        inner one is marked `failed`."""
        api = self.runtime.api
        own = (self.cfg.app_id, await api.bot_open_id())

        async def get(message_id: str) -> Quote:
            item = await retry_transient(
                partial(api.get_message, message_id), platform=PLATFORM, what="quote fetch", metrics=self.metrics
            )
            return parse_quoted(item, own, message.sender_id)

        quote = await get(parent_id)
        if quote.inner is not None and quote.inner.pending:
            try:
                inner = replace(await get(quote.inner.ref), inner=None)  # one level deep, no further
            except PlatformError as e:
                log.info("inner quote not fetched: %s", e, extra={"platform": PLATFORM})
                inner = Quote(ref=quote.inner.ref, failed=True)
            quote = replace(quote, inner=inner)
        return quote

    # -- the working indicator (gateway/working.py): a reaction while an answer without a card is made
    async def mark_working(self, message: InboundMessage) -> str:
        if self.budget.spent:  # the cheapest path: no calls beyond the answer
            return ""
        return await self.runtime.api.add_reaction(message.reply_handle["message_id"], WORKING_EMOJI)

    async def unmark_working(self, message: InboundMessage, mark: str) -> None:
        await self.runtime.api.remove_reaction(message.reply_handle["message_id"], mark)

    # -- proactive (gateway/outbox.py) -------------------------------------------------------------
    def push_limit(self, markdown: bool) -> int:
        return TEXT_LIMIT_BYTES

    async def push(self, entry: OutboxEntry) -> None:
        """A new message in a chat (chat_id) or to a user (open_id): markdown as cards (several
        for a long one, in order), text as one text message. Each part carries a uuid made from
        the entry's id, so the outbox may repeat an attempt after any failure."""
        text = [Part(entry.text, "text", {"text": defuse(entry.text)})]
        parts = render(entry.text) if entry.markdown else text
        id_type = "chat_id" if entry.to_kind == "conversation" else "open_id"
        for index, part in enumerate(parts):
            await self.runtime.api.create_message(id_type, entry.to, part, reply_uuid(entry.id, "push", index))

    async def reply_parts(self, message: InboundMessage, parts: Sequence[Part], kind: str, first: int = 0) -> None:
        """Send `parts` in order as replies to the message (in its thread if it came from one)."""
        handle, api = message.reply_handle, self.runtime.api
        in_thread = bool(handle.get("thread_id"))
        chat_id = handle.get("chat_id", "")  # its rate limit: 5 messages a second per chat
        for index, part in enumerate(parts, first):
            uuid = reply_uuid(message.message_id, kind, index)
            # Retried part by part; the uuid makes a retry of a reply that did arrive a no-op.
            await retry_transient(
                partial(api.reply, handle["message_id"], part, uuid, in_thread=in_thread, chat_id=chat_id),
                platform=PLATFORM,
                what="reply",
                metrics=self.metrics,
            )


def setup(app: web.Application) -> None:
    """Register every enabled Feishu/Lark app: `[feishu]` (the bot "default") and `[[feishu.bots]]`."""
    for bot in app[CONFIG].enabled_bots(PLATFORM):
        cfg = bot.settings
        assert isinstance(cfg, FeishuConfig)
        install(app, webhook(FeishuAdapter(cfg, app[METRICS], bot.name)))
