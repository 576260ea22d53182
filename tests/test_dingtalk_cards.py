"""DingTalk AI cards in every failure order: exactly one complete visible answer per message, and no
card left "typing" — against the DingTalk double's cards (tests/doubles/dingtalk.py), which fail
the way DingTalk does: throttled, 5xx, refused, answers lost after the call took effect, cards that
reach nobody, streaming refused after `isFinalize`. Restarts are real: the gateway stops and a new
one starts on the same SQLite file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gateway.i18n import translator
from gateway.keys import DISPATCHER
from gateway.store import CardRecord, RedisStore, SqliteStore
from gateway.streaming import SENT_AS_MESSAGE as SENT
from tests.doubles.dingtalk import AICard, DingTalkDouble
from tests.doubles.openai import OpenAIDouble
from tests.helpers import DingTalkEnv, msg, start

ANSWER = " ".join(f"w{i}" for i in range(20))
INTERRUPTED = "回答被中断了，请重新提问。"  # on DingTalk, in Chinese by default
SENT_AS_MESSAGE = translator("zh-CN")(SENT)


def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "botgate.sqlite3"


async def card_gateway(
    aiohttp_server: Any, gateway: Any, url: str, double: DingTalkDouble, tmp_path: Path, **sections: Any
) -> DingTalkEnv:
    """A gateway streaming into AI cards (every update at once), its state in a SQLite file."""
    return await start(
        aiohttp_server,
        gateway,
        model_url=url,
        double=double,
        card_template_id="tpl-ai.schema",
        stream_interval=0.0,
        sections={"store": {"url": f"sqlite:///{db(tmp_path)}"}, **sections},
    )


async def answered(env: DingTalkEnv) -> None:
    """Until the gateway is idle: every answer finished (or given up)."""
    await env.client.app[DISPATCHER].wait_idle()


def only_card(double: DingTalkDouble) -> AICard:
    [card] = double.cards.values()
    return card


async def recorded(tmp_path: Path) -> list[str | None]:
    """The texts the open cards recorded in the (stopped) gateway's store are to end with."""
    store = SqliteStore(db(tmp_path))
    await store.open()
    try:
        return [r.text for r in await store.cards_open()]
    finally:
        await store.close()


@pytest.mark.parametrize("fault", ["busy", "throttled", "lost"])
async def test_card_calls_failing_transiently_are_retried_and_the_card_gets_the_whole_answer(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], tmp_path: Path, fault: str
) -> None:
    model, url = openai_double
    model.answer = ANSWER
    double = DingTalkDouble(card_faults={"create": [fault], "streaming": [fault, fault], "update": [fault]})
    env = await card_gateway(aiohttp_server, gateway, url, double, tmp_path)
    await double.push(double.message("stream it"))
    await double.wait_for(lambda: double.cards and only_card(double).finished)
    await answered(env)
    card = only_card(double)
    assert card.text == ANSWER and card.finalized and double.open_cards() == []
    assert double.session_posts == []  # the card is the answer: no second one
    assert len(card.streamed) >= 3  # streaming went on after the failures, it did not give up
    creates = {body["outTrackId"] for kind, body, _ in double.card_attempts if kind == "create"}
    assert creates == {card.out_track_id}  # the retried create kept its outTrackId
    failed = [body["guid"] for kind, body, outcome in double.card_attempts if kind == "streaming" and outcome == fault]
    accepted = [s["guid"] for s in card.streamed]
    assert len(failed) == 2 and set(failed) <= set(accepted)  # each retry was the same update (guid)
    if fault == "lost":
        assert card.repeated == failed  # applied once, though sent twice


async def test_a_broken_stream_still_ends_in_the_card_with_the_whole_answer(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], tmp_path: Path
) -> None:
    """Streaming updates refused for good: the card is closed with the answer through its data."""
    model, url = openai_double
    model.answer = ANSWER
    double = DingTalkDouble(card_refused={"streaming"})
    env = await card_gateway(aiohttp_server, gateway, url, double, tmp_path)
    await double.push(double.message("stream it"))
    await double.wait_for(lambda: double.cards and only_card(double).finished)
    await answered(env)
    assert only_card(double).text == ANSWER and double.open_cards() == []
    assert double.session_posts == []  # never a stuck card plus a second, full answer
    await env.client.close()
    assert await recorded(tmp_path) == []


async def test_a_card_refusing_every_update_leaves_the_answer_to_one_message_then_is_closed_on_restart(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], tmp_path: Path
) -> None:
    model, url = openai_double
    model.answer = ANSWER
    double = DingTalkDouble(card_refused={"streaming", "update"})
    env = await card_gateway(aiohttp_server, gateway, url, double, tmp_path)
    await double.push(double.message("stream it"))
    [post] = await env.answers(1)
    await answered(env)
    assert post["markdown"]["text"] == ANSWER
    assert only_card(double).text == "w0" and double.open_cards()  # what it showed: DingTalk refuses more
    await env.client.close()
    assert await recorded(tmp_path) == [SENT_AS_MESSAGE]

    double.card_refused.clear()  # DingTalk takes card updates again
    env = await card_gateway(aiohttp_server, gateway, url, double, tmp_path)
    await double.wait_for(lambda: only_card(double).finished)
    assert only_card(double).text == SENT_AS_MESSAGE and double.open_cards() == []
    assert len(double.session_posts) == 1
    await env.client.close()
    assert await recorded(tmp_path) == []


async def test_a_failed_status_update_after_the_final_text_sends_nothing_again(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], tmp_path: Path
) -> None:
    """`isFinalize` went through, the flowStatus update did not: the user has the answer in the
    card, so no message follows; the next start marks the card finished."""
    model, url = openai_double
    model.answer = ANSWER
    double = DingTalkDouble(card_refused={"update"})
    env = await card_gateway(aiohttp_server, gateway, url, double, tmp_path)
    await double.push(double.message("stream it"))
    await double.wait_for(lambda: double.cards and only_card(double).finalized)
    await answered(env)
    card = only_card(double)
    assert card.text == ANSWER and not card.finished and double.session_posts == []
    await env.client.close()
    assert await recorded(tmp_path) == [ANSWER]

    double.card_refused.clear()
    env = await card_gateway(aiohttp_server, gateway, url, double, tmp_path)
    await double.wait_for(lambda: only_card(double).finished)
    assert only_card(double).text == ANSWER and double.open_cards() == []
    assert [a for a in double.card_attempts if a[2] == "after finalize"] == []  # no streaming after finalize
    assert double.session_posts == [] and len(double.cards) == 1


async def test_a_card_that_reached_nobody_gives_a_markdown_answer(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], tmp_path: Path
) -> None:
    model, url = openai_double
    model.answer = ANSWER
    double = DingTalkDouble(undelivered=True)
    env = await card_gateway(aiohttp_server, gateway, url, double, tmp_path)
    await double.push(double.message("stream it"))
    [post] = await env.answers(1)
    await answered(env)
    assert post["markdown"]["text"] == ANSWER
    assert [kind for kind, _, _ in double.card_attempts] == ["create"]  # nothing streamed into it
    assert double.open_cards() == []
    await env.client.close()
    assert await recorded(tmp_path) == []


async def test_a_card_cut_off_by_a_restart_is_taken_over_by_the_resumed_answer(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], tmp_path: Path
) -> None:
    model, url = openai_double
    model.script = ["stall"]  # the first answer stops after its first word, until the restart
    double = DingTalkDouble()
    env = await card_gateway(aiohttp_server, gateway, url, double, tmp_path, dispatcher={"drain_timeout": 0.1})
    await double.push(double.message("one two three"))
    await double.wait_for(lambda: double.cards)
    await env.client.close()  # drain times out: the answer is cut off, its message stays in the inbox
    assert only_card(double).text == "echo:" and double.open_cards()

    env = await card_gateway(aiohttp_server, gateway, url, double, tmp_path)
    await double.wait_for(lambda: only_card(double).finished)
    await answered(env)
    card = only_card(double)  # the same card: no second one
    assert card.text == "echo: one two three" and double.open_cards() == []
    assert double.session_posts == []
    await env.client.close()
    assert await recorded(tmp_path) == []


async def test_a_card_whose_message_is_gone_gets_the_interrupted_notice_on_restart(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], tmp_path: Path
) -> None:
    model, url = openai_double
    model.script = ["stall"]
    double = DingTalkDouble()
    env = await card_gateway(aiohttp_server, gateway, url, double, tmp_path, dispatcher={"drain_timeout": 0.1})
    await double.push(double.message("one two three"))
    await double.wait_for(lambda: double.cards)
    await env.client.close()
    store = SqliteStore(db(tmp_path))  # its message is no longer pending (answered elsewhere, say)
    await store.open()
    for message in await store.inbox_pending():
        await store.inbox_done(message)
    await store.close()

    env = await card_gateway(aiohttp_server, gateway, url, double, tmp_path)
    await double.wait_for(lambda: only_card(double).finished)
    assert only_card(double).text == INTERRUPTED and double.open_cards() == []
    assert double.session_posts == [] and len(model.requests) == 1


@pytest.mark.redis
async def test_on_a_shared_store_only_cards_no_instance_can_still_be_filling_are_finished(
    aiohttp_server: Any, gateway: Any, redis_url: str
) -> None:
    """Another instance may be streaming into a card recorded in a shared Redis: a card is closed
    with the notice only once it is older than any answer can take."""
    double = DingTalkDouble()
    store = RedisStore(redis_url)
    await store.open()
    old, young = "botgate-old", "botgate-young"
    for track, opened_at in ((old, time.time() - 3600), (young, time.time())):
        double.cards[track] = AICard(track, {}, True, {"flowStatus": "2", "msgContent": "partial"})
        await store.card_open(CardRecord("dingtalk", "default", track, msg(1, track), opened_at=opened_at))
    await store.close()
    sections = {"store": {"url": redis_url}}
    env = await start(aiohttp_server, gateway, double=double, card_template_id="tpl", sections=sections)
    await double.wait_for(lambda: double.cards[old].finished)
    assert double.cards[old].text == INTERRUPTED
    assert double.open_cards() == [double.cards[young]]  # perhaps still being filled elsewhere
    await env.client.close()
    store = RedisStore(redis_url)
    await store.open()
    assert [r.card_id for r in await store.cards_open()] == [young]
    await store.close()
