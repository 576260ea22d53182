"""The WeCom AI bot's long-connection frames (智能机器人长连接): a typed envelope, pure builders
and parsers (docs/protocols/wecom.md §2).

Every frame either way is one JSON object in a websocket text frame:
`{"cmd": …, "headers": {"req_id": …}, "body": {…}, "errcode": …, "errmsg": …}`.

* Client requests (`aibot_subscribe`, `ping`, `aibot_send_msg`, uploads) carry a `req_id` the
  client makes up; `new_req_id(cmd)` makes `{cmd}_{epoch ms}_{8 hex}` as the official SDKs do.
* Replies to a callback (`aibot_respond_msg`, `aibot_respond_welcome_msg`,
  `aibot_respond_update_msg`) echo the callback's `req_id`; every frame of one stream does.
* The server acknowledges each client frame with a frame without `cmd` carrying the same `req_id`
  and `errcode`/`errmsg` (`Frame.is_ack`); callbacks it pushes need no acknowledgement.

API (stable; the adapter in `handlers/wecom/` and `tests/doubles/wecom.py` use it):

* `Frame` (frozen) with `encode()` → JSON text, and `decode(raw)` → `Frame` (FrameError names the
  bad field). `ack(req_id, errcode, errmsg, body)` builds the server's acknowledgement.
* Builders: `subscribe`, `ping`, `stream_reply`, `markdown_reply`, `media_reply`, `welcome_reply`,
  `update_card_reply`, `send_markdown`, `send_media`, `upload_init`, `upload_chunk`,
  `upload_finish`, `callback` (a server push, for doubles); `clip_utf8` fits text to a byte limit.
* Parsers of callback bodies (the same schema in long-connection frames and in URL-callback
  plaintexts): `parse_callback(frame)` → `MessageCallback | EventCallback`, and
  `parse_message(body, req_id)` / `parse_event(body, req_id)`.
* Command names, errcodes and limits below, each with its public source.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

# -- commands (https://developer.work.weixin.qq.com/document/path/101463; wecom-aibot-python-sdk
# 1.0.2 `aibot/types.py` WsCmd; @wecom/aibot-node-sdk for the upload commands) -------------------
SUBSCRIBE = "aibot_subscribe"
PING = "ping"
RESPOND_MSG = "aibot_respond_msg"
RESPOND_WELCOME = "aibot_respond_welcome_msg"
RESPOND_UPDATE = "aibot_respond_update_msg"
SEND_MSG = "aibot_send_msg"
UPLOAD_INIT = "aibot_upload_media_init"
UPLOAD_CHUNK = "aibot_upload_media_chunk"
UPLOAD_FINISH = "aibot_upload_media_finish"
MSG_CALLBACK = "aibot_msg_callback"
EVENT_CALLBACK = "aibot_event_callback"

# Event types (path/101027 接收事件; path/101463 连接断开事件).
ENTER_CHAT = "enter_chat"
TEMPLATE_CARD_EVENT = "template_card_event"
FEEDBACK_EVENT = "feedback_event"
DISCONNECTED_EVENT = "disconnected_event"

# -- limits --------------------------------------------------------------------------------------
DEFAULT_URL = "wss://openws.work.weixin.qq.com"  # path/101463; private deployments have their own
# stream.content and markdown.content: at most 20480 bytes of UTF-8 (path/101031 被动回复消息,
# path/101463; the Node SDK's typings say the same).
CONTENT_MAX_BYTES = 20480
# A stream can be refreshed for 6 minutes from its first frame ("6分钟超时限制：从首次发送开始计时",
# path/101463); later frames get STREAM_EXPIRED.
STREAM_LIFETIME = 360.0
# aibot_respond_welcome_msg / aibot_respond_update_msg within 5 s of the event (path/101463).
EVENT_REPLY_DEADLINE = 5.0
# "建议每 30 秒发送一次心跳" (path/101463); both official SDKs give up on a connection after 2
# pings in a row without an acknowledgement.
PING_INTERVAL = 30.0
MISSED_PINGS = 2
# Messages to one conversation, replies and pushes together: 30/min, 1000/h (path/101463 频率限制).
CONVERSATION_PER_MINUTE = 30
CONVERSATION_PER_HOUR = 1000
# A callback's media URL (with its aeskey) works for 5 minutes (path/101463 多媒体资源解密).
MEDIA_URL_LIFETIME = 300.0
# Uploads: ≤ 512 KB raw per chunk, ≤ 100 chunks (path/101463 上传临时素材).
UPLOAD_CHUNK_MAX_BYTES = 512 * 1024
UPLOAD_MAX_CHUNKS = 100

# -- errcodes (0 = ok; the others as the platform was seen answering, docs/protocols/wecom.md §2.9) -
OK = 0
FREQUENCY_LIMIT = 45009  # "api freq out of limit": subscribe storms (wecom-openclaw-plugin #48)
INVALID_REQ_ID = 846605  # unknown/expired req_id, or a stream reply to an event
STREAM_EXPIRED = 846608  # "stream message update expired": a stream past STREAM_LIFETIME
BAD_SECRET = 853000  # "signature is incorrect, please check if the bot secret is correct"
INVALID_BOT_ID = 93019  # "invalid bot_id"
INVALID_PARAMETER = 40058  # "invalid Request Parameter" (also WeCom's code for content over a limit)


class FrameError(ValueError):
    """A frame or callback body that is not what WeCom sends; the message names the field."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame. `cmd` is "" on acknowledgements; `errcode` is None on everything else."""

    cmd: str
    req_id: str
    body: dict[str, Any] | None = None
    errcode: int | None = None
    errmsg: str = ""

    @property
    def is_ack(self) -> bool:
        return not self.cmd

    @property
    def ok(self) -> bool:
        return self.errcode == OK

    def encode(self) -> str:
        data: dict[str, Any] = {"headers": {"req_id": self.req_id}}
        if self.cmd:
            data["cmd"] = self.cmd
        if self.body is not None:
            data["body"] = self.body
        if self.errcode is not None:
            data["errcode"] = self.errcode
            data["errmsg"] = self.errmsg
        return orjson.dumps(data).decode()


def decode(raw: str | bytes) -> Frame:
    """Parse a frame. Raw control characters inside strings are accepted (`strict=False`): the
    official Node SDK strips them before parsing, so the server is known to send them."""
    try:
        data = json.loads(raw, strict=False)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FrameError("frame is not JSON") from None
    if not isinstance(data, dict):
        raise FrameError("frame is not a JSON object")
    headers = data.get("headers")
    req_id = headers.get("req_id") if isinstance(headers, dict) else None
    if not isinstance(req_id, str):
        raise FrameError("frame has no headers.req_id string")
    cmd = data.get("cmd", "")
    if not isinstance(cmd, str):
        raise FrameError("frame cmd is not a string")
    body = data.get("body")
    if body is not None and not isinstance(body, dict):
        raise FrameError("frame body is not an object")
    errcode = data.get("errcode")
    if errcode is not None and (not isinstance(errcode, int) or isinstance(errcode, bool)):
        raise FrameError("frame errcode is not an integer")
    errmsg = data.get("errmsg", "")
    return Frame(cmd, req_id, body, errcode, errmsg if isinstance(errmsg, str) else str(errmsg))


def new_req_id(cmd: str) -> str:
    return f"{cmd}_{int(time.time() * 1000)}_{os.urandom(4).hex()}"


def clip_utf8(text: str, max_bytes: int = CONTENT_MAX_BYTES) -> str:
    """The longest prefix of `text` whose UTF-8 fits `max_bytes`, never cutting a character."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode(errors="ignore")


def _content(content: str, what: str) -> str:
    size = len(content.encode())
    if size > CONTENT_MAX_BYTES:
        raise FrameError(f"{what} is {size} bytes, over WeCom's {CONTENT_MAX_BYTES}")
    return content


# -- client frames ---------------------------------------------------------------------------------
def subscribe(bot_id: str, secret: str, req_id: str = "") -> Frame:
    return Frame(SUBSCRIBE, req_id or new_req_id(SUBSCRIBE), {"bot_id": bot_id, "secret": secret})


def ping(req_id: str = "") -> Frame:
    return Frame(PING, req_id or new_req_id(PING))


def stream_reply(req_id: str, stream_id: str, content: str, finish: bool, feedback_id: str = "") -> Frame:
    """One frame of a stream answering callback `req_id`: `content` is the whole text so far (each
    frame replaces what the user sees); `feedback_id` belongs on the first frame only."""
    stream: dict[str, Any] = {"id": stream_id, "finish": finish, "content": _content(content, "stream.content")}
    if feedback_id:
        stream["feedback"] = {"id": feedback_id}
    return Frame(RESPOND_MSG, req_id, {"msgtype": "stream", "stream": stream})


def markdown_reply(req_id: str, content: str) -> Frame:
    return Frame(RESPOND_MSG, req_id, {"msgtype": "markdown", "markdown": {"content": _content(content, "markdown")}})


def media_reply(req_id: str, msgtype: str, media_id: str) -> Frame:
    """Reply with uploaded media: `msgtype` is "image", "file", "voice" or "video"."""
    return Frame(RESPOND_MSG, req_id, {"msgtype": msgtype, msgtype: {"media_id": media_id}})


def welcome_reply(req_id: str, text: str) -> Frame:
    """The answer to an `enter_chat` event (within EVENT_REPLY_DEADLINE)."""
    return Frame(RESPOND_WELCOME, req_id, {"msgtype": "text", "text": {"content": text}})


def update_card_reply(req_id: str, template_card: dict[str, Any], userids: tuple[str, ...] = ()) -> Frame:
    body: dict[str, Any] = {"response_type": "update_template_card", "template_card": template_card}
    if userids:
        body["userids"] = list(userids)
    return Frame(RESPOND_UPDATE, req_id, body)


def send_markdown(chatid: str, content: str, req_id: str = "") -> Frame:
    """A proactive message: `chatid` is a group's chatid, or the userid of a single chat."""
    body = {"chatid": chatid, "msgtype": "markdown", "markdown": {"content": _content(content, "markdown")}}
    return Frame(SEND_MSG, req_id or new_req_id(SEND_MSG), body)


def send_media(chatid: str, msgtype: str, media_id: str, req_id: str = "") -> Frame:
    body = {"chatid": chatid, "msgtype": msgtype, msgtype: {"media_id": media_id}}
    return Frame(SEND_MSG, req_id or new_req_id(SEND_MSG), body)


def upload_init(kind: str, filename: str, total_size: int, total_chunks: int, md5: str, req_id: str = "") -> Frame:
    body = {"type": kind, "filename": filename, "total_size": total_size, "total_chunks": total_chunks, "md5": md5}
    return Frame(UPLOAD_INIT, req_id or new_req_id(UPLOAD_INIT), body)


def upload_chunk(upload_id: str, chunk_index: int, base64_data: str, req_id: str = "") -> Frame:
    """`chunk_index` counts from 0, as the official Node SDK sends it."""
    body = {"upload_id": upload_id, "chunk_index": chunk_index, "base64_data": base64_data}
    return Frame(UPLOAD_CHUNK, req_id or new_req_id(UPLOAD_CHUNK), body)


def upload_finish(upload_id: str, req_id: str = "") -> Frame:
    return Frame(UPLOAD_FINISH, req_id or new_req_id(UPLOAD_FINISH), {"upload_id": upload_id})


# -- server frames (for doubles) -------------------------------------------------------------------
def ack(req_id: str, errcode: int = OK, errmsg: str = "ok", body: dict[str, Any] | None = None) -> Frame:
    return Frame("", req_id, body, errcode, errmsg)


def callback(cmd: str, req_id: str, body: dict[str, Any]) -> Frame:
    return Frame(cmd, req_id, body)


# -- callback bodies -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Part:
    """One piece of a message: `kind` is its msgtype ("text", "image", "voice", "file", "video", or
    one this code does not know); `text` for text and voice (WeCom transcribes voice), `url` and
    `aeskey` for media (the URL works for MEDIA_URL_LIFETIME)."""

    kind: str
    text: str = ""
    url: str = ""
    aeskey: str = ""


@dataclass(frozen=True, slots=True)
class MessageCallback:
    """A user message (`aibot_msg_callback`), or in URL-callback mode a stream refresh poll
    (`msgtype == "stream"`, `stream_id` set, no parts)."""

    req_id: str
    msgid: str
    aibotid: str
    chattype: str  # "single" | "group"
    chatid: str  # groups only; "" in a single chat
    userid: str
    msgtype: str
    parts: tuple[Part, ...]  # a mixed message's items in order; otherwise its one part
    quote: tuple[Part, ...] = ()  # the quoted message's parts, if the user quoted one
    quote_msgtype: str = ""
    response_url: str = ""
    stream_id: str = ""
    create_time: int | None = None

    @property
    def conversation(self) -> str:
        """The `chatid` an `aibot_send_msg` to this conversation takes: the group, else the user."""
        return self.chatid or self.userid


@dataclass(frozen=True, slots=True)
class EventCallback:
    """An event (`aibot_event_callback`). `detail` is the event's own object (e.g. a
    template_card_event's `event_key`, `task_id`), {} when it has none (enter_chat,
    disconnected_event). disconnected_event has no sender: `userid` is then ""."""

    req_id: str
    msgid: str
    aibotid: str
    eventtype: str
    chattype: str = ""
    chatid: str = ""
    userid: str = ""
    create_time: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    response_url: str = ""


def _str(obj: dict[str, Any], key: str, where: str, required: bool = False) -> str:
    value = obj.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise FrameError(f"{where}{key} is not a string")
    if required and not value:
        raise FrameError(f"{where}{key} is missing")
    return value


def _obj(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FrameError(f"{where}{key} is not an object")
    return value


def _time(body: dict[str, Any]) -> int | None:
    value = body.get("create_time")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _part(item: dict[str, Any], where: str) -> Part:
    kind = _str(item, "msgtype", where, required=True)
    payload = _obj(item, kind, where)
    inner = f"{where}{kind}."
    if kind in ("text", "voice"):
        return Part(kind, text=_str(payload, "content", inner))
    if kind in ("image", "file", "video"):
        return Part(kind, url=_str(payload, "url", inner), aeskey=_str(payload, "aeskey", inner))
    return Part(kind)


def _parts(item: dict[str, Any], where: str) -> tuple[Part, ...]:
    if item.get("msgtype") != "mixed":
        return (_part(item, where),)
    items = _obj(item, "mixed", where).get("msg_item")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise FrameError(f"{where}mixed.msg_item is not a list of objects")
    return tuple(_part(i, f"{where}mixed.msg_item[{n}].") for n, i in enumerate(items))


def parse_message(body: dict[str, Any], req_id: str = "") -> MessageCallback:
    sender = _obj(body, "from", "")
    msgtype = _str(body, "msgtype", "", required=True)
    chattype = _str(body, "chattype", "") or "single"
    stream_id = ""
    if msgtype == "stream":
        parts: tuple[Part, ...] = ()
        stream_id = _str(_obj(body, "stream", ""), "id", "stream.", required=True)
    else:
        parts = _parts(body, "")
    quote = _obj(body, "quote", "")
    return MessageCallback(
        req_id=req_id,
        msgid=_str(body, "msgid", "", required=True),
        aibotid=_str(body, "aibotid", ""),
        chattype=chattype,
        chatid=_str(body, "chatid", "", required=chattype == "group"),
        userid=_str(sender, "userid", "from.", required=True),
        msgtype=msgtype,
        parts=parts,
        quote=_parts(quote, "quote.") if quote else (),
        quote_msgtype=_str(quote, "msgtype", "quote.") if quote else "",
        response_url=_str(body, "response_url", ""),
        stream_id=stream_id,
        create_time=_time(body),
    )


def parse_event(body: dict[str, Any], req_id: str = "") -> EventCallback:
    event = _obj(body, "event", "")
    eventtype = _str(event, "eventtype", "event.", required=True)
    # The documented shape nests the event's data under its own name; the Node SDK's typings put
    # it beside `eventtype`. Read the nested object, else the flat one.
    detail = _obj(event, eventtype, "event.") or {k: v for k, v in event.items() if k != "eventtype"}
    return EventCallback(
        req_id=req_id,
        msgid=_str(body, "msgid", ""),
        aibotid=_str(body, "aibotid", ""),
        eventtype=eventtype,
        chattype=_str(body, "chattype", ""),
        chatid=_str(body, "chatid", ""),
        userid=_str(_obj(body, "from", ""), "userid", "from."),
        create_time=_time(body),
        detail=detail,
        response_url=_str(body, "response_url", ""),
    )


def parse_callback(frame: Frame) -> MessageCallback | EventCallback:
    """A pushed callback frame's body; FrameError for any other frame or a body that lacks what
    WeCom always sends (the message names the field)."""
    if frame.body is None:
        raise FrameError(f"{frame.cmd or 'frame'} has no body")
    if frame.cmd == MSG_CALLBACK:
        return parse_message(frame.body, frame.req_id)
    if frame.cmd == EVENT_CALLBACK:
        return parse_event(frame.body, frame.req_id)
    raise FrameError(f"cmd {frame.cmd!r} is not a callback")
