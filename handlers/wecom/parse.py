"""Pure functions: a WeCom AI-bot callback body -> `InboundMessage`, or the reason it is dropped.
No I/O here; the adapter supplies the rules, the clock and where the callback came from.

A callback's body is the same JSON on the long connection (`aibot_msg_callback`) and through the
callback URL (decrypted), docs/protocols/wecom.md: `msgid`, `aibotid`, `chatid` (groups only),
`chattype` (`single` | `group`), `from.userid`, `msgtype` and its object, `quote`, `response_url`.
Groups deliver only messages that @-mention the bot, with no mention metadata: the bot's
"@name" stays in the text and is stripped here. Media come as a URL valid for 5 minutes plus, on
the long connection, the AES key that decrypts it; a voice message comes already transcribed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.access import AccessList
from gateway.admission import Dropped
from gateway.i18n import N_, Locale, translator
from gateway.jsonvalues import as_dict, as_str
from gateway.messages import Attachment, ConversationKind, InboundMessage, Quote

from . import frame as wf

PLATFORM = "wecom"
MESSAGE, EVENT = wf.MSG_CALLBACK, wf.EVENT_CALLBACK
QUOTE_CHARS = 4_000  # a quoted message's text, as far as the model is given it

UNSUPPORTED = N_("Sorry, I can't read {what} yet. Please send your question as text.")
WELCOME = N_("Hello! I'm your AI assistant. Ask me anything, here or by @-mentioning me in a group.")
_UNSUPPORTED_NAMES = {"video": N_("videos")}
# WeCom puts one or two spaces (or a full-width one) after a mention.
_SPACE = "[ \u3000\u00a0]"
_FIRST_MENTION = re.compile(rf"^\s*[@＠]\S+{_SPACE}*")


@dataclass(frozen=True, slots=True)
class Rules:
    """Who may talk to the bot, how old a message may be, and the bot's own names."""

    bot_id: str = ""  # a callback for another bot (a misrouted URL) is dropped
    bot_name: str = ""  # its display name: "@name" is stripped; "" = the first "@word"
    users: AccessList = field(default_factory=AccessList)
    chats: AccessList = field(default_factory=AccessList)
    max_age: float = 600.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One callback as it arrived: its body and how to answer it. `req_id` and `connection` are the
    long connection's (a reply frame must echo the req_id, on the socket it came on); a callback
    through the URL has neither."""

    body: Mapping[str, Any]
    req_id: str = ""
    connection: str = ""
    cmd: str = MESSAGE

    def to_dict(self) -> dict[str, Any]:
        return {"body": dict(self.body), "req_id": self.req_id, "connection": self.connection, "cmd": self.cmd}

    @classmethod
    def of(cls, data: object) -> Delivery | None:
        """A delivery from `to_dict()`'s shape, None when it is not one."""
        data = as_dict(data)
        body = data.get("body")
        if not isinstance(body, dict):
            return None
        return cls(body, as_str(data.get("req_id")), as_str(data.get("connection")), as_str(data.get("cmd")) or MESSAGE)


def event_type(body: Mapping[str, Any]) -> str:
    """The `eventtype` of an event callback ("enter_chat", "disconnected_event", ...), else ""."""
    if body.get("msgtype") != "event":
        return ""
    return as_str(as_dict(body.get("event")).get("eventtype"))


def welcome(locale: Locale) -> str:
    """The answer to `enter_chat` (a user opening the bot's chat), worded in `locale`."""
    return translator(locale)(WELCOME)


def strip_mention(text: str, bot_name: str) -> str:
    """The text without the leading "@BotName" WeCom leaves in a group message (a display name
    may hold spaces: with `bot_name` known it is matched whole), nor the spaces after it."""
    if bot_name:
        for at in ("@", "＠"):
            head = at + bot_name
            stripped = text.lstrip()
            if stripped.startswith(head):
                return re.sub(rf"^{_SPACE}+", "", stripped[len(head) :]).strip()
        # Not at the start: the bot was mentioned later on ("hello @Bot"); drop that mention.
        return re.sub(rf"[@＠]{re.escape(bot_name)}{_SPACE}*", "", text).strip()
    return _FIRST_MENTION.sub("", text, count=1).strip()


@dataclass(frozen=True, slots=True)
class _Content:
    text: str = ""
    attachments: tuple[Attachment, ...] = ()
    keys: tuple[tuple[str, str], ...] = ()  # (url, aeskey) of each attachment that has a key
    kind: str = ""  # the first unsupported part's type


def _content(parts: tuple[wf.Part, ...]) -> _Content:
    """What a message's parts say: text (a voice message's is WeCom's transcription), pictures
    and files as attachments with their keys."""
    texts: list[str] = []
    attachments: list[Attachment] = []
    keys: list[tuple[str, str]] = []
    unsupported = ""
    for part in parts:
        if part.kind in ("text", "voice"):
            if part.text:
                texts.append(part.text)
        elif part.kind in ("image", "file") and part.url:
            attachments.append(Attachment(part.kind, part.url))
            if part.aeskey:
                keys.append((part.url, part.aeskey))
        else:
            unsupported = unsupported or part.kind
    return _Content("\n".join(texts), tuple(attachments), tuple(keys), unsupported)


def _quote(callback: wf.MessageCallback) -> tuple[Quote | None, tuple[tuple[str, str], ...]]:
    if not callback.quote:
        return None, ()
    content = _content(callback.quote)
    quote = Quote(
        kind=callback.quote_msgtype,
        text=content.text.strip()[:QUOTE_CHARS],
        attachments=content.attachments,
        # A card or other message WeCom shows as "[该消息类型暂不能展示]" carries nothing readable.
        unreadable=bool(content.kind) and not (content.text or content.attachments),
    )
    return quote, content.keys


def parse_callback(
    delivery: Delivery, rules: Rules, transport: str, now: float, locale: Locale | None = None
) -> InboundMessage | Dropped:
    """One message callback -> the normalized message, or why it is not answered. Its notices are
    worded in `locale`, the bot's (None: English, and the adapter chooses the message's)."""
    body = delivery.body
    if body.get("msgtype") == "event" or delivery.cmd == EVENT:
        return Dropped("event", event_type(body) or "unknown")
    try:
        callback = wf.parse_message(dict(body), delivery.req_id)
    except wf.FrameError as e:
        return Dropped("malformed", str(e))
    if callback.msgtype == "stream":  # a callback-mode refresh poll: answered by the webhook itself
        return Dropped("malformed", "a stream refresh is no message")
    sender, chatid = callback.userid, callback.chatid
    if sender == "sys":  # WeCom's own notices
        return Dropped("bot")
    if rules.bot_id and callback.aibotid and callback.aibotid != rules.bot_id:
        return Dropped("filtered", "for another bot")
    if callback.create_time is not None and now - callback.create_time > rules.max_age:
        return Dropped("stale", f"{now - callback.create_time:.0f} s old")
    group = callback.chattype == "group"
    if not rules.users.permits(sender) or (group and not rules.chats.permits(chatid)):
        return Dropped("filtered")

    content = _content(callback.parts)
    text = strip_mention(content.text, rules.bot_name) if group else content.text.strip()
    unsupported = ""
    if content.kind and not (text or content.attachments):
        _ = translator(locale or Locale.EN)
        label = _UNSUPPORTED_NAMES.get(content.kind)
        what = _(label) if label else _("“{kind}” messages", kind=content.kind)
        unsupported = _(UNSUPPORTED, what=what)
    quote, quote_keys = _quote(callback)
    # A single chat has no chatid: the user's id is the conversation, and the target of a push.
    target = callback.conversation
    return InboundMessage(
        platform=PLATFORM,
        transport=transport,
        conversation_id=target,
        conversation_kind=ConversationKind.GROUP if group else ConversationKind.DM,
        sender_id=sender,
        sender_name="",  # the callback carries no display name
        text=text,
        mentioned=True,  # a group delivers only what mentions the bot
        message_id=callback.msgid,
        reply_handle={
            "req_id": delivery.req_id,
            "connection": delivery.connection,
            "chatid": target,
            "chattype": callback.chattype,
            "response_url": callback.response_url,
            "aeskeys": dict(content.keys + quote_keys),  # url -> the key its download is decrypted with
        },
        attachments=content.attachments,
        unsupported=unsupported,
        locale=locale,
        quote=quote,
    )
