"""Floods (docs/security.md, "Fairness and floods"): limits on by default, a per-conversation limit,
one sender filling the queue cannot make everyone else "busy", and long messages are cut."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from gateway.config import LimitsConfig, build
from gateway.dispatcher import BUSY_NOTICE
from gateway.i18n import translator
from gateway.keys import DISPATCHER
from gateway.steps import CONVERSATION_LIMITED, TRUNCATED_MARK, TRUNCATED_NOTE
from tests.helpers import hello, start

ZH = translator("zh-CN")  # the default on DingTalk, and in a web chat whose browser names no language


def test_rate_limits_and_the_length_cap_are_on_by_default() -> None:
    assert build({}, env={}).limits == LimitsConfig(
        per_user_per_minute=20, per_conversation_per_minute=30, max_message_chars=8000
    )


async def test_a_group_is_limited_as_a_whole(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    """Many members flooding one group together: each is under the per-user limit, the group is
    not under its own."""
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, sections={"limits": {"per_conversation_per_minute": 2}})
    for n, member in enumerate(("a1", "b2", "c3")):
        body = env.double.message(f"question {n}", group=True, conversation_id="cid-flood", staff_id=member)
        await env.double.push(body)
        await env.answers(n + 1)
    texts = [p["markdown"]["text"] for p in env.double.session_posts]
    assert texts[-1] == f"@c3 {ZH(CONVERSATION_LIMITED)}"
    assert len(model.requests) == 2


async def test_one_flooding_sender_cannot_make_everyone_else_busy(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    """One web chat client floods a queue of 20 while the model is slow (one answer at a time).
    Past half the queue it is the flooder who is told "busy": the DingTalk user who writes next is
    queued and answered."""
    model, url = openai_double
    model.hold = True
    env = await start(
        aiohttp_server,
        gateway,
        model_url=url,
        sections={"dispatcher": {"max_queue": 20, "max_concurrency": 1}, "limits": {"per_user_per_minute": 0}},
    )
    async with env.client.ws_connect("/chat/ws") as ws:
        await hello(ws)
        await ws.send_json({"type": "message", "id": "m0", "text": "flood 0"})
        assert (await ws.receive_json())["type"] == "accepted"
        await model.wait_requests(1)  # m0 is being answered: the rest queue behind it
        for n in range(1, 25):
            await ws.send_json({"type": "message", "id": f"m{n}", "text": f"flood {n}"})
        admissions: list[dict[str, Any]] = []
        notices: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while len(admissions) < 24 or len(notices) < 14:
                frame = await ws.receive_json()
                (notices if frame["type"] == "notice" else admissions).append(frame)
        assert [f["type"] for f in admissions] == ["accepted"] * 10 + ["busy"] * 14  # half the queue, then busy
        assert {f["text"] for f in notices} == {ZH(BUSY_NOTICE)}
        frame_id = await env.double.push(env.double.message("may I?", staff_id="legit"))
        await env.double.wait_acked(frame_id)
        model.release()
        [answer] = await env.answers(1)
        assert answer["markdown"]["text"] == "echo: may I?" != ZH(BUSY_NOTICE)
        await env.client.app[DISPATCHER].wait_idle()


async def test_a_long_message_is_cut_and_the_user_told(aiohttp_server: Any, gateway: Any, openai_double: Any) -> None:
    model, url = openai_double
    model.answer = "a short answer"
    env = await start(aiohttp_server, gateway, model_url=url)
    await env.double.push(env.double.message("y" * 1_000_000, staff_id="u1"))
    [answer] = await env.answers(1)
    assert answer["markdown"]["text"] == ZH(TRUNCATED_NOTE, limit=8000) + "\n\na short answer"
    asked = model.requests[-1]["messages"][-1]["content"]
    assert asked == "y" * 8000 + "\n\n" + ZH(TRUNCATED_MARK, limit=8000)
    await env.double.push(env.double.message("and now?", staff_id="u1"))
    await env.answers(2)
    remembered = model.requests[-1]["messages"][1]["content"]
    assert remembered == "y" * 8000  # the context keeps the cut text, not a megabyte
    body = orjson.dumps(model.requests[-1])
    assert len(body) < 20_000
