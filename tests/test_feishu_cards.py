"""Feishu CardKit cards in every failure order: exactly one complete visible answer per message,
and no card left "generating" — against the Feishu double's CardKit (tests/doubles/feishu.py),
which refuses a sequence number not above every earlier one, closes a card's streaming by itself
(200850, then 300309), and fails the way Feishu does: throttled, 5xx, refused, answers lost after
the call took effect. Restarts are real: the gateway stops and a new one starts on the same SQLite
file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.keys import CHANNELS, DISPATCHER
from gateway.store import SqliteStore
from handlers.feishu import FeishuAdapter
from handlers.feishu.render import streaming_card
from tests.doubles import feishu as fd
from tests.doubles.feishu import Card, FeishuDouble
from tests.doubles.feishu_events import BOT_OPEN_ID, mention, message_event
from tests.doubles.openai import OpenAIDouble

ANSWER = " ".join(f"w{i}" for i in range(20))
INTERRUPTED = "回答被中断了，请重新提问。"  # on Feishu, in Chinese by default
BOT = mention("@_user_1", BOT_OPEN_ID, "Bot")
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def feishu(aiohttp_server: Callable[..., Any]) -> tuple[FeishuDouble, str]:
    return await fd.start(aiohttp_server)


def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "botgate.sqlite3"


@pytest.fixture
def run(
    feishu: tuple[FeishuDouble, str], openai_double: tuple[OpenAIDouble, str], gateway: Any, tmp_path: Path
) -> Callable[..., Any]:
    """Start a gateway streaming into cards (every update at once), its state in a SQLite file."""

    async def start(**sections: Any) -> Client:
        double, domain = feishu
        store = {"url": f"sqlite:///{db(tmp_path)}"}
        client: Client = await gateway(
            fd.config(domain, openai_double[1], feishu={"stream_interval": 0.0}, store=store, **sections)
        )
        await double.wait_for(lambda: double.pings >= 1)
        return client

    return start


def only_card(double: FeishuDouble, message_id: str) -> Card:
    [card] = [double.card_of(r) for r in double.replies_to(message_id) if r.content.get("type") == "card"]
    return card


def sequences(card: Card) -> list[int]:
    return sorted([s for s, _ in card.contents] + [s for s, _ in card.settings])


async def recorded(tmp_path: Path) -> list[str | None]:
    store = SqliteStore(db(tmp_path))
    await store.open()
    try:
        return [r.text for r in await store.cards_open()]
    finally:
        await store.close()


@pytest.mark.parametrize("fault", ["busy", "throttled", "lost"])
async def test_card_calls_failing_transiently_are_retried_each_with_the_next_sequence(
    run: Any, feishu: Any, openai_double: Any, fault: str
) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.answer = ANSWER
    double.card_faults = {"create": [fault], "content": [fault, fault], "settings": [fault]}
    double.fail_replies = 1  # the reply carrying the card too (its uuid makes the retry safe)
    client = await run()
    await double.push_event(message_event("stream it", message_id="om_r"))
    await double.wait_for(lambda: double.answer("om_r") is not None)
    await client.app[DISPATCHER].wait_idle()
    [reply] = double.replies_to("om_r")
    card = double.card_of(reply)
    assert double.shown(reply) == ANSWER and double.open_cards() == []
    assert len(card.contents) >= 3  # streaming went on after the failures, it did not give up
    assert double.rejected == []  # no retry reused a sequence number (a lost answer's would be refused)
    assert sequences(card) == sorted(set(sequences(card)))


async def test_the_answer_closes_its_card_even_after_streaming_broke(
    run: Any, feishu: Any, openai_double: Any
) -> None:
    """Updates fail for a while (longer than the retries): the final text still goes into the card."""
    double, _ = feishu
    model, _ = openai_double
    model.answer = ANSWER
    double.card_faults = {"content": ["busy"] * 4}  # one update's every attempt
    client = await run()
    await double.push_event(message_event("stream it", message_id="om_b"))
    await double.wait_for(lambda: double.answer("om_b") is not None)
    await client.app[DISPATCHER].wait_idle()
    [reply] = double.replies_to("om_b")  # the card alone: no second answer next to it
    assert double.shown(reply) == ANSWER and double.open_cards() == []


async def test_a_card_feishu_closed_itself_keeps_its_text_and_the_rest_follows_as_a_reply(
    run: Any, feishu: Any, openai_double: Any
) -> None:
    """CardKit ends streaming after about 10 minutes (here: at once): 200850, then 300309."""
    double, _ = feishu
    model, _ = openai_double
    model.answer = ANSWER
    double.streaming_lifetime = 0.0
    client = await run()
    await double.push_event(message_event("stream it", message_id="om_t"))
    await double.wait_for(lambda: double.answer("om_t") is not None and len(double.replies_to("om_t")) == 2)
    await client.app[DISPATCHER].wait_idle()
    card_reply, rest = double.replies_to("om_t")
    card = double.card_of(card_reply)
    assert card.closed == "timeout" and double.shown(card_reply) == "w0"
    assert double.shown(rest) == "…" + ANSWER.removeprefix("w0")  # together: the answer, once
    assert card.contents == [] and card.settings == []  # nothing more was pushed into the closed card
    # The card path ended at once: the update that met the close, the final text, nothing more.
    calls = [(kind, outcome) for kind, _, outcome in double.card_attempts if kind != "create"]
    assert calls == [("content", "200850"), ("content", "300309")]
    assert double.open_cards() == []


async def test_a_failed_close_after_the_final_text_sends_nothing_again_and_is_retried_on_restart(
    run: Any, feishu: Any, openai_double: Any, tmp_path: Path
) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.answer = " ".join(f"w{i}" for i in range(150))  # more card updates than one recorded block
    double.fail_card = "settings"
    client = await run()
    await double.push_event(message_event("stream it", message_id="om_c"))
    await double.wait_for(lambda: any(k == "settings" and o == "failed" for k, _, o in double.card_attempts))
    await client.app[DISPATCHER].wait_idle()
    [reply] = double.replies_to("om_c")
    card = double.card_of(reply)
    assert card.text == model.answer and double.open_cards() == [card]  # the answer, still "generating"
    assert card.last_sequence > 100
    await client.close()
    assert await recorded(tmp_path) == [model.answer]

    double.fail_card = ""
    client = await run()
    await double.wait_for(lambda: double.open_cards() == [])
    assert double.shown(reply) == model.answer and double.replies_to("om_c") == [reply]
    assert double.rejected == []  # the new process's sequence numbers went on above the old ones
    await client.close()
    assert await recorded(tmp_path) == []


async def test_mentions_in_streamed_text_are_defused(run: Any, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.answer = "Hello <at id=all></at> and <at user_id=\"ou_x\">X</at>, " + ANSWER
    client = await run()
    event = message_event("ping everyone", message_id="om_at", chat_type="group", mentions=[BOT])
    await double.push_event(event)
    await double.wait_for(lambda: double.answer("om_at") is not None)
    await client.app[DISPATCHER].wait_idle()
    card = only_card(double, "om_at")
    mention, *_, created = card.card["body"]["elements"]  # the one live mention: ours, of the asker
    assert mention["content"] == "<at id=ou_user></at>"
    sent = [str(created["content"])] + [text for _, text in card.contents]
    assert len(sent) >= 3 and all("<at" not in text.lower() for text in sent), sent
    assert "&lt;at id=all>" in card.text


async def test_the_card_api_defuses_mentions_itself(run: Any, feishu: Any) -> None:
    """Whatever text reaches it, the CardKit client never sends a live `<at>`."""
    double, _ = feishu
    client = await run()
    adapter = client.app[CHANNELS]["feishu/default"]
    assert isinstance(adapter, FeishuAdapter)
    api = adapter.runtime.api
    card_id = await api.create_card(streaming_card("<at id=all></at> first"))
    await api.set_card_text(card_id, 'all of you: <at id=all></at> <AT user_id="ou_x"></at>', 1)
    sent = [str(double.cards[card_id].card["body"]["elements"][0]["content"]), double.cards[card_id].contents[-1][1]]
    assert all("<at" not in text.lower() for text in sent), sent


async def test_a_card_cut_off_by_a_restart_is_taken_over_with_its_sequence_going_on(
    run: Any, feishu: Any, openai_double: Any, tmp_path: Path
) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.script = ["stall"]  # the first answer stops after its first word, until the restart
    client = await run(dispatcher={"drain_timeout": 0.1})
    await double.push_event(message_event("one two three", message_id="om_x"))
    await double.wait_for(lambda: double.replies_to("om_x"))
    await client.close()  # drain times out: the answer is cut off, its message stays in the inbox
    assert double.open_cards() and double.answer("om_x") is None

    client = await run()
    await double.wait_for(lambda: double.answer("om_x") is not None)
    await client.app[DISPATCHER].wait_idle()
    [reply] = double.replies_to("om_x")  # the same card: no second one
    assert double.shown(reply) == "echo: one two three" and double.open_cards() == []
    assert double.rejected == [] and len(double.cards) == 1
    await client.close()
    assert await recorded(tmp_path) == []


async def test_a_card_whose_message_is_gone_gets_the_interrupted_notice_on_restart(
    run: Any, feishu: Any, openai_double: Any, tmp_path: Path
) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.script = ["stall"]
    client = await run(dispatcher={"drain_timeout": 0.1})
    await double.push_event(message_event("one two three", message_id="om_g"))
    await double.wait_for(lambda: double.replies_to("om_g"))
    await client.close()
    store = SqliteStore(db(tmp_path))  # its message is no longer pending (answered elsewhere, say)
    await store.open()
    for message in await store.inbox_pending():
        await store.inbox_done(message)
    await store.close()

    client = await run()
    await double.wait_for(lambda: double.answer("om_g") is not None)
    [reply] = double.replies_to("om_g")
    assert double.shown(reply) == INTERRUPTED and double.open_cards() == []
    assert double.rejected == [] and len(model.requests) == 1
