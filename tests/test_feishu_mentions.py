"""Group etiquette on Feishu: an answer in a group @mentions the asker with an element of its own
(the answer's text is defused, so no mention can come from the model), in a streaming card, a
plain card and a post; a DM has none. On the Feishu and OpenAI doubles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.keys import CHANNELS, DISPATCHER
from handlers.feishu.adapter import FeishuAdapter
from tests.doubles import feishu as fd
from tests.doubles.feishu import FeishuDouble
from tests.doubles.feishu_events import BOT_OPEN_ID, mention, message_event
from tests.doubles.openai import OpenAIDouble

Client = TestClient[web.Request, web.Application]
Start = Callable[..., Any]
BOT = mention("@_user_1", BOT_OPEN_ID, "botgate")
TABLE = "| a | b |\n|---|---|\n| 1 | 2 |"


@pytest.fixture
async def feishu(aiohttp_server: Callable[..., Any]) -> tuple[FeishuDouble, str]:
    return await fd.start(aiohttp_server)


@pytest.fixture
def start(feishu: tuple[FeishuDouble, str], openai_double: tuple[OpenAIDouble, str], gateway: Start) -> Start:
    async def run(*, cards: bool = True) -> Client:
        """A gateway on the doubles; `cards=False`: its API budget 80 % used (on /help answers in
        a DM), the state in which Feishu answers without a streaming card."""
        double, domain = feishu
        sections: dict[str, Any] = {} if cards else {"feishu": {"monthly_api_budget": 10}}
        client: Client = await gateway(fd.config(domain, openai_double[1], **sections))
        await double.wait_for(lambda: double.pings >= 1)
        adapter = client.app[CHANNELS]["feishu/default"]
        assert isinstance(adapter, FeishuAdapter)
        for n in range(0 if cards else 10):  # bounded: one billable reply each
            if adapter.budget.degraded:
                break
            await double.push_event(message_event("/help", message_id=f"om_help{n}", sender="ou_admin"))
            await double.wait_for(lambda n=n: double.answer(f"om_help{n}") is not None)  # type: ignore[misc]
        assert cards or (adapter.budget.degraded and not adapter.budget.spent)
        return client

    return run


def group_question(text: str, message_id: str, sender: str = "ou_asker") -> dict[str, Any]:
    return message_event(f"@_user_1 {text}", message_id=message_id, chat_type="group", mentions=[BOT], sender=sender)


async def test_streaming_card_in_a_group_mentions_the_asker(start: Start, feishu: Any) -> None:
    double, _ = feishu
    client = await start()
    await double.push_event(group_question("hello", "om_g"))
    await double.wait_for(lambda: double.answer("om_g") is not None)
    await double.push_event(message_event("hello", message_id="om_dm", sender="ou_asker"))
    await double.wait_for(lambda: double.answer("om_dm") is not None)
    await client.app[DISPATCHER].wait_idle()
    (group,) = double.replies_to("om_g")
    assert group.content.get("type") == "card" and double.mentioned(group) == ["ou_asker"]
    assert "<at" not in (double.answer("om_g") or "<at")  # the mention is apart from the answer
    (dm,) = double.replies_to("om_dm")
    assert dm.content.get("type") == "card" and double.mentioned(dm) == []


async def test_plain_card_in_a_group_mentions_the_asker(start: Start, feishu: Any) -> None:
    double, _ = feishu
    client = await start(cards=False)
    await double.push_event(group_question("hello", "om_g"))
    await double.wait_for(lambda: double.answer("om_g") is not None)
    await client.app[DISPATCHER].wait_idle()
    (reply,) = double.replies_to("om_g")
    assert reply.msg_type == "interactive" and reply.content.get("type") != "card"
    assert reply.content["body"]["elements"][0] == {
        "tag": "markdown",
        "element_id": "mention",
        "content": "<at id=ou_asker></at>",
    }
    assert double.mentioned(reply) == ["ou_asker"] and "<at" not in (double.answer("om_g") or "<at")


async def test_post_in_a_group_mentions_the_asker_and_a_dm_post_does_not(
    start: Start, feishu: Any, openai_double: Any
) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.answer = "\n\n".join(f"Table {i}:\n\n{TABLE}" for i in range(6))  # more than a card holds: a post
    client = await start(cards=False)
    await double.push_event(group_question("tables", "om_g"))
    await double.wait_for(lambda: double.answer("om_g") is not None)
    await double.push_event(message_event("tables", message_id="om_dm", sender="ou_asker"))
    await double.wait_for(lambda: double.answer("om_dm") is not None)
    await client.app[DISPATCHER].wait_idle()
    (group,) = double.replies_to("om_g")
    assert group.msg_type == "post"
    assert group.content["zh_cn"]["content"][0] == [{"tag": "at", "user_id": "ou_asker"}]
    (dm,) = double.replies_to("om_dm")
    assert dm.msg_type == "post" and double.mentioned(dm) == []


async def test_model_text_cannot_mention_anyone(start: Start, feishu: Any, openai_double: Any) -> None:
    double, _ = feishu
    model, _ = openai_double
    model.answer = "<at id=all></at> hi"
    client = await start(cards=False)
    await double.push_event(group_question("ping all", "om_g", sender="ou_asker"))
    await double.wait_for(lambda: double.answer("om_g") is not None)
    await client.app[DISPATCHER].wait_idle()
    (reply,) = double.replies_to("om_g")
    assert double.mentioned(reply) == ["ou_asker"]  # ours only; the model's is defused
    assert double.answer("om_g") == "&lt;at id=all>&lt;/at> hi"
