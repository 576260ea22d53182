"""Several bots, seen from the operator's side, against the doubles: the status page's row per bot,
the admin API's bots and agents, the per-bot reconnect, a Feishu bot's own webhook, the per-bot
`botgate_channel_connected` series, `doctor` checking every bot, and the masked config dump."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import handlers
from gateway import doctor
from gateway.adapter import Adapter
from gateway.channel import ChannelState
from gateway.config import Config, build, masked
from gateway.keys import CHANNELS, DISPATCHER
from handlers.feishu.webhook import signature
from tests.doubles import feishu as fd
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu_events import APP_ID, message_event
from tests.doubles.openai import OpenAIDouble
from tests.helpers import serve

Client = TestClient[web.Request, web.Application]

HR_KEY = "sk-hr-agent-key-0123456789"
IT_PASSWORD = "it-proxy-pass-9876"  # in the IT agent's base_url: never called in these tests
ENCRYPT_KEY = "feishu-it-encrypt-key"
TOKEN = "vtoken"  # the verification token the Feishu double's events carry
SECRETS = ("hr-secret", "it-secret", fd.APP_SECRET, HR_KEY, IT_PASSWORD, ENCRYPT_KEY)


class Bots:
    """Two DingTalk doubles (hrbot, itbot), one Feishu double (itbot), a model double for the hr
    agent; the it agent points at a base_url with a password in it (echo, never called)."""

    def __init__(self) -> None:
        self.hr_ding = DingTalkDouble(client_id="ding-hr", client_secret="hr-secret")
        self.it_ding = DingTalkDouble(client_id="ding-it", client_secret="it-secret")
        self.model = OpenAIDouble(answer="HR answer")
        self.model_url = ""
        self.feishu, self.domain = fd.FeishuDouble(), ""

    async def serve(self, aiohttp_server: Callable[..., Any]) -> None:
        await serve(aiohttp_server, self.hr_ding)
        await serve(aiohttp_server, self.it_ding)
        server = await aiohttp_server(self.model.app(), host="127.0.0.1")
        self.model_url = str(server.make_url("/v1"))
        self.feishu, self.domain = await fd.start(aiohttp_server)

    def ding(self, double: DingTalkDouble, name: str, agent: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "client_id": double.client_id,
            "client_secret": double.client_secret,
            "api_base": double.base,
            "oapi_base": double.base,
            "reconnect_delay": 0.05,
            "agent": agent,
            **extra,
        }

    def config(self, it_secret: str = "it-secret", feishu_mode: str = "ws") -> Config:
        data: dict[str, Any] = {
            "store": {"url": "memory://"},
            "cache": {"enabled": False},
            "agents": [
                {"name": "hr", "provider": "openai", "base_url": self.model_url, "api_keys": [HR_KEY]},
                {
                    "name": "it",
                    "provider": "echo",
                    "base_url": f"http://gw:{IT_PASSWORD}@127.0.0.1:9/v1",
                    "group_context": "per_user",
                },
            ],
            "dingtalk": {
                "bots": [
                    self.ding(self.hr_ding, "hrbot", "hr"),
                    self.ding(self.it_ding, "itbot", "it", client_secret=it_secret),
                    {"name": "oldbot", "enabled": False},
                ]
            },
            "feishu": {
                "bots": [
                    {
                        "name": "itbot",
                        "app_id": APP_ID,
                        "app_secret": fd.APP_SECRET,
                        "domain": self.domain,
                        "mode": feishu_mode,
                        "encrypt_key": ENCRYPT_KEY,
                        "verification_token": TOKEN,
                        "agent": "it",
                    }
                ]
            },
            "routes": [{"platform": "dingtalk", "bot": "hrbot", "conversation": "cidFIN", "agent": "it"}],
        }
        return build(data, env={}, source="<test>")

    async def connected(self) -> None:
        await self.hr_ding.wait_for(lambda: self.hr_ding.connected)
        await self.it_ding.wait_for(lambda: self.it_ding.connected)
        await self.feishu.wait_for(lambda: self.feishu.pings >= 1)


@pytest.fixture
async def bots(aiohttp_server: Callable[..., Any]) -> Bots:
    world = Bots()
    await world.serve(aiohttp_server)
    return world


def adapter(client: Client, key: str) -> Adapter[Any, Any]:
    channel = client.app[CHANNELS][key]
    assert isinstance(channel, Adapter)
    return channel


async def get_json(client: Client, path: str) -> Any:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    return orjson.loads(await resp.read())


def assert_no_secret(text: str, cfg: Config) -> None:
    for secret in (*SECRETS, *cfg.secrets()):
        assert secret not in text, secret


def row(html: str, row_id: str) -> str:
    """The text of one table row of the page, tags stripped."""
    found = re.search(rf'<tr id="{row_id}">(.*?)</tr>', html, re.S)
    assert found, row_id
    return " ".join(re.sub(r"<[^>]+>", " ", found.group(1)).split())


async def test_status_has_a_row_per_bot_with_its_agent_and_last_event(bots: Bots, gateway: Any) -> None:
    cfg = bots.config()
    client: Client = await gateway(cfg)
    await bots.connected()
    await bots.hr_ding.push(bots.hr_ding.message("请假怎么申请", staff_id="u1"))
    await bots.hr_ding.wait_for(lambda: len(bots.hr_ding.session_posts) >= 1)
    async with asyncio.timeout(10):
        await client.app[DISPATCHER].wait_idle()

    snapshot = await get_json(client, "/api/status")
    rows = {c["name"]: c for c in snapshot["channels"]}
    assert set(rows) == {"dingtalk/hrbot", "dingtalk/itbot", "feishu/itbot", "web", "wecom"}  # wecom: not configured
    hr, it, fs = rows["dingtalk/hrbot"], rows["dingtalk/itbot"], rows["feishu/itbot"]
    assert (hr["platform"], hr["bot"], hr["state"], hr["agent"]) == ("dingtalk", "hrbot", "connected", "hr")
    assert hr["routed"] == [{"conversation": "cidFIN", "agent": "it"}]
    assert hr["last_event_age"] is not None and it["last_event_age"] is None  # only hrbot had a message
    assert (it["platform"], it["bot"], it["state"], it["agent"], it["routed"]) == (
        "dingtalk",
        "itbot",
        "connected",
        "it",
        [],
    )
    assert (fs["platform"], fs["bot"], fs["state"], fs["agent"]) == ("feishu", "itbot", "connected", "it")

    page = await (await client.get("/", headers={"Accept-Language": "en"})).text()
    # Channel, state, agent (routes), connected since, reconnects, last event, note.
    since = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
    assert re.fullmatch(rf"dingtalk/hrbot \(stream\) connected hr \(cidFIN → it\) {since} 0 \d+ s ago — Reconnect",
                        row(page, "channel-dingtalk-hrbot"))  # fmt: skip
    assert re.fullmatch(
        rf"dingtalk/itbot \(stream\) connected it {since} 0 — — Reconnect", row(page, "channel-dingtalk-itbot")
    )
    assert re.fullmatch(rf"feishu/itbot \(ws\) connected it {since} 0 — — Reconnect", row(page, "channel-feishu-itbot"))
    assert_no_secret(page, cfg)

    # One connected series per running bot; the disabled one has none.
    text = await (await client.get("/metrics")).text()
    for series in (
        'botgate_channel_connected{bot="hrbot",platform="dingtalk"} 1.0',
        'botgate_channel_connected{bot="itbot",platform="dingtalk"} 1.0',
        'botgate_channel_connected{bot="itbot",platform="feishu"} 1.0',
        'botgate_channel_connected{bot="default",platform="web"} 1.0',
    ):
        assert series in text.splitlines(), series
    assert "oldbot" not in text
    assert len([line for line in text.splitlines() if line.startswith("botgate_channel_connected{")]) == 4


async def test_a_refused_bot_is_down_in_status_metrics_and_its_own_row(bots: Bots, gateway: Any) -> None:
    client: Client = await gateway(bots.config(it_secret="wrong secret"))
    await bots.hr_ding.wait_for(lambda: bots.hr_ding.connected)
    async with asyncio.timeout(10):
        down = await adapter(client, "dingtalk/itbot").tracker.wait_for(lambda s: bool(s.last_error))
    assert down.state is not ChannelState.CONNECTED
    text = await (await client.get("/metrics")).text()
    assert 'botgate_channel_connected{bot="itbot",platform="dingtalk"} 0.0' in text.splitlines()
    assert 'botgate_channel_connected{bot="hrbot",platform="dingtalk"} 1.0' in text.splitlines()
    listed = {b["key"]: b for b in (await get_json(client, "/api/bots"))["bots"]}
    assert listed["dingtalk/itbot"]["state"] == down.state.value and not listed["dingtalk/itbot"]["ready"]
    assert listed["dingtalk/itbot"]["last_error"]
    assert listed["dingtalk/hrbot"]["state"] == "connected" and listed["dingtalk/hrbot"]["ready"]
    assert_no_secret(orjson.dumps(listed).decode(), bots.config())


async def test_doctor_checks_every_bot_and_names_the_refused_one(bots: Bots) -> None:
    cfg = bots.config(it_secret="wrong secret")
    lines: list[str] = []
    code = await doctor.run(cfg, [handlers.doctor], lines.append)
    assert code == 1
    checks = {line[6:].split(": ", 1)[0]: line for line in lines[1:-1]}
    for key in ("dingtalk/hrbot", "dingtalk/itbot", "feishu/itbot"):
        assert f"{key} credentials" in checks, sorted(checks)
    assert not any("oldbot" in name for name in checks)  # disabled: nothing to check
    assert checks["dingtalk/hrbot credentials"].startswith("PASS")
    assert checks["feishu/itbot credentials"].startswith("PASS")
    refused = checks["dingtalk/itbot credentials"]
    assert refused.startswith("FAIL") and "refused the app credentials" in refused
    # The fix names the bot's own keys, not the [dingtalk] section's.
    assert "[[dingtalk.bots]] itbot client_id" in refused
    assert "BOTGATE_DINGTALK__BOTS__ITBOT__CLIENT_SECRET" in refused
    assert "BOTGATE_DINGTALK__CLIENT_SECRET" not in refused
    # Each agent's backend is checked too, its fix naming the agent's keys: hr answers; it echoes.
    assert checks["agent hr model"].startswith("PASS")
    echo = checks["agent it model"]
    assert echo.startswith("WARN") and "set [[agents]] it base_url (BOTGATE_AGENTS__IT__BASE_URL)" in echo
    failed = [name for name, line in checks.items() if line.startswith("FAIL")]
    assert failed and all(name.startswith("dingtalk/itbot ") for name in failed), failed
    assert_no_secret("\n".join(lines), cfg)
    assert "wrong secret" not in "\n".join(lines)


async def test_reconnect_route_reconnects_only_that_bot(bots: Bots, gateway: Any) -> None:
    client: Client = await gateway(bots.config())
    await bots.connected()
    assert (bots.hr_ding.connections, bots.it_ding.connections, bots.feishu.endpoint_calls) == (1, 1, 1)
    itbot = adapter(client, "dingtalk/itbot")

    resp = await client.post("/api/channels/dingtalk/itbot/reconnect")
    assert resp.status == 200
    body = await resp.json()
    assert (body["platform"], body["bot"]) == ("dingtalk", "itbot")
    await bots.it_ding.wait_for(lambda: bots.it_ding.connections >= 2)
    async with asyncio.timeout(10):
        await itbot.tracker.wait_for(lambda s: s.state is ChannelState.CONNECTED and s.reconnects == 1)
    assert (bots.hr_ding.connections, bots.feishu.endpoint_calls) == (1, 1)
    listed = {b["key"]: b["reconnects"] for b in (await get_json(client, "/api/bots"))["bots"]}
    assert listed == {"dingtalk/hrbot": 0, "dingtalk/itbot": 1, "dingtalk/oldbot": 0, "feishu/itbot": 0}

    missing = await client.post("/api/channels/dingtalk/nobot/reconnect")
    assert missing.status == 404
    body = await missing.json()
    assert "dingtalk/nobot" in body["error"] and "dingtalk/itbot" in body["channels"]


def feishu_signed(body: bytes, key: str) -> dict[str, str]:
    ts, nonce = str(int(time.time())), "nonce-bots"
    return {
        "X-Lark-Request-Timestamp": ts,
        "X-Lark-Request-Nonce": nonce,
        "X-Lark-Signature": signature(ts, nonce, key, body),
        "Content-Type": "application/json",
    }


async def test_feishu_bot_webhook_checks_its_own_signature_and_token(bots: Bots, gateway: Any) -> None:
    client: Client = await gateway(bots.config(feishu_mode="webhook"))
    path = "/feishu/webhook/itbot"
    event = message_event("over the bot's webhook", message_id="om_bot1")
    body = orjson.dumps(event)

    wrong_key = await client.post(path, data=body, headers=feishu_signed(body, "another bot's key"))
    assert (wrong_key.status, await wrong_key.json()) == (401, {"error": "unauthorized"})
    forged = orjson.dumps({**event, "header": {**event["header"], "token": "not-the-token"}})
    wrong_token = await client.post(path, data=forged, headers=feishu_signed(forged, ENCRYPT_KEY))
    assert (wrong_token.status, await wrong_token.json()) == (401, {"error": "unauthorized"})
    bare = await client.post("/feishu/webhook", data=body, headers=feishu_signed(body, ENCRYPT_KEY))
    assert bare.status == 404  # no default Feishu bot configured
    assert bots.feishu.replies == []

    right = await client.post(path, data=body, headers=feishu_signed(body, ENCRYPT_KEY))
    assert (right.status, await right.json()) == (200, {"msg": "success"})
    await bots.feishu.wait_for(lambda: bots.feishu.answer("om_bot1") is not None)
    answer = bots.feishu.answer("om_bot1") or ""
    assert "over the bot's webhook" in answer and "回声" in answer  # the it agent (echo, in Chinese)
    assert bots.feishu.endpoint_calls == 0  # webhook mode: no long connection
    listed = {b["key"]: b for b in (await get_json(client, "/api/bots"))["bots"]}
    assert listed["feishu/itbot"]["webhook"] == path and listed["feishu/itbot"]["mode"] == "webhook"
    async with asyncio.timeout(10):
        await client.app[DISPATCHER].wait_idle()


async def test_admin_api_lists_bots_and_agents_without_a_secret(
    bots: Bots, gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = bots.config()
    client: Client = await gateway(cfg)
    await bots.connected()
    caplog.set_level(logging.INFO, logger="botgate.audit")

    raw = await (await client.get("/api/bots")).text()
    assert_no_secret(raw, cfg)
    listed = orjson.loads(raw)["bots"]
    assert [b["key"] for b in listed] == ["dingtalk/hrbot", "dingtalk/itbot", "dingtalk/oldbot", "feishu/itbot"]
    hr, it, old, fs = listed
    assert {k: hr[k] for k in ("platform", "name", "agent", "state", "mode", "webhook", "enabled")} == {
        "platform": "dingtalk",
        "name": "hrbot",
        "agent": "hr",
        "state": "connected",
        "mode": "stream",
        "webhook": "",
        "enabled": True,
    }
    assert hr["routed"] == [{"conversation": "cidFIN", "agent": "it"}] and hr["last_event_at"] is None
    assert (it["agent"], it["state"], fs["agent"], fs["state"], fs["mode"]) == (
        "it",
        "connected",
        "it",
        "connected",
        "ws",
    )
    assert (old["enabled"], old["state"], old["ready"]) == (False, "disabled", False)

    raw = await (await client.get("/api/agents")).text()
    assert_no_secret(raw, cfg)
    agents = {a["name"]: a for a in orjson.loads(raw)["agents"]}
    assert list(agents) == ["default", "hr", "it"]
    assert agents["hr"] == {
        "name": "hr",
        "provider": "openai",
        "echo": False,
        "model": "gpt-4o-mini",
        "base_url": bots.model_url,
        "api_keys": 1,
        "group_context": "shared",
        "bots": ["dingtalk/hrbot"],
        "routes": [],
    }
    assert re.fullmatch(r"http://[^@]*\*\*\*@127\.0\.0\.1:9/v1", agents["it"]["base_url"]) and agents["it"]["echo"]
    assert agents["it"]["group_context"] == "per_user" and agents["it"]["bots"] == ["dingtalk/itbot", "feishu/itbot"]
    assert agents["it"]["routes"] == [{"index": 1, "platform": "dingtalk", "bot": "hrbot", "conversation": "cidFIN"}]
    assert agents["default"]["bots"] == ["dingtalk/oldbot"] and agents["default"]["echo"] is True  # no agent set

    audited = [r.getMessage() for r in caplog.records if r.name == "botgate.audit"]
    assert "audit: GET /api/bots ok" in audited and "audit: GET /api/agents ok" in audited
    async with aiohttp.ClientSession() as anonymous:  # no login: refused like every admin route
        for path in ("/api/bots", "/api/agents"):
            async with anonymous.get(client.make_url(path)) as resp:
                assert resp.status == 401


def test_masked_dump_hides_the_secrets_of_bots_and_agents() -> None:
    cfg = build(
        {
            "store": {"url": "redis://:store-pw-1234@127.0.0.1:6379/0"},
            "model": {"base_url": "http://u:model-pw-1234@127.0.0.1:1/v1"},
            "agents": [
                {"name": "hr", "base_url": "http://u:hr-pw-1234@127.0.0.1:2/v1", "api_keys": ["sk-hr-1", "sk-hr-2"]},
                {"name": "it"},
            ],
            "dingtalk": {
                "bots": [{"name": "hrbot", "client_id": "ding-hr", "client_secret": "ding-s3cret", "agent": "hr"}]
            },
            "feishu": {
                "encrypt_key": "inherited-encrypt-key",
                "bots": [
                    {
                        "name": "itbot",
                        "app_id": "cli_it",
                        "app_secret": "fs-s3cret",
                        "verification_token": "fs-token-1234",
                        "mode": "both",
                        "agent": "it",
                    }
                ],
            },
            "routes": [{"bot": "itbot", "conversation": "oc_fin", "agent": "hr"}],
        },
        env={},
        source="<test>",
    )
    dump = masked(cfg)
    text = orjson.dumps(dump).decode()
    secrets = cfg.secrets()
    for value in ("sk-hr-1", "sk-hr-2", "hr-pw-1234", "ding-s3cret", "fs-s3cret", "fs-token-1234",
                  "inherited-encrypt-key", "model-pw-1234", "store-pw-1234"):  # fmt: skip
        assert value in secrets, value  # so the logs mask it too
        assert value not in text, value
    hr, it = dump["agents"]
    assert (hr["name"], hr["api_keys"], hr["base_url"]) == ("hr", "***", "http://u:***@127.0.0.1:2/v1")
    assert (it["name"], it["api_keys"], it["group_context"]) == ("it", [], "shared")  # unset stays visibly unset
    ding, fs = dump["bots"]
    assert (ding["platform"], ding["name"], ding["agent"], ding["client_id"], ding["client_secret"]) == (
        "dingtalk", "hrbot", "hr", "ding-hr", "***"
    )  # fmt: skip
    assert (fs["platform"], fs["name"], fs["app_id"], fs["mode"]) == ("feishu", "itbot", "cli_it", "both")
    assert fs["app_secret"] == fs["encrypt_key"] == fs["verification_token"] == "***"
    assert dump["routes"] == [{"agent": "hr", "platform": "", "bot": "itbot", "conversation": "oc_fin"}]
    assert dump["model"]["base_url"] == "http://u:***@127.0.0.1:1/v1"
    assert dump["store"]["url"] == "redis://:***@127.0.0.1:6379/0"


async def test_status_page_shows_agents_bots_and_routes_as_tables(bots: Bots, gateway: Any) -> None:
    cfg = bots.config()
    client: Client = await gateway(cfg)
    page = await (await client.get("/", headers={"Accept-Language": "en"})).text()
    assert_no_secret(page, cfg)
    captions = re.findall(r"<caption>(.*?)</caption>", page)
    for caption in (
        "[dingtalk]",
        "[[agents]] hr",
        "[[agents]] it",
        "[[dingtalk.bots]] hrbot",
        "[[dingtalk.bots]] itbot",
        "[[dingtalk.bots]] oldbot",
        "[[feishu.bots]] itbot",
        "[[routes]] 1",
    ):
        assert caption in captions, captions
    hrbot = re.search(r'<table class="entry" id="config-bots-1">(.*?)</table>', page, re.S)
    assert hrbot and "<th>client_secret</th><td>***</td>" in hrbot.group(1)
    assert "<th>agent</th><td>hr</td>" in hrbot.group(1)
    hr_agent = re.search(r'<table class="entry" id="config-agents-1">(.*?)</table>', page, re.S)
    assert hr_agent and "<th>api_keys</th><td>***</td>" in hr_agent.group(1)
    snapshot = await get_json(client, "/api/status")
    assert [b["name"] for b in snapshot["config"]["settings"]["bots"]] == ["hrbot", "itbot", "oldbot", "itbot"]
