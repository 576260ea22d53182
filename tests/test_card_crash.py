"""`kill -9` while an answer streams into a card, then a restart on the same state: the card is
finished, once, by the resumed answer of its message (the same card: DingTalk's `outTrackId`, Feishu's
card with CardKit sequence numbers going on above the old process's), and no second answer appears.

The gateway is a real `python run.py` process; the platform and model doubles run in the test
process. Either the model stops after its first word (the card shows it, "typing"), or the call
that marks the finished card as finished hangs (the card holds the answer, not yet closed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.doubles import feishu as fd
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu_events import APP_ID, message_event
from tests.doubles.openai import OpenAIDouble
from tests.helpers import dingtalk_section, serve
from tests.process import GatewayProcess, env_for

Spawn = Callable[..., GatewayProcess]


def common(model_url: str, tmp_path: Path) -> dict[str, dict[str, object]]:
    return {
        "model": {"base_url": model_url, "max_retries": 0},
        "store": {"url": f"sqlite:///{tmp_path}/state/botgate.sqlite3"},
        "cache": {"enabled": False},
    }


async def started(spawn: Spawn, env: dict[str, str]) -> GatewayProcess:
    gateway = spawn(env=env, start=False)
    await asyncio.to_thread(gateway.start)  # the doubles it talks to run in this loop
    return gateway


@pytest.mark.parametrize("cut", ["mid-stream", "before the status update"])
async def test_dingtalk_card_open_at_kill_9_is_finished_after_restart(
    aiohttp_server: Any, openai_double: tuple[OpenAIDouble, str], spawn_gateway: Spawn, tmp_path: Path, cut: str
) -> None:
    double = DingTalkDouble()
    await serve(aiohttp_server, double)
    model, model_url = openai_double
    if cut == "mid-stream":
        model.script = ["stall"]
    else:
        double.stall = "update"
    section = {**dingtalk_section(double), "card_template_id": "tpl-ai.schema", "stream_interval": 0.0}
    env = env_for({"dingtalk": section, **common(model_url, tmp_path)})
    gateway = await started(spawn_gateway, env)
    await double.wait_for(lambda: double.connected, timeout=15)
    await double.push(double.message("one two three"))
    if cut == "mid-stream":
        await double.wait_for(lambda: double.cards)
    else:
        await double.wait_for(lambda: double.stalled == 1)
    gateway.kill()
    [card] = double.cards.values()
    assert double.open_cards() == [card]
    assert card.text == ("echo:" if cut == "mid-stream" else "echo: one two three")
    double.release_stalled()

    gateway = await started(spawn_gateway, env)
    await double.wait_for(lambda: card.finished, timeout=15)
    assert await asyncio.to_thread(gateway.stop) == 0
    assert list(double.cards.values()) == [card]  # the same card, taken over: no second one
    assert card.text == "echo: one two three" and double.open_cards() == []
    assert double.session_posts == [] and double.calls("/v1.0/robot/oToMessages/batchSend") == []
    assert [a for a in double.card_attempts if a[2] == "after finalize"] == []


@pytest.mark.parametrize("cut", ["mid-stream", "before the close"])
async def test_feishu_card_open_at_kill_9_is_finished_after_restart(
    aiohttp_server: Any, openai_double: tuple[OpenAIDouble, str], spawn_gateway: Spawn, tmp_path: Path, cut: str
) -> None:
    double, domain = await fd.start(aiohttp_server)
    model, model_url = openai_double
    if cut == "mid-stream":
        model.script = ["stall"]
    else:
        double.stall = "settings"
    section = {
        "enabled": True,
        "app_id": APP_ID,
        "app_secret": fd.APP_SECRET,
        "domain": domain,
        "verification_token": "vtoken",
        "stream_interval": 0.0,
    }
    env = env_for({"feishu": section, **common(model_url, tmp_path)})
    gateway = await started(spawn_gateway, env)
    await double.push_event(message_event("one two three", message_id="om_k"))
    if cut == "mid-stream":
        await double.wait_for(lambda: double.replies_to("om_k"))
    else:
        await double.wait_for(lambda: double.stalled == 1)
    gateway.kill()
    [reply] = double.replies_to("om_k")
    card = double.card_of(reply)
    assert double.open_cards() == [card]
    double.release_stalled()

    gateway = await started(spawn_gateway, env)
    await double.wait_for(lambda: double.open_cards() == [], timeout=15)
    assert await asyncio.to_thread(gateway.stop) == 0
    assert double.replies_to("om_k") == [reply] and len(double.cards) == 1  # the same card, once
    assert double.shown(reply) == "echo: one two three"
    assert double.rejected == []  # the restarted process's sequence numbers went on above the old ones
