"""DingTalk pure functions: payload parsing for every message type, rendering, webhook signatures."""

from __future__ import annotations

import orjson
import pytest
from dingtalk_stream.chatbot import ChatbotMessage

from gateway.access import AccessList
from gateway.admission import Dropped
from gateway.messages import Attachment, ConversationKind, InboundMessage
from handlers.dingtalk.parse import NO_RECOGNITION, TOPIC, Filters, parse_message
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


def test_only_the_robots_own_leading_mention_is_stripped() -> None:
    def group(text: str, *others: str, robot_first: bool = True) -> InboundMessage:
        body = double.message(text, group=True)
        people = [{"dingtalkId": f"$:LWCP_v1:${who}", "staffId": who} for who in others]
        robot = body["atUsers"]
        body["atUsers"] = robot + people if robot_first else people + robot
        return parsed(body)

    # The robot's mention already removed by DingTalk: a leading "@Bob" is part of the question.
    assert group("@Bob\u2005please check the release", "bob").text == "@Bob please check the release"
    # Both mentions kept, the robot's first in atUsers: only the robot's goes.
    assert group("@Botgate\u2005@Bob\u2005please check", "bob").text == "@Bob please check"
    # Both kept, but atUsers does not say the leading one is the robot's: nothing is deleted.
    assert group("@Bob\u2005@Botgate\u2005check", "bob", robot_first=False).text == "@Bob @Botgate check"
    # An e-mail address is no mention.
    assert group("mail bob@example.com", "bob").text == "mail bob@example.com"
    # A message that @mentions the robot by no id the payload names: nothing is taken for ours.
    body = double.message("@Bob\u2005hi", group=True)
    body["atUsers"] = [{"dingtalkId": "$:LWCP_v1:$bob"}]
    assert parsed(body).text == "@Bob hi"


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
    assert file.attachments == (Attachment("file", "f", "a.pdf"),) and not file.unsupported  # read later
    video = parsed(double.message(msgtype="video", content={"downloadCode": "v"}))
    assert "can't read videos" in video.unsupported
    other = parsed(double.message(msgtype="unknownMsgType", content={}))
    assert "unknownMsgType messages" in other.unsupported
    for kind in ("markdown", "chatRecord", "interactiveCard"):  # known types, nothing readable in them
        assert "can't read this" in parsed(double.message(msgtype=kind, content={})).unsupported, kind


def test_markdown_chat_history_and_shared_documents_are_read() -> None:
    markdown = parsed(double.message(msgtype="markdown", content={"title": "t", "text": "## Plan\n- ship it"}))
    assert (markdown.text, markdown.unsupported) == ("## Plan\n- ship it", "")
    records = [
        {"senderNick": "Ann", "content": "the build is red"},
        {"senderNick": "Bo", "msgType": "text", "content": {"text": "since 9:00"}},
        {"senderNick": "Cy", "msgType": "picture"},  # nothing readable: left out
    ]
    content = {"summary": "Ann: the build…", "chatRecord": orjson.dumps(records).decode()}
    history = parsed(double.message(msgtype="chatRecord", content=content))
    assert history.text == "[Forwarded chat history]\nAnn: the build…\nAnn: the build is red\nBo: since 9:00"
    assert not history.unsupported
    summary_only = parsed(double.message(msgtype="chatRecord", content={"summary": "Ann: hi\nBo: hello"}))
    assert summary_only.text == "[Forwarded chat history]\nAnn: hi\nBo: hello"
    as_list = parsed(double.message(msgtype="chatRecord", content={"summary": "[]", "chatRecord": records[:1]}))
    assert as_list.text == "[Forwarded chat history]\nAnn: the build is red"
    url = "dingtalk://dingtalkclient/page/link?route=previewDentry&type=file&spaceId=1&fileId=2"
    card = parsed(
        double.message(msgtype="interactiveCard", content={"title": "Q3 report", "biz_custom_action_url": url})
    )
    assert card.text == f"[Shared document]\nQ3 report\n{url}" and not card.unsupported
    untitled = parsed(double.message(msgtype="interactiveCard", content={"biz_custom_action_url": url}))
    assert untitled.text == f"[Shared document]\n{url}"


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
    # DingTalk's documented disconnect has no messageId: honoured, with nothing to ACK.
    bye = parse_frame('{"type":"SYSTEM","headers":{"topic":"disconnect"},"data":"{\\"reason\\":\\"x\\"}"}')
    assert (bye.type, bye.topic, bye.message_id) == ("SYSTEM", "disconnect", "")
    callback_without_id = '{"type":"CALLBACK","headers":{"topic":"/v1.0/im/bot/messages/get"},"data":"{}"}'
    for bad in ("nope", "[]", '{"headers":{}}', '{"headers":{"messageId":"m"},"data":{"a":1}}', callback_without_id):
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
    assert title_of("\n\n") == ""  # the adapter words one in the message's language
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


def test_the_parser_reads_a_body_as_the_sdk_does() -> None:
    """dingtalk-stream's ChatbotMessage is the reference; the parser reads the dict without building
    it (it cost half the parse on the intake's hot path), so it must agree with it field by field,
    and refuse what the SDK cannot read."""
    group = double.message("@Bot how?", group=True)
    group["atUsers"] = [{"dingtalkId": "$:LWCP_v1:$robot", "staffId": "r1"}]  # an entry with more than the id
    rich = {"richText": [{"text": "see"}, {"downloadCode": "dc1", "type": "picture"}]}
    bodies = [
        double.message(" hi ", staff_id="s9", nick="Bob"),
        {**double.message(), "sessionWebhookExpiredTime": "1700000000000"},  # a digit string: int() reads it
        group,
        double.message(msgtype="picture", content={"downloadCode": "dc2"}),
        double.message(msgtype="richText", content=rich),
    ]
    for body in bodies:
        sdk = ChatbotMessage.from_dict(body)
        ours = parsed(body)
        handle = ours.reply_handle
        assert ours.message_id == f"{FILTERS.robot_code}:{sdk.message_id}"
        assert ours.conversation_id == sdk.conversation_id == handle["conversation_id"]
        assert ours.sender_id == (sdk.sender_staff_id or sdk.sender_id)
        assert ours.sender_name == sdk.sender_nick == handle["sender_nick"]
        assert handle["session_webhook"] == sdk.session_webhook
        assert handle["session_webhook_expires"] == sdk.session_webhook_expired_time
        assert handle["conversation_type"] == sdk.conversation_type
        assert handle["robot_code"] == sdk.robot_code
        if sdk.message_type == "text":
            assert ours.text == sdk.text.content.replace("@Bot ", "").strip()
        if sdk.message_type == "picture":
            assert [a.ref for a in ours.attachments] == [sdk.image_content.download_code]
        if sdk.message_type == "richText":
            assert [a.ref for a in ours.attachments] == sdk.get_image_list()
    refused = [
        {"msgtype": "text", **{k: v for k, v in double.message().items() if k != "text"}},
        {**double.message(), "text": "not a dict"},
        {**double.message(msgtype="picture", content={}), "content": None},
        {**double.message(msgtype="richText", content={}), "content": "x"},
        {**double.message(), "sessionWebhookExpiredTime": "soon"},
        {**double.message(), "atUsers": [1]},
    ]
    for body in refused:
        with pytest.raises((KeyError, TypeError, ValueError, AttributeError)):
            ChatbotMessage.from_dict(body)
        result = parse_message(body, FILTERS, "webhook")
        assert isinstance(result, Dropped) and result.reason == "malformed", body


def test_the_callback_topic_is_the_sdks() -> None:
    assert TOPIC == ChatbotMessage.TOPIC
