"""Pure parts of the WeCom adapter: callback bodies -> messages (mentions, types, lists), the
20,480-byte pieces, and the `[wecom]` config checks."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.access import AccessList
from gateway.admission import Dropped
from gateway.config import ConfigError, build
from gateway.messages import ConversationKind, InboundMessage
from handlers.wecom.parse import Delivery, Rules, parse_callback, strip_mention
from handlers.wecom.render import CONTENT_LIMIT, fit, wire_bytes
from tests.doubles import wecom as wd

RULES = Rules(bot_id=wd.BOT_ID, bot_name=wd.BOT_NAME)
NOW = 1_800_000_000.0


def parse(body: dict[str, Any], rules: Rules = RULES) -> InboundMessage | Dropped:
    return parse_callback(Delivery(body, "REQ1", "c1"), rules, "ws", NOW)


def message(body: dict[str, Any], rules: Rules = RULES) -> InboundMessage:
    result = parse(body, rules)
    assert isinstance(result, InboundMessage), result
    return result


def test_a_single_chat_text_is_the_users_conversation() -> None:
    m = message(wd.text("你好", msgid="m1"))
    assert (m.conversation_id, m.conversation_kind, m.sender_id) == (wd.USER, ConversationKind.DM, wd.USER)
    assert m.text == "你好"
    assert m.message_id == "m1" and m.reply_handle["req_id"] == "REQ1" and m.reply_handle["chatid"] == wd.USER


@pytest.mark.parametrize(
    ("content", "name", "text"),
    [
        ("@小助手 /reset", "小助手", "/reset"),
        ("@小助手  two spaces", "小助手", "two spaces"),
        ("@My Bot hello", "My Bot", "hello"),  # a display name with a space
        ("@小助手\u3000全角空格", "小助手", "全角空格"),
        ("hello @小助手 ", "小助手", "hello"),
        ("@someone hi", "", "hi"),  # no name configured: the first @word goes
    ],
)
def test_the_bots_mention_is_stripped(content: str, name: str, text: str) -> None:
    assert strip_mention(content, name) == text


def test_a_group_text_is_the_groups_conversation_without_the_mention() -> None:
    m = message(wd.text("help me", group=wd.GROUP))
    assert m.conversation_id == wd.GROUP and m.conversation_kind is ConversationKind.GROUP
    assert m.text == "help me" and m.mentioned


def test_voice_is_its_transcription_and_mixed_keeps_text_and_pictures() -> None:
    assert message(wd.voice("语音转成的文字")).text == "语音转成的文字"
    m = message(wd.mixed("look", ("https://x/1", "KEY1"), "and this", ("https://x/2", "KEY2")))
    assert m.text == "look\nand this"
    assert [(a.kind, a.ref) for a in m.attachments] == [("image", "https://x/1"), ("image", "https://x/2")]
    assert m.reply_handle["aeskeys"] == {"https://x/1": "KEY1", "https://x/2": "KEY2"}


def test_a_file_is_an_attachment_with_its_key_and_a_video_a_notice() -> None:
    m = message(wd.file("https://x/f", "FK"))
    assert [(a.kind, a.ref) for a in m.attachments] == [("file", "https://x/f")]
    assert m.reply_handle["aeskeys"] == {"https://x/f": "FK"}
    video = message(wd.video("https://x/v", "VK"))
    assert video.unsupported and not video.attachments


def test_a_quote_comes_complete_from_the_callback() -> None:
    quoted = wd.quoted(wd.text("the original"))
    m = message(wd.text("what about this?", quote=quoted))
    assert m.quote is not None and m.quote.text == "the original" and not m.quote.pending


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"msgtype": "text"}, "malformed"),
        (wd.event("enter_chat"), "event"),
        ({**wd.text("x"), "aibotid": "another"}, "filtered"),
        ({**wd.text("x"), "create_time": int(NOW) - 3600}, "stale"),
        ({**wd.text("x"), "from": {"userid": "sys"}}, "bot"),
    ],
)
def test_what_is_not_answered(body: dict[str, Any], reason: str) -> None:
    dropped = parse(body)
    assert isinstance(dropped, Dropped) and dropped.reason == reason


def test_allow_and_deny_lists() -> None:
    rules = Rules(users=AccessList.of([], ["mallory"]), chats=AccessList.of(["wrOK"], []))
    assert isinstance(parse(wd.text("x", user="mallory"), rules), Dropped)
    assert isinstance(parse(wd.text("x", group="wrOTHER"), rules), Dropped)
    assert isinstance(parse(wd.text("x", group="wrOK"), rules), InboundMessage)


def test_long_text_is_cut_into_pieces_that_fit_and_join_back() -> None:
    text = "\n\n".join("第" + str(i) + "段" + "文字" * 2000 for i in range(6)) + '"quotes"\n' * 500
    pieces = fit(text)
    assert len(pieces) > 1 and "".join(pieces) == text
    assert all(wire_bytes(p) <= CONTENT_LIMIT for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])  # at line or paragraph breaks
    assert fit("short") == ["short"]


WECOM = {"enabled": True, "bot_id": "b", "secret": "s"}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"enabled": True}, "wecom.bot_id: is required"),
        ({**WECOM, "secret": ""}, "wecom.secret: is required"),
        ({**WECOM, "mode": "webhook", "encoding_aes_key": "k" * 43}, "wecom.token: is required"),
        ({**WECOM, "mode": "both", "token": "t", "encoding_aes_key": "short"}, "encoding_aes_key: must be the 43"),
        ({**WECOM, "mode": "stream"}, "wecom.mode: must be one of ws, webhook, both"),
        ({**WECOM, "ws_url": "https://x"}, "wecom.ws_url: must be a ws:// or wss:// URL"),
        ({**WECOM, "stream_life": 600}, "wecom.stream_life: must be at most 360"),
        ({**WECOM, "replies_per_minute": -1}, "wecom.replies_per_minute: must be 0"),
        ({"bots": [{"name": "ops", "bot_id": "x"}]}, "wecom.bots[ops].secret: is required"),
    ],
)
def test_config_errors_name_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build({"wecom": section}, {})


def test_a_webhook_only_bot_needs_no_secret_and_a_secret_is_never_echoed() -> None:
    cfg = build({"wecom": {**WECOM, "secret": "", "mode": "webhook", "token": "t", "encoding_aes_key": "a" * 43}}, {})
    assert [b.key for b in cfg.bots] == ["wecom/default"]
    with pytest.raises(ConfigError) as e:
        build({"wecom": {**WECOM, "mode": "both", "token": "t", "encoding_aes_key": "SECRETVALUE"}}, {})
    assert "SECRETVALUE" not in str(e.value)
    assert "s" in build({"wecom": WECOM}, {}).secrets()
