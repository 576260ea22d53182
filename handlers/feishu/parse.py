"""Pure functions: a Feishu `im.message.receive_v1` event (schema 2.0) -> `InboundMessage`, or the
reason it is dropped. No I/O here; the adapter supplies the bot's open_id, the lists and the clock.

Payload shape: open.feishu.cn "接收消息 im.message.receive_v1" and docs/protocols/feishu.md §B.7. `content` is
a JSON string whose shape depends on `message_type`; mentions appear in text as `@_user_N`
placeholders listed in `message.mentions`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.access import AccessList
from gateway.admission import Dropped
from gateway.i18n import N_, Locale, translator
from gateway.jsonvalues import as_dict, as_str
from gateway.messages import Attachment, ConversationKind, InboundMessage, Quote

PLATFORM = "feishu"
EVENT_TYPE = "im.message.receive_v1"
QUOTE_CHARS = 4_000  # a quoted message's text, as far as the model is given it

_PLACEHOLDER = re.compile(r"@_user_\d+|@_all")
_UNSUPPORTED_LABELS = {
    "audio": N_("voice messages"),
    "media": N_("videos"),
    "share_chat": N_("shared chats"),
    "share_user": N_("shared contacts"),
    "merge_forward": N_("forwarded chat histories"),
    "location": N_("locations"),
}
UNSUPPORTED = N_(
    "Sorry, I can't read {what} yet. Please send me your question as text "
    "(pictures work too)."
)


@dataclass(frozen=True, slots=True)
class Rules:
    """Who may talk to the bot, and how old a delivery may be."""

    bot_open_id: str
    users: AccessList = field(default_factory=AccessList)
    chats: AccessList = field(default_factory=AccessList)
    max_age: float = 600.0


def _mention_texts(mentions: list[Any], bot_open_id: str) -> tuple[dict[str, str], bool]:
    """Placeholder -> replacement ("" for the bot, "@Name" for others), and whether the bot is
    among them (by open_id: a mention of someone else, even named like the bot, is not enough)."""
    texts: dict[str, str] = {}
    bot_mentioned = False
    for mention in mentions:
        mention = as_dict(mention)
        key = as_str(mention.get("key"))
        is_bot = bool(bot_open_id) and as_str(as_dict(mention.get("id")).get("open_id")) == bot_open_id
        bot_mentioned = bot_mentioned or is_bot
        if key:
            name = as_str(mention.get("name"))
            texts[key] = "" if is_bot else (f"@{name}" if name else "")
    return texts, bot_mentioned


def _resolve(text: str, mentions: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: mentions.get(m.group(), "@all" if m.group() == "@_all" else ""), text)


def _post_body(content: dict[str, Any]) -> dict[str, Any]:
    """Received posts are `{"title", "content"}`; some payloads wrap that in a locale key."""
    if "content" in content:
        return content
    for value in content.values():
        if isinstance(value, dict) and "content" in value:
            return value
    return {}


def _post(content: dict[str, Any], mentions: dict[str, str]) -> tuple[str, list[Attachment]]:
    body = _post_body(content)
    lines = [as_str(body.get("title"))] if as_str(body.get("title")) else []
    images: list[Attachment] = []
    for paragraph in body.get("content") or []:
        pieces: list[str] = []
        for element in paragraph if isinstance(paragraph, list) else []:
            element = as_dict(element)
            tag = element.get("tag")
            if tag == "at":
                name = as_str(element.get("user_name"))
                pieces.append(mentions.get(as_str(element.get("user_id")), f"@{name}" if name else ""))
            elif tag == "a":
                text, href = as_str(element.get("text")), as_str(element.get("href"))
                pieces.append(f"[{text}]({href})" if href and text != href else text or href)
            elif tag == "img":
                if key := as_str(element.get("image_key")):
                    images.append(Attachment("image", key))
            elif tag == "emotion":
                pieces.append(f":{as_str(element.get('emoji_type'))}:")
            elif tag == "code_block":
                pieces.append(f"```{as_str(element.get('language')).lower()}\n{as_str(element.get('text'))}\n```")
            elif tag == "hr":
                pieces.append("---")
            else:  # text, md and tags we do not know that carry text
                pieces.append(_resolve(as_str(element.get("text")), mentions))
        lines.append("".join(pieces))
    return "\n".join(lines), images


def _age_base(message: dict[str, Any], header: dict[str, Any]) -> float | None:
    """When the message was sent (seconds), from `create_time` in milliseconds."""
    for raw in (message.get("create_time"), header.get("create_time")):
        try:
            return int(str(raw)) / 1000.0
        except (ValueError, OverflowError):  # not a number, or one no clock will ever show
            continue
    return None


def parse_event(
    body: Mapping[str, Any], rules: Rules, transport: str, now: float, locale: Locale | None = None
) -> InboundMessage | Dropped:
    """One event -> the normalized message, or why it is not answered. Its notices are worded in
    `locale`, the bot's (None: English, and the adapter chooses the message's)."""
    header = as_dict(body.get("header"))
    if header.get("event_type") != EVENT_TYPE:
        return Dropped("event_type", as_str(header.get("event_type")) or "v1 or unknown schema")
    event = as_dict(body.get("event"))
    message, sender = as_dict(event.get("message")), as_dict(event.get("sender"))
    message_id, chat_id = as_str(message.get("message_id")), as_str(message.get("chat_id"))
    if not message_id or not chat_id:
        return Dropped("malformed", "message_id or chat_id missing")
    sender_id = as_str(as_dict(sender.get("sender_id")).get("open_id"))
    if rules.bot_open_id and sender_id == rules.bot_open_id:
        return Dropped("self")
    if sender.get("sender_type") == "app":
        # Another bot: two bots answering each other would loop forever.
        return Dropped("bot")
    sent_at = _age_base(message, header)
    if sent_at is not None and now - sent_at > rules.max_age:
        return Dropped("stale", f"{now - sent_at:.0f} s old")
    if not rules.users.permits(sender_id) or not rules.chats.permits(chat_id):
        return Dropped("filtered")

    mentions, bot_mentioned = _mention_texts(list(message.get("mentions") or []), rules.bot_open_id)
    chat_type = as_str(message.get("chat_type"))
    direct = chat_type == "p2p"
    if not direct and not bot_mentioned:
        return Dropped("not_mentioned")

    try:
        content = as_dict(orjson.loads(as_str(message.get("content")) or "{}"))
    except orjson.JSONDecodeError:
        return Dropped("malformed", "content is not JSON")
    message_type = as_str(message.get("message_type"))
    text, unsupported = "", ""
    attachments: list[Attachment] = []
    if message_type == "text":
        text = _resolve(as_str(content.get("text")), mentions)
    elif message_type == "post":
        text, attachments = _post(content, mentions)
    elif message_type == "image" and as_str(content.get("image_key")):
        attachments = [Attachment("image", as_str(content.get("image_key")))]
    elif message_type == "audio" and as_str(content.get("file_key")):
        # Opus; transcribed by the core when the agent has a `transcription_model`.
        attachments = [Attachment("audio", as_str(content.get("file_key")), "voice.opus")]
    elif message_type == "file" and as_str(content.get("file_key")):  # read by `gateway.document_step`
        attachments = [Attachment("file", as_str(content.get("file_key")), as_str(content.get("file_name")))]
    elif message_type == "sticker":  # nothing to answer: left alone, counted as dropped
        return Dropped("sticker")
    else:
        _ = translator(locale or Locale.EN)
        label = _UNSUPPORTED_LABELS.get(message_type)
        what = _(label) if label else _("“{kind}” messages", kind=message_type)
        unsupported = _(UNSUPPORTED, what=what)

    thread_id = as_str(message.get("thread_id"))
    return InboundMessage(
        platform=PLATFORM,
        transport=transport,
        # A thread (topic) is its own conversation: its own context and ordering.
        conversation_id=f"{chat_id}:{thread_id}" if thread_id else chat_id,
        conversation_kind=ConversationKind.DM if direct else ConversationKind.GROUP,
        sender_id=sender_id,
        sender_name="",  # the event carries no display name; fetching one costs an API call
        text=text.strip(),
        mentioned=direct or bot_mentioned,
        message_id=message_id,
        reply_handle={
            "message_id": message_id,
            "chat_id": chat_id,
            "chat_type": chat_type,
            "thread_id": thread_id,
        },
        attachments=tuple(attachments),
        unsupported=unsupported,
        locale=locale,
        # A reply names the message it quotes; the adapter fetches it when answering.
        quote=Quote(ref=parent_id, pending=True) if (parent_id := as_str(message.get("parent_id"))) else None,
    )


# What a card reads like through the message API when the app cannot render it for us.
_CARD_PLACEHOLDERS = ("请升级至最新版本客户端，以查看内容", "Please upgrade to the latest version")


def parse_quoted(item: Mapping[str, Any], own_ids: tuple[str, ...], asker: str) -> Quote:
    """One message of `GET /open-apis/im/v1/messages/{id}` (`data.items[0]`: `msg_type`,
    `body.content` as a JSON string, `sender {id, sender_type}`, `mentions`, `parent_id`) -> the
    quote the model is shown. Pictures (also a post's) are image attachments downloaded under
    the quoted message's id; a file is a file attachment; a card it cannot read is said so.
    `own_ids`: the bot's app_id and open_id; `asker`: the replying user's open_id. `inner` is left
    for the adapter to fetch (its `ref` is the quoted message's own `parent_id`)."""
    ref = as_str(item.get("message_id"))
    kind = as_str(item.get("msg_type"))
    sender = as_dict(item.get("sender"))
    author = as_str(sender.get("id"))
    if sender.get("sender_type") == "app":  # an app's id is its app_id ("cli_..."), not an open_id
        who = "you" if not author or author in own_ids else "another bot"
    else:
        who = "the user" if author and author == asker else ""
    mentions = {
        as_str(m.get("key")): f"@{as_str(m.get('name'))}" if as_str(m.get("name")) else ""
        for m in map(as_dict, item.get("mentions") or [])
    }
    try:
        content = as_dict(orjson.loads(as_str(as_dict(item.get("body")).get("content")) or "{}"))
    except orjson.JSONDecodeError:
        content = {}
    text, unreadable = "", False
    attachments: list[Attachment] = []
    if kind == "text":
        text = _resolve(as_str(content.get("text")), mentions)
    elif kind == "post":
        text, images = _post(content, mentions)
        attachments = [Attachment("image", a.ref, source=ref) for a in images]
    elif kind == "image" and as_str(content.get("image_key")):
        attachments = [Attachment("image", as_str(content.get("image_key")), source=ref)]
    elif kind == "file" and as_str(content.get("file_key")):
        text = as_str(content.get("file_name"))
        attachments = [Attachment("file", as_str(content.get("file_key")), text, source=ref)]
    elif kind == "interactive":
        text = _card_text(content)
        unreadable = not text
    else:
        unreadable = True
    parent = as_str(item.get("parent_id"))
    return Quote(
        ref=ref,
        sender=who,
        kind=kind,
        text=text.strip()[:QUOTE_CHARS],
        attachments=tuple(attachments),
        unreadable=unreadable,
        inner=Quote(ref=parent, pending=True) if parent else None,
    )


def _card_text(content: dict[str, Any]) -> str:
    """The readable text of a card as the message API returns it (`title` and `elements`, a post's
    paragraphs), "" when it holds none or only the "upgrade your client" placeholder."""
    pieces = [as_str(content.get("title"))]
    for paragraph in content.get("elements") or []:
        for element in paragraph if isinstance(paragraph, list) else [paragraph]:
            element = as_dict(element)
            pieces.append(as_str(element.get("text")) or as_str(element.get("content")))
    text = "\n".join(p.strip() for p in pieces if p.strip())
    return "" if any(p in text for p in _CARD_PLACEHOLDERS) else text
