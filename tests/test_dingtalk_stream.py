"""DingTalk Stream mode end to end: frames from the double through the gateway to the model and back."""

from __future__ import annotations

from typing import Any

from tests.dingtalk_support import start


async def test_dm_text_answered_on_session_webhook(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    body = env.double.message("what is botgate?")
    frame_id = await env.double.push(body)
    [answer] = await env.answers(1)
    assert answer["msgtype"] == "markdown"
    assert answer["markdown"]["text"] == "echo: what is botgate?"
    assert answer["session"] in body["sessionWebhook"]
    ack = env.double.acked(frame_id)
    assert ack is not None and ack.code == 200
    assert env.double.ack_errors == []
    assert model.requests[0]["messages"][-1]["content"] == "what is botgate?"
