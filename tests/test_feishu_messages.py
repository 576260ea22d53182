"""Feishu end to end: events pushed over the long connection of a Feishu double, answered by the
OpenAI double, delivered through the reply API and CardKit cards."""

from __future__ import annotations

import base64
import itertools
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.i18n import Locale, translator
from gateway.keys import CHANNELS, DISPATCHER, METRICS
from gateway.messages import InboundMessage, Reply, ReplyKind
from gateway.steps import GREETING, NO_VISION, help_text
from handlers.feishu.parse import Rules, parse_event
from handlers.feishu.render import MANY_TABLES_NOTE, PART_LIMIT
from tests.doubles.feishu_events import BOT_OPEN_ID, mention, message_event
from tests.feishu_env import Start, answered

BOT = mention("@_user_1", BOT_OPEN_ID, "Bot")
TABLE = "| k | v |\n|---|---|\n| a | 1 |"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32

Client = TestClient[web.Request, web.Application]


def dropped(client: Client, reason: str) -> float:
    value = client.app[METRICS].registry.get_sample_value(
        "botgate_messages_dropped_total", {"platform": "feishu", "reason": reason}
    )
    return value or 0.0


def api_calls(client: Client, endpoint: str) -> float:
    value = client.app[METRICS].registry.get_sample_value(
        "botgate_platform_api_calls_total", {"platform": "feishu", "endpoint": endpoint}
    )
    return value or 0.0


async def test_p2p_text_answered_in_a_streaming_card(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    client = await feishu_gateway()
    frame_id = await double.push_event(message_event("hello there", message_id="om_1"))
    assert await double.response(frame_id) == {"code": 200}
    assert double.responses[frame_id].header("biz_rt") is not None
    assert await answered(client, double, "om_1") == "echo: hello there"
    (reply,) = double.replies_to("om_1")
    assert reply.msg_type == "interactive" and reply.content["type"] == "card" and not reply.in_thread
    card = double.cards[reply.content["data"]["card_id"]]
    assert card.settings[-1][1]["config"]["streaming_mode"] is False
    assert model.requests[-1]["messages"][-1]["content"] == "hello there"
    assert double.bot_info_calls == 1 and double.rejected == []
    for endpoint in ("ws_endpoint", "tenant_token", "bot_info", "card_create", "reply", "card_settings"):
        assert api_calls(client, endpoint) >= 1, endpoint


async def test_group_messages_need_the_bot_mentioned(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    client = await feishu_gateway()
    alice = mention("@_user_2", "ou_alice", "Alice")
    for event in (
        message_event("chatting among ourselves", message_id="om_g1", chat_type="group"),
        message_event("@_user_2 over to you", message_id="om_g2", chat_type="group", mentions=[alice]),
    ):
        assert await double.response(await double.push_event(event)) == {"code": 200}
    assert dropped(client, "not_mentioned") == 2
    event = message_event("@_user_1 what about @_user_2?", message_id="om_g3", chat_type="group",
                          mentions=[BOT, alice])
    await double.push_event(event)
    # The event names no sender: the model sees "成员-" and the open_id's end (docs/security.md).
    assert await answered(client, double, "om_g3") == "echo: 成员-u_user: what about @Alice?"
    assert [r.to for r in double.replies] == ["om_g3"]
    assert len(model.requests) == 1


async def test_bare_mention_gets_a_greeting(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    await double.push_event(message_event("@_user_1", message_id="om_hi", chat_type="group", mentions=[BOT]))
    assert await answered(client, double, "om_hi") == translator("zh-CN")(GREETING)  # Chinese on Feishu by default
    assert openai_double[0].requests == []


async def test_post_text_joined(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    content = {"title": "Q", "content": [[{"tag": "text", "text": "first line"}], [{"tag": "text", "text": "second"}]]}
    await double.push_event(message_event(message_id="om_post", message_type="post", content=content))
    assert await answered(client, double, "om_post") == "echo: Q\nfirst line\nsecond"


async def test_image_passed_to_a_vision_model(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    double.resources[("om_img", "img_1")] = (PNG, "image/png")
    client = await feishu_gateway(model={"vision": True})
    await double.push_event(message_event(message_id="om_img", message_type="image", content={"image_key": "img_1"}))
    await answered(client, double, "om_img")
    parts = model.requests[-1]["messages"][-1]["content"]
    assert parts[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert api_calls(client, "message_resource") == 1


async def test_image_without_vision_gets_a_clear_reply(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    await double.push_event(message_event(message_id="om_img", message_type="image", content={"image_key": "img_1"}))
    assert await answered(client, double, "om_img") == translator("zh-CN")(NO_VISION)
    assert openai_double[0].requests == [] and api_calls(client, "message_resource") == 0


async def test_video_gets_a_polite_notice(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    await double.push_event(message_event(message_id="om_f", message_type="media", content={"file_key": "f1"}))
    assert "我还读不了视频" in await answered(client, double, "om_f")  # Chinese on Feishu by default
    assert openai_double[0].requests == []


async def test_same_message_delivered_twice_answered_once(
    feishu_gateway: Start, feishu: Any, openai_double: Any
) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    event = message_event("once please", message_id="om_d")
    first = await double.push_event(event)
    again = await double.push_event(event)  # Feishu's retry: same event_id
    replay = message_event("once please", message_id="om_d", event_id="ev-other")  # same message, new envelope
    third = await double.push_event(replay)
    for frame_id in (first, again, third):
        assert await double.response(frame_id) == {"code": 200}  # all acknowledged: no more retries
    assert await answered(client, double, "om_d") == "echo: once please"
    assert len(double.replies_to("om_d")) == 1 and len(openai_double[0].requests) == 1
    dedup = client.app[METRICS].registry.get_sample_value("botgate_dedup_dropped_total", {"platform": "feishu"})
    assert dedup == 2


async def test_old_replayed_event_dropped(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    old = message_event("from yesterday", message_id="om_old", create_time=time.time() - 86400)
    assert await double.response(await double.push_event(old)) == {"code": 200}
    assert dropped(client, "stale") == 1
    await double.push_event(message_event("today", message_id="om_new"))
    await answered(client, double, "om_new")
    assert double.replies_to("om_old") == [] and len(openai_double[0].requests) == 1


async def test_streaming_updates_in_order_ending_with_the_full_text(
    feishu_gateway: Start, feishu: Any, openai_double: Any
) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.answer = " ".join(f"word{i}" for i in range(40))
    client = await feishu_gateway(feishu={"stream_interval": 0.0})
    await double.push_event(message_event("stream it", message_id="om_s"))
    assert await answered(client, double, "om_s") == model.answer
    (reply,) = double.replies_to("om_s")
    card = double.cards[reply.content["data"]["card_id"]]
    texts = [card.card["body"]["elements"][0]["content"]] + [text for _, text in card.contents]
    assert len(texts) >= 3, texts  # really streamed, not one final update
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # arrived in order
    sequences = [seq for seq, _ in card.contents] + [seq for seq, _ in card.settings]
    assert sequences == sorted(set(sequences))  # strictly increasing, closing last
    assert card.settings[-1][1]["config"]["summary"]["content"].startswith("word0 word1")
    assert double.rejected == []


@pytest.mark.parametrize("broken", ["content", "create"])
async def test_streaming_failure_still_gives_one_complete_answer(
    feishu_gateway: Start, feishu: Any, openai_double: Any, broken: str
) -> None:
    """No card: the answer as one ordinary reply. A card that takes no text after its first: it
    is closed showing that, and the rest of the answer follows as a reply (nothing twice)."""
    double, _ = feishu
    model, _ = openai_double
    model.answer = " ".join(f"w{i}" for i in range(20))
    double.fail_card = broken
    client = await feishu_gateway(feishu={"stream_interval": 0.0})
    await double.push_event(message_event("stream it", message_id="om_sf"))
    await double.wait_for(lambda: any(r.content.get("type") != "card" for r in double.replies_to("om_sf")))
    await client.app[DISPATCHER].wait_idle()
    ordinary = [r for r in double.replies_to("om_sf") if r.content.get("type") != "card"]
    assert len(ordinary) == 1
    if broken == "create":
        assert double.replies_to("om_sf") == ordinary and double.shown(ordinary[0]) == model.answer
    else:
        card, rest = double.replies_to("om_sf")
        assert double.shown(card) == "w0" and double.shown(rest) == "…" + model.answer.removeprefix("w0")
    assert double.open_cards() == []


async def test_six_tables_become_a_post(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.answer = "\n\n".join(f"Part {i}\n\n{TABLE}" for i in range(6))
    client = await feishu_gateway()
    await double.push_event(message_event("tables please", message_id="om_t"))
    shown = await answered(client, double, "om_t")
    card_reply, post_reply = double.replies_to("om_t")
    assert double.shown(card_reply) == translator("zh-CN")(MANY_TABLES_NOTE)
    assert post_reply.msg_type == "post"
    assert shown == translator("zh-CN")(MANY_TABLES_NOTE) + "\n\n" + model.answer
    assert double.rejected == []  # no card with more than 5 tables was ever sent


async def test_long_answer_arrives_in_ordered_parts(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.answer = "\n\n".join(f"Paragraph {i} " + "x" * 990 for i in range(12))
    assert len(model.answer) > PART_LIMIT
    client = await feishu_gateway()
    await double.push_event(message_event("long please", message_id="om_l"))
    assert await answered(client, double, "om_l") == model.answer
    replies = double.replies_to("om_l")
    assert len(replies) == 2 and replies[1].msg_type == "interactive"
    assert double.rejected == []


async def test_invalid_token_refreshed_once(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    assert double.token_calls == 1
    double.reject_token_once = True
    await double.push_event(message_event("token?", message_id="om_tok"))
    assert await answered(client, double, "om_tok") == "echo: token?"
    assert double.token_calls == 2
    assert len(double.replies_to("om_tok")) == 1
    assert double.api_auth[-1] == "Bearer t-2"


async def test_nearly_spent_budget_answers_without_streaming(
    feishu_gateway: Start, feishu: Any, openai_double: Any
) -> None:
    double, _ = feishu
    # The ws endpoint and bot info calls use it all (the token is not billable): 100 %.
    client = await feishu_gateway(feishu={"monthly_api_budget": 2})
    await double.push_event(message_event("cheap please", message_id="om_b"))
    assert await answered(client, double, "om_b") == "echo: cheap please"
    (reply,) = double.replies_to("om_b")
    assert reply.content.get("type") != "card" and double.cards == {}  # one call, no CardKit


async def test_threaded_question_answered_in_its_thread(feishu_gateway: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    event = message_event("@_user_1 in a thread", message_id="om_th", chat_type="group", mentions=[BOT],
                          thread_id="omt_1")
    await double.push_event(event)
    await answered(client, double, "om_th")
    assert [r.in_thread for r in double.replies_to("om_th")] == [True]



async def test_resent_reply_shows_once(feishu_gateway: Start, feishu: Any) -> None:
    """A reply sent again (a retry, or a restarted process answering from its inbox with only the
    persisted message) carries the same uuid, so Feishu shows it once."""
    double, _ = feishu
    client = await feishu_gateway()
    event = message_event("/help", message_id="om_h")
    await double.push_event(event)
    shown = help_text(Locale.ZH_CN)  # Chinese on Feishu by default
    assert await answered(client, double, "om_h") == shown
    parsed = parse_event(event, Rules(BOT_OPEN_ID), "ws", time.time())
    assert isinstance(parsed, InboundMessage)
    persisted = InboundMessage.from_dict(orjson.loads(orjson.dumps(parsed.to_dict())))
    await client.app[CHANNELS]["feishu/default"].send(Reply(persisted, shown, ReplyKind.NOTICE))
    assert len(double.replies_to("om_h")) == 1
