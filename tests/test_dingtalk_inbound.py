"""DingTalk message types beyond text, end to end: the double's Stream frame through the gateway to
the model, which must see the text extracted from the payload, not a "can't read" notice."""

from __future__ import annotations

from typing import Any

import orjson

from tests.helpers import start


async def test_group_chat_history_with_another_persons_mention_reaches_the_model(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    double = env.double
    records = [{"senderNick": "Ann", "content": "deploy failed"}, {"senderNick": "Bo", "content": "rolling back"}]
    history = double.message(
        msgtype="chatRecord", content={"summary": "Ann: deploy failed", "chatRecord": orjson.dumps(records).decode()}
    )
    question = double.message("@Bob\u2005what did Ann say?", group=True)
    question["atUsers"].append({"dingtalkId": "$:LWCP_v1:$bob", "staffId": "bob"})
    for body in (history, question):
        frame = await double.push(body)
        await double.wait_acked(frame)
    await env.answers(2)
    # Two conversations, answered in either order; a group turn may name its speaker first.
    group, dm = sorted(model.requests, key=lambda request: "Forwarded" in str(request["messages"]))
    assert dm["messages"][-1]["content"] == (
        "[Forwarded chat history]\nAnn: deploy failed\nAnn: deploy failed\nBo: rolling back"
    )
    asked = group["messages"][-1]["content"]
    assert asked.endswith("@Bob what did Ann say?") and "@Bob" not in asked.removesuffix("@Bob what did Ann say?")
