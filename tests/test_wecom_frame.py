"""The long-connection frames (handlers/wecom/frame.py): our builders produce exactly the frames the
official SDK (wecom-aibot-python-sdk 1.0.2) sends, the SDK's own frame handling accepts the frames
we build for the server side, and callback bodies from the documentation parse into what a user
sent (docs/protocols/wecom.md §2)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from handlers.wecom import frame as wf
from tests.oracles.wecom import MessageHandler, WSClient, WSClientOptions, sdk_ws

REQ_ID = re.compile(r"^(?P<cmd>[a-z_]+)_\d{13}_[0-9a-f]{8}$")


def wire(frame: wf.Frame) -> dict[str, Any]:
    return dict(orjson.loads(frame.encode()))


class Recorder:
    """What the SDK's client would put on the socket, in place of its websocket manager's send
    calls (the SDK, not our code, is what is patched)."""

    def __init__(self) -> None:
        self.client = WSClient(WSClientOptions(bot_id="aibBOT", secret="s3cret"))
        self.sent: list[dict[str, Any]] = []
        manager = self.client._ws_manager

        async def send(frame: dict[str, Any]) -> None:
            self.sent.append(frame)

        async def send_reply(req_id: str, body: Any, cmd: str = "aibot_respond_msg") -> dict[str, Any]:
            self.sent.append({"cmd": cmd, "headers": {"req_id": req_id}, "body": body})
            return {"headers": {"req_id": req_id}, "errcode": 0, "errmsg": "ok"}

        manager.send = send
        manager.send_reply = send_reply


def same_frame(ours: wf.Frame, sdk: dict[str, Any], generated_id: bool = False) -> None:
    mine = wire(ours)
    if generated_id:  # both made a fresh req_id the same way
        for f in (mine, sdk):
            match = REQ_ID.match(f["headers"]["req_id"])
            assert match and match["cmd"] == f["cmd"]
            f["headers"]["req_id"] = "*"
    assert mine == sdk


# -- builders: what the SDK sends ----------------------------------------------------------------
async def test_subscribe_and_ping_as_the_sdk_sends_them() -> None:
    sdk = Recorder()
    await sdk.client._ws_manager._send_auth()
    await sdk.client._ws_manager._send_heartbeat()
    same_frame(wf.subscribe("aibBOT", "s3cret"), sdk.sent[0], generated_id=True)
    same_frame(wf.ping(), sdk.sent[1], generated_id=True)


async def test_replies_as_the_sdk_sends_them() -> None:
    sdk = Recorder()
    callback = {"headers": {"req_id": "REQ1"}}
    await sdk.client.reply_stream(callback, "S1", "想一想…", finish=False, feedback={"id": "FB1"})
    await sdk.client.reply_stream(callback, "S1", "想一想… 好了", finish=True)
    await sdk.client.reply_welcome(callback, {"msgtype": "text", "text": {"content": "您好"}})
    await sdk.client.reply(callback, {"msgtype": "markdown", "markdown": {"content": "**hi**"}})
    await sdk.client.reply(callback, {"msgtype": "image", "image": {"media_id": "M1"}})
    card = {"card_type": "button_interaction", "task_id": "T1"}
    await sdk.client.update_template_card(callback, card, userids=["u1"])
    await sdk.client.send_message("wrCHAT", {"msgtype": "markdown", "markdown": {"content": "push"}})
    await sdk.client.send_message("zhangsan", {"msgtype": "file", "file": {"media_id": "M2"}})
    ours = [
        wf.stream_reply("REQ1", "S1", "想一想…", finish=False, feedback_id="FB1"),
        wf.stream_reply("REQ1", "S1", "想一想… 好了", finish=True),
        wf.welcome_reply("REQ1", "您好"),
        wf.markdown_reply("REQ1", "**hi**"),
        wf.media_reply("REQ1", "image", "M1"),
        wf.update_card_reply("REQ1", card, ("u1",)),
    ]
    for mine, theirs in zip(ours, sdk.sent[:6], strict=True):
        same_frame(mine, theirs)
    same_frame(wf.send_markdown("wrCHAT", "push"), sdk.sent[6], generated_id=True)
    same_frame(wf.send_media("zhangsan", "file", "M2"), sdk.sent[7], generated_id=True)


def test_upload_frames_carry_the_documented_fields() -> None:
    assert wire(wf.upload_init("file", "a.pdf", 2333, 1, "d41d8cd9", req_id="R1")) == {
        "cmd": "aibot_upload_media_init",
        "headers": {"req_id": "R1"},
        "body": {"type": "file", "filename": "a.pdf", "total_size": 2333, "total_chunks": 1, "md5": "d41d8cd9"},
    }
    assert wire(wf.upload_chunk("U1", 0, "aGk=", req_id="R2"))["body"] == {
        "upload_id": "U1", "chunk_index": 0, "base64_data": "aGk="
    }
    assert wire(wf.upload_finish("U1", req_id="R3")) == {
        "cmd": "aibot_upload_media_finish", "headers": {"req_id": "R3"}, "body": {"upload_id": "U1"}
    }


# -- server frames: what the SDK accepts -----------------------------------------------------------
class Emitter:
    def __init__(self) -> None:
        self.events: list[str] = []

    def emit(self, name: str, *args: Any) -> None:
        self.events.append(name)


@pytest.mark.parametrize(
    ("frame", "events"),
    [
        (wf.callback(wf.MSG_CALLBACK, "R", {"msgid": "M", "msgtype": "text", "text": {"content": "hi"}}),
         ["message", "message.text"]),
        (wf.callback(wf.MSG_CALLBACK, "R", {"msgid": "M", "msgtype": "mixed", "mixed": {"msg_item": []}}),
         ["message", "message.mixed"]),
        (wf.callback(wf.EVENT_CALLBACK, "R", {"msgid": "M", "msgtype": "event",
                                              "event": {"eventtype": wf.ENTER_CHAT}}),
         ["event", "event.enter_chat"]),
        (wf.callback(wf.EVENT_CALLBACK, "R", {"msgid": "M", "msgtype": "event",
                                              "event": {"eventtype": wf.DISCONNECTED_EVENT}}),
         ["event", "event.disconnected_event"]),
    ],
)
def test_the_sdk_dispatches_the_callbacks_we_build(frame: wf.Frame, events: list[str]) -> None:
    emitter = Emitter()
    MessageHandler(_Quiet()).handle_frame(orjson.loads(frame.encode()), emitter)
    assert emitter.events == events


class _Quiet:
    def debug(self, *a: Any) -> None: ...
    def info(self, *a: Any) -> None: ...
    def warn(self, *a: Any) -> None: ...
    def error(self, *a: Any) -> None: ...


async def test_the_sdk_accepts_our_acknowledgements() -> None:
    manager = sdk_ws.WsConnectionManager(logger=_Quiet(), heartbeat_interval=60_000)
    authenticated: list[bool] = []
    manager.on_authenticated = lambda: authenticated.append(True)
    subscribe = wf.subscribe("aibBOT", "s3cret")
    manager._handle_frame(orjson.loads(wf.ack(subscribe.req_id).encode()))
    assert authenticated == [True]
    manager._stop_heartbeat()

    manager._missed_pong_count = 1
    manager._handle_frame(orjson.loads(wf.ack(wf.ping().req_id).encode()))
    assert manager._missed_pong_count == 0

    future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    manager._pending_acks["REQ1"] = (future, None)
    manager._handle_frame(orjson.loads(wf.ack("REQ1").encode()))
    assert future.result()["errcode"] == 0

    refused: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    manager._pending_acks["REQ2"] = (refused, None)
    manager._handle_frame(orjson.loads(wf.ack("REQ2", wf.STREAM_EXPIRED, "stream message update expired").encode()))
    with pytest.raises(RuntimeError, match="846608"):
        refused.result()


async def test_the_sdk_refuses_a_failed_subscribe() -> None:
    manager = sdk_ws.WsConnectionManager(logger=_Quiet())
    errors: list[Exception] = []
    manager.on_error = errors.append
    manager.on_authenticated = lambda: pytest.fail("authenticated")
    manager._handle_frame(orjson.loads(wf.ack(wf.subscribe("b", "x").req_id, wf.BAD_SECRET, "bad").encode()))
    assert "853000" in str(errors[0])


# -- decode ------------------------------------------------------------------------------------------
def test_decode_an_acknowledgement_and_a_callback() -> None:
    ack = wf.decode('{"headers":{"req_id":"ping_1"},"errcode":0,"errmsg":"ok"}')
    assert ack == wf.Frame("", "ping_1", None, 0, "ok") and ack.is_ack and ack.ok
    push = wf.decode(b'{"cmd":"aibot_msg_callback","headers":{"req_id":"eiS8BA"},"body":{"msgid":"M"}}')
    assert push.cmd == wf.MSG_CALLBACK and not push.is_ack and push.errcode is None and push.body == {"msgid": "M"}


def test_decode_accepts_raw_control_characters() -> None:
    frame = wf.decode('{"cmd":"aibot_msg_callback","headers":{"req_id":"R"},"body":{"t":"a\x01b\nc"}}')
    assert frame.body == {"t": "a\x01b\nc"}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("", "not JSON"),
        (b"\xff", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"cmd":"ping"}', "headers.req_id"),
        ('{"headers":{"req_id":5}}', "headers.req_id"),
        ('{"headers":[]}', "headers.req_id"),
        ('{"cmd":1,"headers":{"req_id":"r"}}', "cmd"),
        ('{"headers":{"req_id":"r"},"body":[1]}', "body"),
        ('{"headers":{"req_id":"r"},"errcode":"0"}', "errcode"),
        ('{"headers":{"req_id":"r"},"errcode":true}', "errcode"),
    ],
)
def test_decode_refuses_what_wecom_never_sends(raw: str | bytes, problem: str) -> None:
    with pytest.raises(wf.FrameError, match=problem):
        wf.decode(raw)


@given(st.binary(max_size=200))
def test_decode_any_bytes_is_a_frame_or_frame_error(raw: bytes) -> None:
    with contextlib.suppress(wf.FrameError):
        wf.decode(raw)


@given(st.text(max_size=50), st.text(max_size=50), st.booleans())
def test_encode_decode_round_trip(req_id: str, content: str, finish: bool) -> None:
    frame = wf.stream_reply(req_id, "S", content, finish)
    assert wf.decode(frame.encode()) == frame
    ack = wf.ack(req_id, wf.INVALID_REQ_ID, "invalid req_id")
    assert wf.decode(ack.encode()) == ack


# -- content limit --------------------------------------------------------------------------------------
def test_stream_content_limit_is_in_bytes() -> None:
    wf.stream_reply("R", "S", "a" * wf.CONTENT_MAX_BYTES, finish=True)
    with pytest.raises(wf.FrameError, match="20481 bytes, over WeCom's 20480"):
        wf.stream_reply("R", "S", "a" * wf.CONTENT_MAX_BYTES + "b", finish=True)
    with pytest.raises(wf.FrameError, match="markdown"):
        wf.send_markdown("u", "中" * 6827)  # 20481 bytes in 6827 characters


def test_clip_utf8_never_cuts_a_character() -> None:
    text = "中" * 7000  # 3 bytes each
    clipped = wf.clip_utf8(text)
    assert clipped == "中" * 6826 and len(clipped.encode()) == 20478
    assert wf.clip_utf8("short") == "short"
    wf.stream_reply("R", "S", clipped, finish=True)


# -- callback bodies (examples from path/100719, path/101027, path/101463) -----------------------------
def body(**fields: Any) -> dict[str, Any]:
    return {"msgid": "MSGID", "aibotid": "AIBOTID", "chattype": "single", "from": {"userid": "zhangsan"}, **fields}


def test_group_text() -> None:
    frame = wf.callback(wf.MSG_CALLBACK, "REQ", body(
        chatid="wrCHAT", chattype="group", msgtype="text", text={"content": "@RobotA hello robot"},
        response_url="https://qyapi.weixin.qq.com/cgi-bin/aibot/response?response_code=RC",
    ))
    message = wf.parse_callback(wf.decode(frame.encode()))
    assert message == wf.MessageCallback(
        req_id="REQ", msgid="MSGID", aibotid="AIBOTID", chattype="group", chatid="wrCHAT", userid="zhangsan",
        msgtype="text", parts=(wf.Part("text", text="@RobotA hello robot"),),
        response_url="https://qyapi.weixin.qq.com/cgi-bin/aibot/response?response_code=RC",
    )
    assert message.conversation == "wrCHAT"


def test_single_chat_media_voice_and_unknown_types() -> None:
    image = wf.parse_message(body(msgtype="image", image={"url": "https://x/i", "aeskey": "K"}), "R")
    assert image.parts == (wf.Part("image", url="https://x/i", aeskey="K"),)
    assert image.conversation == "zhangsan" and image.chatid == ""
    assert wf.parse_message(body(msgtype="voice", voice={"content": "转写"})).parts == (wf.Part("voice", text="转写"),)
    assert wf.parse_message(body(msgtype="file", file={"url": "u", "aeskey": "k"})).parts[0].kind == "file"
    assert wf.parse_message(body(msgtype="video", video={"url": "u", "aeskey": "k"})).parts[0].url == "u"
    assert wf.parse_message(body(msgtype="sticker", sticker={"x": 1})).parts == (wf.Part("sticker"),)
    assert wf.parse_message(body(msgtype="text", text={"content": "x"}, create_time=1700000000)).create_time == (
        1700000000
    )


def test_mixed_and_quote() -> None:
    message = wf.parse_message(body(
        msgtype="mixed",
        mixed={"msg_item": [
            {"msgtype": "text", "text": {"content": "看图"}},
            {"msgtype": "image", "image": {"url": "u1", "aeskey": "k1"}},
        ]},
        quote={"msgtype": "mixed", "mixed": {"msg_item": [{"msgtype": "text", "text": {"content": "原文"}}]}},
    ))
    assert message.parts == (wf.Part("text", text="看图"), wf.Part("image", url="u1", aeskey="k1"))
    assert message.quote == (wf.Part("text", text="原文"),) and message.quote_msgtype == "mixed"
    quoted_file = wf.parse_message(body(msgtype="text", text={"content": "这是什么"},
                                        quote={"msgtype": "file", "file": {"url": "fu", "aeskey": "fk"}}))
    assert quoted_file.quote == (wf.Part("file", url="fu", aeskey="fk"),)


def test_stream_refresh_poll() -> None:
    poll = wf.parse_message(body(chatid="wrC", chattype="group", msgtype="stream", stream={"id": "STREAMID"}))
    assert poll.stream_id == "STREAMID" and poll.parts == ()


def test_events() -> None:
    enter = wf.parse_callback(wf.callback(wf.EVENT_CALLBACK, "E1", body(
        msgtype="event", create_time=1700000000, event={"eventtype": "enter_chat"})))
    assert isinstance(enter, wf.EventCallback)
    assert (enter.eventtype, enter.userid, enter.req_id, enter.detail) == ("enter_chat", "zhangsan", "E1", {})
    nested = wf.parse_event(body(msgtype="event", event={
        "eventtype": "template_card_event",
        "template_card_event": {"card_type": "button_interaction", "event_key": "k", "task_id": "T"}}))
    flat = wf.parse_event(body(msgtype="event", event={"eventtype": "template_card_event", "event_key": "k",
                                                       "task_id": "T"}))
    assert nested.detail["task_id"] == flat.detail["task_id"] == "T"
    kicked = wf.parse_event({"msgid": "M", "create_time": 1700000000, "aibotid": "B", "msgtype": "event",
                             "event": {"eventtype": "disconnected_event"}})
    assert kicked.eventtype == wf.DISCONNECTED_EVENT and kicked.userid == ""


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (wf.Frame(wf.MSG_CALLBACK, "R"), "has no body"),
        (wf.Frame("ping", "R", {}), "not a callback"),
        (wf.Frame(wf.MSG_CALLBACK, "R", {"msgtype": "text", "from": {"userid": "u"}}), "msgid is missing"),
        (wf.Frame(wf.MSG_CALLBACK, "R", {"msgid": "M", "from": {"userid": "u"}}), "msgtype is missing"),
        (wf.Frame(wf.MSG_CALLBACK, "R", {"msgid": "M", "msgtype": "text"}), "from.userid is missing"),
        (wf.Frame(wf.MSG_CALLBACK, "R", body(msgtype="text", chattype="group")), "chatid is missing"),
        (wf.Frame(wf.MSG_CALLBACK, "R", body(msgtype="text", text="hi")), "text is not an object"),
        (wf.Frame(wf.MSG_CALLBACK, "R", body(msgtype="text", text={"content": 5})), "text.content is not a string"),
        (wf.Frame(wf.MSG_CALLBACK, "R", body(msgtype="mixed", mixed={"msg_item": "x"})), "mixed.msg_item"),
        (wf.Frame(wf.MSG_CALLBACK, "R", body(msgtype="mixed", mixed={"msg_item": [{"msgtype": "image",
                                                                                  "image": {"url": 1}}]})),
         r"mixed.msg_item\[0\].image.url"),
        (wf.Frame(wf.MSG_CALLBACK, "R", body(msgtype="stream", stream={})), "stream.id is missing"),
        (wf.Frame(wf.MSG_CALLBACK, "R", body(msgtype="text", quote=[1])), "quote is not an object"),
        (wf.Frame(wf.EVENT_CALLBACK, "R", body(msgtype="event")), "event.eventtype is missing"),
        (wf.Frame(wf.EVENT_CALLBACK, "R", body(event={"eventtype": "x", "x": 3})), "event.x is not an object"),
    ],
)
def test_bodies_wecom_never_sends_name_the_field(frame: wf.Frame, problem: str) -> None:
    with pytest.raises(wf.FrameError, match=problem):
        wf.parse_callback(frame)
