"""DingTalk replies: groups and mentions, message types, sessionWebhook vs OpenAPI, tokens, rendering,
AI-card streaming and its fallbacks."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from gateway.i18n import translator
from gateway.keys import DISPATCHER
from gateway.steps import IMAGE_NOTE, NO_VISION
from tests.doubles.dingtalk import DingTalkDouble
from tests.helpers import ping_round_trip, start

BATCH_SEND = "/v1.0/robot/oToMessages/batchSend"
GROUP_SEND = "/v1.0/robot/groupMessages/send"
CARD_CREATE = "/v1.0/card/instances/createAndDeliver"
CARD_STREAM = "/v1.0/card/streaming"
CARD_UPDATE = "/v1.0/card/instances"
PNG = b"\x89PNG\r\n\x1a\n fake image bytes"


async def test_group_without_mention_is_ignored_and_with_mention_answered_to_the_asker(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    ignored = await env.double.push(
        env.double.message("chatting among us", group=True, at=False, conversation_id="cid-g")
    )
    await ping_round_trip(env)
    assert env.double.acked(ignored) is not None  # ACKed, so DingTalk does not redeliver it
    assert env.dropped("not_mentioned") == 1
    await env.double.push(
        env.double.message(
            "@Botgate\u2005summarise please", group=True, conversation_id="cid-g", staff_id="u42"
        )
    )
    [answer] = await env.answers(1)
    assert answer["at"] == {"atUserIds": ["u42"]}
    # In a group the model sees who asked (docs/security.md); the echo model repeats it.
    assert answer["markdown"]["text"] == "@u42 echo: Alice: summarise please"
    assert [r["messages"][-1]["content"] for r in model.requests] == ["Alice: summarise please"]


async def test_own_messages_are_ignored(aiohttp_server: Any, gateway: Any) -> None:
    env = await start(aiohttp_server, gateway)
    body = env.double.message("I am the robot")
    body["senderId"] = body["chatbotUserId"]
    frame_id = await env.double.push(body)
    await ping_round_trip(env)
    assert env.double.acked(frame_id) is not None and env.dropped("self") == 1
    assert env.double.session_posts == []


async def test_rich_text_is_answered_with_its_text(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    content = {
        "richText": [{"text": "compare"}, {"downloadCode": "dc-rich", "type": "picture"}, {"text": "please"}]
    }
    await env.double.push(env.double.message(msgtype="richText", content=content))
    [answer] = await env.answers(1)
    # Vision is off: the text is answered and the user is told the picture was not looked at.
    assert answer["markdown"]["text"].startswith(translator("zh-CN")(IMAGE_NOTE) + "\n\n")
    assert answer["markdown"]["text"].endswith("echo: compare\nplease")
    assert model.requests[0]["messages"][-1]["content"] == "compare\nplease"


async def test_picture_with_vision_goes_to_the_model(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, sections={"model": {"vision": True}})
    env.double.add_file("dc-pic", PNG, "image/png")
    await env.double.push(env.double.message(msgtype="picture", content={"downloadCode": "dc-pic"}))
    await env.answers(1)
    parts = model.requests[0]["messages"][-1]["content"]
    image = next(p for p in parts if p["type"] == "image_url")
    assert image["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert env.double.calls("/v1.0/robot/messageFiles/download")[0]["robotCode"] == env.double.client_id


async def test_picture_without_vision_tells_the_user(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    await env.double.push(env.double.message(msgtype="picture", content={"downloadCode": "dc-pic"}))
    [answer] = await env.answers(1)
    assert answer["markdown"]["text"] == translator("zh-CN")(NO_VISION)  # Chinese on DingTalk by default
    assert model.requests == [] and env.double.calls("/v1.0/robot/messageFiles/download") == []


async def test_audio_uses_the_recognition_text(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    content = {"downloadCode": "dc-a", "recognition": "what time is it", "duration": 3}
    await env.double.push(env.double.message(msgtype="audio", content=content))
    assert (await env.answers(1))[0]["markdown"]["text"] == "echo: what time is it"


async def test_video_gets_a_polite_notice(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    await env.double.push(env.double.message(msgtype="video", content={"downloadCode": "v", "duration": 3}))
    [answer] = await env.answers(1)
    assert "我还读不了视频" in answer["markdown"]["text"]  # Chinese on DingTalk by default
    assert model.requests == []


async def test_expired_session_webhook_goes_through_the_openapi(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    await env.double.push(env.double.message("late dm", staff_id="u7", expires_in=-60))
    await env.double.wait_for(lambda: env.double.calls(BATCH_SEND))
    [send] = env.double.calls(BATCH_SEND)
    assert send["robotCode"] == env.double.client_id and send["userIds"] == ["u7"]
    assert send["msgKey"] == "sampleMarkdown" and "echo: late dm" in send["msgParam"]
    await env.double.push(
        env.double.message("late group", group=True, conversation_id="cid-g", expires_in=-60)
    )
    await env.double.wait_for(lambda: env.double.calls(GROUP_SEND))
    [group] = env.double.calls(GROUP_SEND)
    assert group["openConversationId"] == "cid-g" and "@Alice echo: Alice: late group" in group["msgParam"]
    assert env.double.session_posts == []
    assert env.double.tokens_issued == ["AT-1"]  # one token, cached across calls


async def test_refused_session_webhook_falls_back_to_the_openapi(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, double=DingTalkDouble(expired_sessions=True))
    body = env.double.message("hello", staff_id="u7")  # a sessionWebhook valid for another 90 min
    await env.double.push(body)
    await env.double.wait_for(lambda: env.double.calls(BATCH_SEND))
    async with asyncio.timeout(10):
        await env.client.app[DISPATCHER].wait_idle()  # anything else it was going to send is sent
    # The answer went to the message's sessionWebhook first, which refused it...
    refused = env.double.refused_session_posts
    assert len(refused) == 1, f"the sessionWebhook should have been tried once, was: {refused}"
    assert refused[0]["session"] in body["sessionWebhook"]
    assert refused[0]["markdown"]["text"] == "echo: hello"
    # ...then the answer arrived through the OpenAPI, exactly once.
    [send] = env.double.calls(BATCH_SEND)
    assert send["userIds"] == ["u7"] and "echo: hello" in send["msgParam"]
    assert env.double.session_posts == [] and env.double.calls(GROUP_SEND) == []


async def test_rejected_token_is_refreshed_once(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, double=DingTalkDouble(reject_token_once=True))
    await env.double.push(env.double.message("first", expires_in=-60))
    await env.double.wait_for(lambda: env.double.calls(BATCH_SEND))
    await env.double.push(env.double.message("second", expires_in=-60))
    await env.double.wait_for(lambda: len(env.double.calls(BATCH_SEND)) == 2)
    assert env.double.tokens_issued == ["AT-1", "AT-2"]
    assert ["echo: first" in c["msgParam"] for c in env.double.calls(BATCH_SEND)] == [True, False]


async def test_table_is_rendered_as_a_list(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    model, url = openai_double
    model.answer = "Here:\n\n| Plan | Seats |\n|---|---|\n| Basic | 5 |\n| Pro | 50 |"
    env = await start(aiohttp_server, gateway, model_url=url)
    await env.double.push(env.double.message("plans?"))
    text = (await env.answers(1))[0]["markdown"]["text"]
    assert "|" not in text
    assert "- **Plan**: Basic; **Seats**: 5\n- **Plan**: Pro; **Seats**: 50" in text


async def test_long_answer_arrives_in_ordered_parts(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    model.answer = "\n\n".join(f"Part{i} " + "lorem " * 500 for i in range(4))
    env = await start(aiohttp_server, gateway, model_url=url, sections={"model": {"stream": False}})
    await env.double.push(env.double.message("essay", group=True, staff_id="u9"))
    answers = await env.answers(4)
    assert [a["markdown"]["text"].split()[0 if i else 1] for i, a in enumerate(answers)] == [
        "Part0",
        "Part1",
        "Part2",
        "Part3",
    ]
    assert answers[0]["at"] == {"atUserIds": ["u9"]} and "at" not in answers[1]


async def test_ai_card_streams_updates_in_order_then_the_final_text(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    _, url = openai_double
    env = await start(
        aiohttp_server, gateway, model_url=url, card_template_id="tpl-ai.schema", stream_interval=0.0
    )
    await env.double.push(env.double.message("one two three four five", staff_id="u5"))
    final = "echo: one two three four five"
    await env.double.wait_for(lambda: env.double.calls(CARD_UPDATE))
    [create] = env.double.calls(CARD_CREATE)
    assert create["cardTemplateId"] == "tpl-ai.schema" and create["openSpaceId"] == "dtv1.card//IM_ROBOT.u5"
    assert create["imRobotOpenDeliverModel"] == {"spaceType": "IM_ROBOT", "robotCode": env.double.client_id}
    track = create["outTrackId"]
    streamed = [c for c in env.double.calls(CARD_STREAM) if c["outTrackId"] == track]
    texts = [create["cardData"]["cardParamMap"]["msgContent"]] + [c["content"] for c in streamed]
    assert len(streamed) >= 3
    assert all(final.startswith(t) for t in texts) and texts == sorted(texts, key=len)
    assert [c["isFinalize"] for c in streamed] == [False] * (len(streamed) - 1) + [True]
    assert streamed[-1]["content"] == final
    [done] = env.double.calls(CARD_UPDATE)
    assert done["cardData"]["cardParamMap"] == {"flowStatus": "3", "msgContent": final}
    assert env.double.session_posts == []  # the card is the answer


async def test_group_card_mentions_the_asker(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, card_template_id="tpl", stream_interval=0.0)
    await env.double.push(
        env.double.message("hi", group=True, conversation_id="cid-g", staff_id="u3", nick="Dan")
    )
    await env.double.wait_for(lambda: env.double.calls(CARD_UPDATE))
    [create] = env.double.calls(CARD_CREATE)
    assert create["openSpaceId"] == "dtv1.card//IM_GROUP.cid-g"
    assert create["imGroupOpenDeliverModel"] == {
        "robotCode": env.double.client_id,
        "atUserIds": {"u3": "Dan"},
    }


async def test_card_creation_failing_gives_exactly_one_markdown_answer(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    _, url = openai_double
    double = DingTalkDouble(card_create_fails=True)
    env = await start(
        aiohttp_server, gateway, model_url=url, double=double, card_template_id="tpl", stream_interval=0.0
    )
    await double.push(double.message("a b c d"))
    await env.answers(1)
    await double.push(double.message("next"))  # same conversation: answered after the first is done
    answers = await env.answers(2)
    assert [a["markdown"]["text"] for a in answers] == ["echo: a b c d", "echo: next"]
    assert double.calls(CARD_STREAM) == [] and double.calls(CARD_UPDATE) == []


# The API budget (80 %: cards only at the end; 100 %: no card) is tested in tests/test_api_quota.py.


async def test_chinese_answers_travel_as_utf8_not_escapes(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    model.answer = "你好，这是回答。"
    env = await start(aiohttp_server, gateway, model_url=url)
    await env.double.push(env.double.message("问个问题"))
    [answer] = await env.answers(1)
    assert "你好，这是回答。" in answer["markdown"]["text"]
    [raw] = env.double.session_bodies
    assert "你好，这是回答。".encode() in raw and b"\\u" not in raw  # 3 bytes a character, not 6
