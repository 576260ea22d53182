"""A config reload changes agents, routes and which agent a bot uses without a restart; a bot's
credentials wait for one, and the reload report says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from gateway.config import load
from gateway.keys import DISPATCHER
from tests.doubles.dingtalk import DingTalkDouble
from tests.helpers import serve
from tests.test_bots import model


def bot_table(double: DingTalkDouble, name: str, agent: str, secret: str) -> str:
    return f"""
[[dingtalk.bots]]
name = "{name}"
client_id = "{double.client_id}"
client_secret = "{secret}"
api_base = "{double.base}"
oapi_base = "{double.base}"
reconnect_delay = 0.05
agent = "{agent}"
"""


def agent_table(name: str, url: str, prompt: str) -> str:
    return f"""
[[agents]]
name = "{name}"
provider = "openai"
base_url = "{url}"
system_prompt = "{prompt}"
max_retries = 0
"""


async def answer(double: DingTalkDouble, text: str, **message: Any) -> str:
    """Push `text` to the robot and return the reply it posts to the sessionWebhook."""
    before = len(double.session_posts)
    await double.push(double.message(text, **message))
    await double.wait_for(lambda: len(double.session_posts) > before)
    return orjson.dumps(double.session_posts[before]).decode()


async def test_reload_applies_agents_routes_and_bot_agents_live(
    aiohttp_server: Any, gateway: Any, tmp_path: Path
) -> None:
    hr_ding = DingTalkDouble(client_id="ding-hr", client_secret="hr-secret")
    it_ding = DingTalkDouble(client_id="ding-it", client_secret="it-secret")
    for double in (hr_ding, it_ding):
        await serve(aiohttp_server, double)
    hr, hr_url = await model(aiohttp_server, "HR answer")
    it, it_url = await model(aiohttp_server, "IT answer")
    finance, finance_url = await model(aiohttp_server, "finance answer")
    base = '[store]\nurl = "memory://"\n[cache]\nenabled = false\n'
    path = tmp_path / "config.toml"
    path.write_text(
        base
        + agent_table("hr", hr_url, "HR v1")
        + agent_table("it", it_url, "IT v1")
        + bot_table(hr_ding, "hrbot", "hr", "hr-secret")
        + bot_table(it_ding, "itbot", "it", "it-secret")
    )
    client = await gateway(load(path, env={}))
    for double in (hr_ding, it_ding):
        await double.wait_for(lambda d=double: d.connected)  # type: ignore[misc]
    assert "HR answer" in await answer(hr_ding, "请假", staff_id="u1")

    # hrbot now uses the IT agent, whose prompt changed; a new finance agent takes one group of
    # hrbot; itbot's secret changed (that needs a restart: it keeps running with the old one).
    path.write_text(
        base
        + agent_table("hr", hr_url, "HR v1")
        + agent_table("it", it_url, "IT v2")
        + agent_table("finance", finance_url, "finance v1")
        + bot_table(hr_ding, "hrbot", "it", "hr-secret")
        + bot_table(it_ding, "itbot", "it", "rotated-secret")
        + '\n[[routes]]\nbot = "hrbot"\nconversation = "cidFIN"\nagent = "finance"\n'
    )
    resp = await client.post("/api/reload")
    report = await resp.json()
    assert resp.status == 200, report
    assert report["applied"] == ["agents", "bots.agent", "routes"]
    assert report["needs_restart"] == ["bots"]
    assert "rotated-secret" not in orjson.dumps(report).decode()

    assert "IT answer" in await answer(hr_ding, "VPN?", staff_id="u2")
    assert it.requests[-1]["messages"][0]["content"].startswith("IT v2")
    assert "finance answer" in await answer(hr_ding, "budget?", group=True, conversation_id="cidFIN")
    assert finance.requests[-1]["messages"][0]["content"].startswith("finance v1")
    # itbot still runs on the credentials it started with, with its (unchanged) agent.
    assert "IT answer" in await answer(it_ding, "printer?", staff_id="u3")
    assert it_ding.connected
    await client.app[DISPATCHER].wait_idle()
    assert len(hr.requests) == 1 and len(finance.requests) == 1 and len(it.requests) == 2

    # Nothing changed: nothing applied, the pending restart still reported.
    resp = await client.post("/api/reload")
    assert (await resp.json()) == {"source": str(path), "applied": [], "needs_restart": ["bots"]}


async def test_a_reload_that_names_an_unknown_agent_is_refused(
    aiohttp_server: Any, gateway: Any, tmp_path: Path
) -> None:
    ding = DingTalkDouble()
    await serve(aiohttp_server, ding)
    _, url = await model(aiohttp_server, "HR answer")
    path = tmp_path / "config.toml"
    config = '[store]\nurl = "memory://"\n' + agent_table("hr", url, "HR") + bot_table(
        ding, "hrbot", "hr", ding.client_secret
    )
    path.write_text(config)
    client = await gateway(load(path, env={}))
    await ding.wait_for(lambda: ding.connected)
    path.write_text(config.replace('agent = "hr"', 'agent = "payroll"'))
    resp = await client.post("/api/reload")
    body = await resp.json()
    assert resp.status == 400
    assert "dingtalk.bots[hrbot]" in body["error"] and "payroll" in body["error"]
    assert "HR answer" in await answer(ding, "还在吗")

