"""Robot message JSON -> `InboundMessage`: pure functions over the payload of docs/protocols/dingtalk.md §A.8.

The same body arrives as the `data` of a Stream CALLBACK frame and as an outgoing-robot webhook
POST, so both transports share this. The decoded dict is read once, field by field, as
dingtalk-stream's own `ChatbotMessage.from_dict` reads it (the SDK is the reference for every
message type, and tests/test_dingtalk_parse.py holds this parser to it), without building the SDK's
objects first: that took half of the parse on the intake's hot path. Nothing here touches the
network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.access import AccessList
from gateway.admission import Dropped
from gateway.i18n import N_, Locale, Translator, translator
from gateway.jsonvalues import as_str
from gateway.messages import Attachment, ConversationKind, InboundMessage, Quote

PLATFORM = "dingtalk"
TOPIC = "/v1.0/im/bot/messages/get"  # the CALLBACK topic robot messages arrive on (the SDK's ChatbotMessage.TOPIC)

UNSUPPORTED = N_("Sorry, I can't read {what} yet. Please send your question as text.")
NO_RECOGNITION = N_("Sorry, I couldn't make out that voice message. Please type your question.")
_UNSUPPORTED_NAMES = {"video": N_("videos")}

# DingTalk writes a mention as "@Name" followed by U+2005 (four-per-em space) or a plain space.
_LEADING_MENTION = re.compile(r"^\s*@[^\s\u2005]+[\s\u2005]*")
_MENTION = re.compile(r"(?<![\w@])@[^\s\u2005@]+")  # any mention-like token, not an e-mail address

# A forwarded chat history is bounded before it reaches the model's context.
RECORDS_MAX = 100
RECORD_CHARS = 1_000
QUOTE_CHARS = 4_000  # a quoted message's text, as far as the model is given it


@dataclass(frozen=True, slots=True)
class Filters:
    robot_code: str  # ours; part of every message id so ids of two robots never collide
    senders: AccessList = field(default_factory=AccessList)
    conversations: AccessList = field(default_factory=AccessList)


def message_id(robot_code: str, msg_id: str) -> str:
    """The dedup id: a redelivery has a new frame id but the same body `msgId` (docs/protocols/dingtalk.md §A.11)."""
    return f"{robot_code}:{msg_id}"


def parse_message(
    body: Any, filters: Filters, transport: str, locale: Locale | None = None
) -> InboundMessage | Dropped:
    """One robot message body -> the normalized message, or why it is not answered. Its notices
    are worded in `locale`, the bot's (None: English, and the adapter chooses the message's)."""
    if not isinstance(body, dict):
        return Dropped("malformed", "body is not a JSON object")
    fields = _Fields.read(body)
    if isinstance(fields, Dropped):
        return fields
    msg_id, conversation_id, sender_id = body.get("msgId"), body.get("conversationId"), body.get("senderId")
    if not (isinstance(msg_id, str) and msg_id and isinstance(conversation_id, str) and conversation_id
            and isinstance(sender_id, str) and sender_id):  # fmt: skip
        return Dropped("malformed", "msgId, conversationId or senderId missing")
    conversation_type = body.get("conversationType")
    if conversation_type not in ("1", "2"):
        return Dropped("malformed", f"unknown conversationType {conversation_type!r}")
    group = conversation_type == "2"
    robot_id = body.get("chatbotUserId")
    if robot_id and sender_id == robot_id:
        return Dropped("self")
    if group and body.get("isInAtList") is not True:
        return Dropped("not_mentioned")
    staff_id = as_str(body.get("senderStaffId"))
    if not filters.senders.permits(staff_id or sender_id):
        return Dropped("filtered", "sender")
    if not filters.conversations.permits(conversation_id):
        return Dropped("filtered", "conversation")

    robot_id = as_str(robot_id)
    kind = fields.kind
    text, attachments, unsupported = _content(kind, fields, body, translator(locale or Locale.EN))
    if group and kind in ("text", "richText", "markdown"):  # what the sender typed
        text = strip_own_mention(text, fields.at_ids, robot_id)
    nick = as_str(body.get("senderNick"))
    return InboundMessage(
        platform=PLATFORM,
        transport=transport,
        conversation_id=conversation_id,
        conversation_kind=ConversationKind.GROUP if group else ConversationKind.DM,
        sender_id=staff_id or sender_id,
        sender_name=nick,
        text=text.strip(),
        mentioned=True,  # a group message got here only because it @mentioned the robot
        message_id=message_id(filters.robot_code, msg_id),
        reply_handle={
            "session_webhook": as_str(body.get("sessionWebhook")),
            "session_webhook_expires": fields.webhook_expires,  # ms since epoch
            "conversation_type": conversation_type,
            "conversation_id": conversation_id,
            "sender_staff_id": staff_id,
            "sender_nick": nick,
            "robot_code": as_str(body.get("robotCode")) or filters.robot_code,
        },
        attachments=attachments,
        unsupported=unsupported,
        locale=locale,
        quote=quoted(body, robot_id, sender_id),
    )


@dataclass(frozen=True, slots=True)
class _Fields:
    """What `ChatbotMessage.from_dict` would refuse a body for (its `int()` of the webhook expiry,
    `atUsers` entries read as objects, the `text` object of a text message, the `content` object
    of a picture or richText), read once, with the values those checks produce."""

    kind: str  # msgtype
    webhook_expires: int  # sessionWebhookExpiredTime, ms since epoch (0: none)
    at_ids: list[str]  # atUsers[].dingtalkId, in order
    text: str  # text.content of a text message
    content: dict[str, Any]  # the content object ({} when absent or not an object)

    @staticmethod
    def read(body: dict[str, Any]) -> _Fields | Dropped:
        expires = body.get("sessionWebhookExpiredTime")
        if expires is not None:
            try:
                expires = int(expires)
            except (TypeError, ValueError, OverflowError) as e:
                return Dropped("malformed", f"sessionWebhookExpiredTime: {type(e).__name__}: {e}")
        users = body.get("atUsers") or ()  # (empty in every 1:1 message)
        if users and (not isinstance(users, list) or not all(isinstance(u, dict) for u in users)):
            return Dropped("malformed", "atUsers is not a list of objects")
        kind, extra = body.get("msgtype"), body.get("content")
        content = extra if isinstance(extra, dict) else {}
        text = ""
        if kind == "text":
            said = body.get("text")
            if not isinstance(said, dict):
                return Dropped("malformed", "a text message without its text object")
            text = as_str(said.get("content"))
        elif kind in ("picture", "richText") and not isinstance(extra, dict):
            return Dropped("malformed", f"a {kind} message without its content object")
        return _Fields(
            kind if isinstance(kind, str) else "",
            expires or 0,
            [as_str(u.get("dingtalkId")) for u in users],
            text,
            content,
        )


def quoted(body: dict[str, Any], robot_id: str, sender_id: str) -> Quote | None:
    """A reply's quoted message: `text.isReplyMsg` with `text.repliedMsg {msgType, msgId,
    senderId, content}` (docs/protocols/dingtalk.md §A.8). Its picture (and a richText's) becomes
    an image attachment, a file a file attachment; a quoted card is said to be unreadable unless
    it carries a text."""
    extra = body.get("text")
    replied = extra.get("repliedMsg") if isinstance(extra, dict) and extra.get("isReplyMsg") is True else None
    return _quote(replied, robot_id, sender_id, nested=True) if isinstance(replied, dict) else None


def _quote(replied: dict[str, Any], robot_id: str, sender_id: str, nested: bool) -> Quote:
    kind = as_str(replied.get("msgType")) or "text"
    ref = as_str(replied.get("msgId"))
    raw = replied.get("content")
    if isinstance(raw, str):  # a JSON string in some payloads, plain text in others
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raw = {"text": raw}
    content = raw if isinstance(raw, dict) else {}
    author = as_str(replied.get("senderId"))
    name = _first_text(replied, "senderNick", "senderName")
    sender = "you" if robot_id and author == robot_id else ("the user" if author and author == sender_id else name)
    text, attachments, unreadable = "", [], False
    if kind == "picture":
        code = as_str(content.get("downloadCode")) or as_str(content.get("pictureDownloadCode"))
        attachments = [Attachment("image", code, source=ref)] if code else []
        unreadable = not code
    elif kind == "richText":
        texts: list[str] = []
        for item in content.get("richText") or ():
            if not isinstance(item, dict):
                continue
            said = item.get("text") if isinstance(item.get("text"), str) else item.get("content")
            if item.get("type") == "picture" or item.get("msgType") == "picture":
                code = as_str(item.get("downloadCode")) or as_str(item.get("pictureDownloadCode"))
                if code:
                    attachments.append(Attachment("image", code, source=ref))
            elif item.get("type") == "at" and as_str(item.get("atName")):
                texts.append(f"@{as_str(item.get('atName'))}")
            elif isinstance(said, str):
                texts.append(said)
        text = " ".join(t.strip() for t in texts if t.strip())
    elif kind in ("file", "unknownMsgType"):
        name_ = as_str(content.get("fileName"))
        code = as_str(content.get("downloadCode"))
        text = name_
        attachments = [Attachment("file", code, name_, source=ref)] if code else []
    elif kind == "interactiveCard":
        text = _first_text(content, "text", "title")
        unreadable = not text
    else:  # text, markdown, and types we do not know that carry a text
        text = _first_text(content, "text", "content")
        unreadable = not text and kind != "text"
    inner = replied.get("repliedMsg") if nested else None
    return Quote(
        ref=ref,
        sender=sender,
        kind=kind,
        text=text[:QUOTE_CHARS],
        attachments=tuple(attachments),
        unreadable=unreadable,
        inner=_quote(inner, robot_id, sender_id, nested=False) if isinstance(inner, dict) else None,
    )


def strip_own_mention(text: str, at_ids: list[str], robot_id: str) -> str:
    """Drop the robot's own leading "@Name", and only that one: "@Bob please check" asks about Bob.

    DingTalk removes the robot's mention from `text.content` in most payloads, and the payload
    names mentioned people only by id (`atUsers[].dingtalkId`), never by the name in the text. So:
    when the text holds fewer mentions than `atUsers` lists, the robot's is already gone; when it
    holds them all, the robot's is the leading one only if the robot is first in `atUsers`."""
    if robot_id and robot_id not in at_ids:
        return text.replace("\u2005", " ")
    ours_first = not at_ids or at_ids[0] == robot_id or not robot_id
    if ours_first and len(_MENTION.findall(text)) >= max(1, len(at_ids)):
        text = _LEADING_MENTION.sub("", text, count=1)
    return text.replace("\u2005", " ")


def _content(
    kind: str, fields: _Fields, body: dict[str, Any], _: Translator
) -> tuple[str, tuple[Attachment, ...], str]:
    """(text, attachments, unsupported notice worded by `_`) for each message type."""
    content = fields.content
    if kind == "text":
        return fields.text, (), ""
    if kind == "picture":
        # Some payloads carry the code as `pictureDownloadCode` only (docs/protocols/dingtalk.md §A.8).
        code = as_str(content.get("downloadCode")) or as_str(content.get("pictureDownloadCode"))
        if not code:
            return "", (), _(UNSUPPORTED, what=_("this picture"))
        return "", (Attachment("image", code),), ""
    if kind == "richText":
        texts: list[str] = []
        images: list[Attachment] = []
        items = content.get("richText")
        for item in items if isinstance(items, list) else ():
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("text"), str):
                texts.append(item["text"])
            elif isinstance(item.get("downloadCode"), str) and item.get("type", "picture") == "picture":
                images.append(Attachment("image", item["downloadCode"]))
        return "\n".join(t.strip() for t in texts if t.strip()), tuple(images), ""
    if kind == "audio":
        recognition = as_str(content.get("recognition")).strip()
        return (recognition, (), "") if recognition else ("", (), _(NO_RECOGNITION))
    if kind == "file":  # a document, downloaded and read by `gateway.document_step` (1:1 chats only)
        code = as_str(content.get("downloadCode"))
        if not code:
            return "", (), _(UNSUPPORTED, what=_("this file"))
        return "", (Attachment("file", code, as_str(content.get("fileName"))),), ""
    if kind == "markdown":  # sent from DingTalk's markdown editor: its text is plain markdown
        text = as_str(content.get("text")).strip()
        return (text, (), "") if text else ("", (), _(UNSUPPORTED, what=_("this message")))
    if kind == "chatRecord":
        text = _chat_record(content)
        return (text, (), "") if text else ("", (), _(UNSUPPORTED, what=_("this chat history")))
    if kind == "interactiveCard":
        text = _shared_card(content, body)
        return (text, (), "") if text else ("", (), _(UNSUPPORTED, what=_("this card")))
    if str(kind) in _UNSUPPORTED_NAMES:
        what = _(_UNSUPPORTED_NAMES[str(kind)])
    else:
        what = _("{kind} messages", kind=kind) if kind else _("this kind of message")
    return "", (), _(UNSUPPORTED, what=what)



def _chat_record(content: dict[str, Any]) -> str:
    """A forwarded chat history: its `summary` and, when the payload carries them, the records
    (`chatRecord`: a list, or a JSON string of one), each as "sender: text", bounded."""
    summary = as_str(content.get("summary")).strip()
    records = content.get("chatRecord")
    if isinstance(records, str):
        try:
            records = orjson.loads(records)
        except orjson.JSONDecodeError:
            records = None
    lines: list[str] = []
    for record in records[:RECORDS_MAX] if isinstance(records, list) else ():
        if not isinstance(record, dict):
            continue
        said = _first_text(record, "content", "text", "msgContent")
        if not said:
            continue
        who = _first_text(record, "senderNick", "senderName", "nick", "name", "sender")
        said = said[:RECORD_CHARS]
        lines.append(f"{who}: {said}" if who else said)
    if summary in ("", "[]") and not lines:
        return ""
    head = "[Forwarded chat history]"
    return "\n".join([head, *([summary] if summary not in ("", "[]") else []), *lines])


def _shared_card(content: dict[str, Any], body: dict[str, Any]) -> str:
    """A shared DingTalk document arrives as an interactive card: say what it is and where."""
    extra = body.get("text")
    title = _first_text(content, "title", "text", "cardTitle") or (
        _first_text(extra, "content") if isinstance(extra, dict) else ""
    )
    url = as_str(content.get("biz_custom_action_url")).strip()
    if not title and not url:
        return ""
    return "\n".join(["[Shared document]", *(part for part in (title, url) if part)])


def _first_text(values: dict[str, Any], *keys: str) -> str:
    """The first of `keys` holding text; a value that is itself an object yields its "text"/"content"."""
    for key in keys:
        value = values.get(key)
        if isinstance(value, dict):
            value = value.get("text") or value.get("content")
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""
