"""Feishu event JSON -> InboundMessage: pure functions, no network."""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.access import AccessList
from gateway.admission import Dropped
from gateway.messages import Attachment, ConversationKind, InboundMessage
from handlers.feishu.parse import Rules, parse_event
from tests.doubles.feishu_events import BOT_OPEN_ID, mention, message_event

RULES = Rules(BOT_OPEN_ID)
BOT = mention("@_user_1", BOT_OPEN_ID, "Bot")
ALICE = mention("@_user_2", "ou_alice", "Alice")


def parse(body: dict[str, Any], rules: Rules = RULES) -> InboundMessage | Dropped:
    return parse_event(body, rules, "ws", time.time())


def message(body: dict[str, Any], rules: Rules = RULES) -> InboundMessage:
    result = parse(body, rules)
    assert isinstance(result, InboundMessage), result
    return result


def test_p2p_text() -> None:
    msg = message(message_event("hello there", message_id="om_9", chat_id="oc_dm"))
    assert (msg.platform, msg.transport, msg.text, msg.message_id) == ("feishu", "ws", "hello there", "om_9")
    assert msg.conversation_kind is ConversationKind.DM and msg.mentioned
    assert (msg.conversation_id, msg.sender_id) == ("oc_dm", "ou_user")
    assert msg.dedup_key == "feishu:om_9"
    # Enough to answer after a restart, and JSON-able (it is persisted in the inbox).
    assert orjson.loads(orjson.dumps(msg.reply_handle)) == {
        "message_id": "om_9", "chat_id": "oc_dm", "chat_type": "p2p", "thread_id": ""
    }
    assert InboundMessage.from_dict(orjson.loads(orjson.dumps(msg.to_dict()))) == msg


def test_mentions_resolved_bot_stripped() -> None:
    body = message_event("@_user_1 ask @_user_2 and @_user_10 and @_all", chat_type="group", mentions=[BOT, ALICE])
    msg = message(body)
    assert msg.text == "ask @Alice and  and @all"
    assert msg.conversation_kind is ConversationKind.GROUP and msg.mentioned


def test_group_needs_the_bot_itself_mentioned() -> None:
    assert parse(message_event("hi all", chat_type="group")) == Dropped("not_mentioned")
    assert parse(message_event("@_user_2 hi", chat_type="group", mentions=[ALICE])) == Dropped("not_mentioned")
    # Someone named like the bot is not the bot: only the open_id counts.
    fake = mention("@_user_1", "ou_someone", "Bot")
    assert parse(message_event("@_user_1 hi", chat_type="group", mentions=[fake])) == Dropped("not_mentioned")


def test_bare_mention_gives_empty_text() -> None:
    msg = message(message_event("@_user_1", chat_type="group", mentions=[BOT]))
    assert msg.text == "" and msg.mentioned and not msg.unsupported


def test_own_and_other_bots_messages_dropped() -> None:
    assert parse(message_event("loop?", sender=BOT_OPEN_ID)) == Dropped("self")
    assert parse(message_event("loop?", sender="ou_other_bot", sender_type="app")) == Dropped("bot")


def test_old_delivery_dropped() -> None:
    result = parse(message_event("late", create_time=time.time() - 3600))
    assert isinstance(result, Dropped) and result.reason == "stale"
    assert isinstance(parse(message_event("recent", create_time=time.time() - 60)), InboundMessage)


def test_allow_and_deny_lists() -> None:
    rules = Rules(BOT_OPEN_ID, users=AccessList.of([], ["ou_user"]))
    assert parse(message_event("hi"), rules) == Dropped("filtered")
    rules = Rules(BOT_OPEN_ID, chats=AccessList.of(["oc_allowed"], []))
    assert parse(message_event("hi", chat_id="oc_other"), rules) == Dropped("filtered")
    assert isinstance(parse(message_event("hi", chat_id="oc_allowed"), rules), InboundMessage)


def test_post_text_joined_images_attached() -> None:
    content = {
        "title": "Report",
        "content": [
            [{"tag": "at", "user_id": "@_user_1", "user_name": "Bot"}, {"tag": "text", "text": " see "},
             {"tag": "a", "text": "this", "href": "https://example.com"}],
            [{"tag": "img", "image_key": "img_1"}],
            [{"tag": "text", "text": "and "}, {"tag": "at", "user_id": "@_user_2", "user_name": "Alice"},
             {"tag": "emotion", "emoji_type": "SMILE"}],
            [{"tag": "code_block", "language": "PYTHON", "text": "print(1)"}],
        ],
    }
    body = message_event(chat_type="group", message_type="post", content=content, mentions=[BOT, ALICE])
    msg = message(body)
    assert msg.text == "Report\n see [this](https://example.com)\n\nand @Alice:SMILE:\n```python\nprint(1)\n```"
    assert msg.attachments == (Attachment("image", "img_1"),)


def test_post_wrapped_in_a_locale() -> None:
    content = {"zh_cn": {"title": "", "content": [[{"tag": "text", "text": "你好"}]]}}
    assert message(message_event(message_type="post", content=content)).text == "你好"


def test_image_becomes_attachment() -> None:
    msg = message(message_event(message_type="image", content={"image_key": "img_v2_abc"}))
    assert msg.text == "" and msg.attachments == (Attachment("image", "img_v2_abc"),)


def test_files_and_others_get_a_polite_notice() -> None:
    for kind, words in (("media", "videos"),
                        ("interactive", "“interactive” messages")):
        msg = message(message_event(message_type=kind, content={"file_key": "f"}))
        assert f"can't read {words} yet" in msg.unsupported, kind


def test_file_becomes_a_document_attachment_and_a_sticker_is_dropped() -> None:
    msg = message(message_event(message_type="file", content={"file_key": "file_v3_x", "file_name": "q3.pdf"}))
    assert msg.attachments == (Attachment("file", "file_v3_x", "q3.pdf"),) and not msg.unsupported
    sticker = parse_event(message_event(message_type="sticker", content={"file_key": "s"}), RULES, "ws", time.time())
    assert sticker == Dropped("sticker")


def test_thread_is_its_own_conversation() -> None:
    msg = message(message_event("hi", chat_type="group", mentions=[BOT], thread_id="omt_1"))
    assert msg.conversation_id == "oc_chat:omt_1" and msg.reply_handle["thread_id"] == "omt_1"


def test_malformed_and_foreign_events() -> None:
    body = message_event("hi")
    body["event"]["message"]["message_id"] = ""
    assert parse(body).reason == "malformed"  # type: ignore[union-attr]
    body = message_event("hi")
    body["event"]["message"]["content"] = "{not json"
    assert parse(body).reason == "malformed"  # type: ignore[union-attr]
    body = message_event("hi")
    body["header"]["event_type"] = "im.chat.member.bot.added_v1"
    assert parse(body).reason == "event_type"  # type: ignore[union-attr]
    assert parse({"uuid": "v1", "event": {"type": "message"}}).reason == "event_type"  # type: ignore[union-attr]
    assert parse({}).reason == "event_type"  # type: ignore[union-attr]
