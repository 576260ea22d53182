"""DingTalk pure functions: payload parsing for every message type, rendering, webhook signatures."""

from __future__ import annotations

import orjson

from gateway.access import AccessList
from gateway.admission import Dropped
from gateway.messages import Attachment, ConversationKind, InboundMessage
from handlers.dingtalk.parse import NO_RECOGNITION, Filters, parse_message
from handlers.dingtalk.render import PART_LIMIT, openapi_markdown, render, title_of
from handlers.dingtalk.stream import FrameError, ack_frame, parse_frame
from handlers.dingtalk.webhook import sign, signature_problem
from tests.doubles.dingtalk import DingTalkDouble

FILTERS = Filters(robot_code="robot1")
double = DingTalkDouble(base="https://oapi.dingtalk.com")


def parsed(body: object, filters: Filters = FILTERS) -> InboundMessage:
    result = parse_message(body, filters, "stream")
    assert isinstance(result, InboundMessage), result
    return result


def test_dm_text() -> None:
    body = double.message(" hello there ", msg_id="msgA", staff_id="manager807", nick="Bob")
    msg = parsed(body)
    assert msg.text == "hello there"
    assert msg.conversation_kind is ConversationKind.DM
    assert msg.message_id == "robot1:msgA"
    assert msg.dedup_key == "dingtalk:robot1:msgA"
    assert (msg.sender_id, msg.sender_name) == ("manager807", "Bob")
    handle = msg.reply_handle
    assert handle["session_webhook"] == body["sessionWebhook"]
    assert handle["session_webhook_expires"] == body["sessionWebhookExpiredTime"]
    assert handle["conversation_type"] == "1"
    assert handle["robot_code"] == double.client_id
    # It is persisted with the message, so it must survive JSON.
    assert InboundMessage.from_dict(orjson.loads(orjson.dumps(msg.to_dict()))) == msg


def test_group_needs_mention_and_mention_text_is_stripped() -> None:
    assert parse_message(double.message("hi", group=True, at=False), FILTERS, "stream") == Dropped(
        "not_mentioned"
    )
    msg = parsed(double.message("@Botgate\u2005what now?", group=True))
    assert msg.text == "what now?"
    assert msg.conversation_kind is ConversationKind.GROUP and msg.mentioned
    # DingTalk usually removes the robot's own mention itself; other mentions later on stay.
    assert parsed(double.message(" ask @Carol later", group=True)).text == "ask @Carol later"


def test_own_messages_and_filtered_ids_are_dropped() -> None:
    body = double.message("loop?")
    body["senderId"] = body["chatbotUserId"]
    assert parse_message(body, FILTERS, "stream") == Dropped("self")
    deny = Filters("robot1", senders=AccessList.of([], ["staff1"]))
    assert parse_message(double.message("hi"), deny, "stream") == Dropped("filtered", "sender")
    only = Filters("robot1", conversations=AccessList.of(["cid-allowed"], []))
    assert parse_message(double.message("hi"), only, "stream") == Dropped("filtered", "conversation")
    assert isinstance(
        parse_message(double.message("hi", conversation_id="cid-allowed"), only, "stream"), InboundMessage
    )


def test_rich_text_joins_text_and_keeps_pictures() -> None:
    content = {
        "richText": [{"text": "look at"}, {"downloadCode": "dc1", "type": "picture"}, {"text": "this chart"}]
    }
    msg = parsed(double.message(msgtype="richText", content=content))
    assert msg.text == "look at\nthis chart"
    assert msg.attachments == (Attachment("image", "dc1"),)


def test_picture_audio_file_and_unknown() -> None:
    picture = parsed(double.message(msgtype="picture", content={"downloadCode": "dc2"}))
    assert picture.attachments == (Attachment("image", "dc2"),) and picture.text == ""
    alt = parsed(double.message(msgtype="picture", content={"pictureDownloadCode": "dc3"}))
    assert alt.attachments == (Attachment("image", "dc3"),)
    audio = parsed(
        double.message(
            msgtype="audio", content={"downloadCode": "a", "recognition": "turn on the lights", "duration": 2}
        )
    )
    assert audio.text == "turn on the lights" and not audio.unsupported
    assert (
        parsed(double.message(msgtype="audio", content={"downloadCode": "a"})).unsupported == NO_RECOGNITION
    )
    file = parsed(double.message(msgtype="file", content={"downloadCode": "f", "fileName": "a.pdf"}))
    assert "can't read files" in file.unsupported
    video = parsed(double.message(msgtype="video", content={"downloadCode": "v"}))
    assert "can't read videos" in video.unsupported
    other = parsed(double.message(msgtype="interactiveCard", content={}))
    assert "interactiveCard messages" in other.unsupported


def test_malformed_bodies_never_raise() -> None:
    body: object
    for body in (
        None,
        [],
        "x",
        {},
        {"msgtype": "text"},
        {**double.message(), "text": "not a dict"},
        {**double.message(), "conversationType": "3"},
        {**double.message(), "atUsers": [1]},
        {**double.message(), "sessionWebhookExpiredTime": "soon"},
    ):
        result = parse_message(body, FILTERS, "webhook")
        assert isinstance(result, Dropped) and result.reason == "malformed", body


def test_frames_and_acks() -> None:
    frame = parse_frame(
        '{"type":"SYSTEM","headers":{"topic":"ping","messageId":"p1"},"data":"{\\"opaque\\":\\"x\\"}"}'
    )
    assert (frame.type, frame.topic, frame.message_id) == ("SYSTEM", "ping", "p1")
    ack = orjson.loads(ack_frame("p1", frame.data))
    assert ack == {
        "code": 200,
        "headers": {"contentType": "application/json", "messageId": "p1"},
        "message": "OK",
        "data": '{"opaque":"x"}',
    }
    for bad in ("nope", "[]", '{"headers":{}}', '{"headers":{"messageId":"m"},"data":{"a":1}}'):
        try:
            parse_frame(bad)
        except FrameError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_table_becomes_list_and_long_answers_split_in_order() -> None:
    table = "Plans:\n\n| Plan | Price |\n|---|---|\n| Basic | 10 |\n| Pro | 20 |"
    [part] = render(table)
    assert "|" not in part.text and "- **Plan**: Pro; **Price**: 20" in part.text
    long = "\n\n".join(f"Paragraph {i}. " + "word " * 300 for i in range(8))
    parts = [p.text for p in render(long)]
    assert len(parts) > 1 and all(len(p) <= PART_LIMIT for p in parts)
    assert parts[0].startswith("Paragraph 0.") and parts[-1].startswith("Paragraph")
    assert "".join(parts).replace("\n", "").replace(" ", "") == long.replace("\n", "").replace(" ", "")


def test_title_is_the_first_line_without_markup_and_shortened() -> None:
    assert title_of("## **Summary** of the results for this quarter\nbody") == "Summary of the resu…"
    assert title_of("\n\n") == "Reply"
    key, param = openapi_markdown("T", "**x**")
    assert key == "sampleMarkdown" and orjson.loads(param) == {"title": "T", "text": "**x**"}


def test_webhook_signature() -> None:
    # Vector from docs/protocols/dingtalk.md §C.2 (computed with the documented formula).
    assert sign("1700000000000", "this is secret") == "sSFWELbV2YwjdDQhWZwTcWlX5BWUx5J6TPpsZmuPii0="
    now = 1700000000000
    good = sign(str(now), "s")
    assert signature_problem(str(now), good, "s", now + 3_599_000) == ""
    assert signature_problem(str(now), good, "s", now + 3_601_000) != ""
    assert signature_problem(str(now), good, "other", now) == "bad signature"
    assert signature_problem("", good, "s", now) != ""
    assert signature_problem("12ab", good, "s", now) == "malformed timestamp"
