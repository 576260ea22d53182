"""The send API (`POST /api/v1/messages`, `GET /api/v1/messages/{id}`) against the DingTalk and Feishu
doubles: groups and 1:1 chats on both platforms, every 400, tokens, idempotency, a throttled and a
refusing platform, the per-token rate limit, the audit log, and kill -9 between 202 and delivery."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway import outbox as outbox_module
from gateway.keys import OUTBOX, STORE
from gateway.store import OutboxEntry
from gateway.store.sqlite import SqliteStore
from tests.conftest import make_config
from tests.doubles import feishu as fd
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu_events import APP_ID
from tests.helpers import dingtalk_section, serve
from tests.process import GatewayProcess, env_for

Client = TestClient[web.Request, web.Application]
TOKEN = "ci-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GROUP_SEND = "/v1.0/robot/groupMessages/send"
BATCH_SEND = "/v1.0/robot/oToMessages/batchSend"


class World:
    def __init__(self, ding: DingTalkDouble, feishu: fd.FeishuDouble, client: Client) -> None:
        self.ding, self.feishu, self.client = ding, feishu, client

    async def post(self, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        resp = await self.client.post("/api/v1/messages", data=data, headers=AUTH if headers is None else headers)
        return resp.status, await resp.json()

    async def settled(self, entry_id: str) -> dict[str, Any]:
        async with asyncio.timeout(10):
            await self.client.app[OUTBOX].settled(entry_id)
        resp = await self.client.get(f"/api/v1/messages/{entry_id}", headers=AUTH)
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body

    def group_sends(self) -> list[dict[str, Any]]:
        return [body for _, path, body in self.ding.api_calls if path == GROUP_SEND]


@pytest.fixture
async def world(aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]) -> World:
    ding = DingTalkDouble()
    await serve(aiohttp_server, ding)
    feishu, domain = await fd.start(aiohttp_server)
    config = make_config(
        dingtalk={**dingtalk_section(ding), "mode": "webhook"},
        feishu={"enabled": True, "app_id": APP_ID, "app_secret": fd.APP_SECRET, "domain": domain},
        api={"tokens": [TOKEN, OTHER], "rate_per_minute": 1000},
        cache={"enabled": False},
    )
    return World(ding, feishu, await gateway(config))


async def test_a_dingtalk_group_gets_the_markdown_and_the_state_says_sent(world: World) -> None:
    status, body = await world.post(
        {"platform": "dingtalk", "conversation": "cidGroup1", "markdown": "## CI 通过\n\nmain @ abc123"}
    )
    assert status == 202 and body["state"] == "queued" and body["duplicate"] is False
    state = await world.settled(body["id"])
    assert state["state"] == "sent" and state["conversation"] == "cidGroup1" and state["attempts"] == 1
    [sent] = world.group_sends()
    assert sent["openConversationId"] == "cidGroup1" and sent["msgKey"] == "sampleMarkdown"
    param = orjson.loads(sent["msgParam"])
    assert param["text"] == "## CI 通过\n\nmain @ abc123" and param["title"] == "CI 通过"


async def test_a_dingtalk_user_gets_a_text_by_staff_id(world: World) -> None:
    status, body = await world.post({"platform": "dingtalk", "bot": "default", "user": "staff42", "text": "审批已通过"})
    assert status == 202
    assert (await world.settled(body["id"]))["state"] == "sent"
    [(_, _, sent)] = [c for c in world.ding.api_calls if c[1] == BATCH_SEND]
    assert sent["userIds"] == ["staff42"] and sent["msgKey"] == "sampleText"
    assert orjson.loads(sent["msgParam"]) == {"content": "审批已通过"}


async def test_feishu_chat_gets_a_card_and_a_user_a_text(world: World) -> None:
    _, group = await world.post({"platform": "feishu", "conversation": "oc_group", "markdown": "**发布完成**"})
    _, user = await world.post({"platform": "feishu", "user": "ou_someone", "text": "你好 <at user_id=\"all\"></at>"})
    assert (await world.settled(group["id"]))["state"] == "sent"
    assert (await world.settled(user["id"]))["state"] == "sent"
    by_target = {sent.to: (id_type, sent) for id_type, sent in world.feishu.created}
    id_type, card = by_target["oc_group"]
    assert id_type == "chat_id" and card.msg_type == "interactive" and world.feishu.shown(card) == "**发布完成**"
    id_type, text = by_target["ou_someone"]
    assert id_type == "open_id" and text.msg_type == "text"
    assert "<at" not in text.content["text"]  # a pushed text never mentions everyone


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"platform": "slack", "conversation": "c", "text": "x"}, "platform"),
        ({"conversation": "c", "text": "x"}, "platform"),
        ({"platform": "dingtalk", "bot": "nobot", "conversation": "c", "text": "x"}, "bot"),
        ({"platform": "dingtalk", "text": "x"}, "conversation"),
        ({"platform": "dingtalk", "conversation": "c", "user": "u", "text": "x"}, "user"),
        ({"platform": "dingtalk", "conversation": "c", "text": "  "}, "text"),
        ({"platform": "dingtalk", "conversation": "c"}, "text"),
        ({"platform": "dingtalk", "conversation": "c", "text": "x", "markdown": "y"}, "markdown"),
        ({"platform": "dingtalk", "conversation": "c", "markdown": "长" * 7000}, "markdown"),
        ({"platform": "feishu", "user": "ou", "text": "x" * 60_001}, "text"),
        ({"platform": "dingtalk", "conversation": "", "text": "x"}, "conversation"),
        ({"platform": "dingtalk", "conversation": 5, "text": "x"}, "conversation"),
        ({"platform": "dingtalk", "converstion": "c", "text": "x"}, "converstion"),
        ({"platform": "dingtalk", "conversation": "c", "text": "x", "idempotency_key": "k" * 201}, "idempotency_key"),
    ],
)
async def test_a_bad_request_is_a_400_naming_the_field_and_nothing_is_sent(
    world: World, body: dict[str, Any], field: str
) -> None:
    status, answer = await world.post(body)
    assert status == 400 and answer["field"] == field and answer["error"].startswith(f"{field}: ")
    assert not world.ding.api_calls and not world.feishu.created


async def test_a_body_that_is_not_a_json_object_is_a_400(world: World) -> None:
    for raw in (b"{not json", b"[1, 2]"):
        status, answer = await world.post(raw)
        assert status == 400 and answer["field"] is None


async def test_tokens_missing_wrong_or_the_api_off(
    world: World, aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    body = {"platform": "dingtalk", "conversation": "c", "text": "x"}
    assert (await world.post(body, headers={}))[0] == 401
    assert (await world.post(body, headers={"Authorization": "Bearer wrong-token-0123456789"}))[0] == 401
    assert (await world.post(body, headers={"Authorization": TOKEN}))[0] == 401  # no scheme
    resp = await world.client.get("/api/v1/messages/whatever", headers={"Authorization": ""})
    assert resp.status == 401
    off = await gateway(make_config())
    resp = await off.post("/api/v1/messages", json=body, headers=AUTH)
    assert resp.status == 403 and "[api] tokens" in (await resp.json())["error"]


async def test_an_idempotency_key_sent_twice_delivers_once(world: World) -> None:
    body = {"platform": "dingtalk", "conversation": "cidG", "text": "build 17 passed", "idempotency_key": "build-17"}
    _, first = await world.post(body)
    await world.settled(first["id"])
    status, again = await world.post(body)
    assert status == 202 and again["id"] == first["id"] and again["duplicate"] is True
    _, other_token = await world.post(body, headers={"Authorization": f"Bearer {OTHER}"})  # keys are per token
    await world.settled(other_token["id"])
    assert other_token["id"] != first["id"]
    assert len(world.group_sends()) == 2


async def test_a_throttled_platform_is_retried_and_delivers_once(world: World) -> None:
    world.ding.throttle_next = 1  # the QPS-limit refusal: not taken, so repeating it is safe
    _, body = await world.post({"platform": "dingtalk", "conversation": "cidT", "text": "nightly digest"})
    state = await world.settled(body["id"])
    assert state["state"] == "sent" and state["attempts"] == 2
    assert len(world.group_sends()) == 1 and world.ding.throttled == [GROUP_SEND]


async def failed_count(client: Client, platform: str) -> float | None:
    """`botgate_outbox_messages_total{state="failed"}` of `platform` on /metrics (None: no series)."""
    text = await (await client.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            wanted = {"platform": platform, "state": "failed"}
            if sample.name == "botgate_outbox_messages_total" and sample.labels == wanted:
                return sample.value
    return None


async def test_a_refusal_fails_the_message_with_the_platforms_reason(world: World) -> None:
    # The series is there at 0 before the first failure: the alert (increase() over 15 minutes) can
    # only see a failure that moves an existing series.
    assert await failed_count(world.client, "feishu") == 0
    world.feishu.absent_chats.add("oc_gone")
    _, body = await world.post({"platform": "feishu", "conversation": "oc_gone", "text": "hello"})
    state = await world.settled(body["id"])
    assert state["state"] == "failed" and "230002" in state["reason"] and state["attempts"] == 1
    assert await failed_count(world.client, "feishu") == 1


async def test_an_unknown_message_id_is_a_404(world: World) -> None:
    resp = await world.client.get("/api/v1/messages/nope", headers=AUTH)
    assert resp.status == 404


async def test_each_token_has_its_rate_limit(aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]) -> None:
    ding = DingTalkDouble()
    await serve(aiohttp_server, ding)
    dingtalk = {**dingtalk_section(ding), "mode": "webhook"}
    client = await gateway(make_config(dingtalk=dingtalk, api={"tokens": [TOKEN, OTHER], "rate_per_minute": 2}))
    body = {"platform": "dingtalk", "conversation": "c", "text": "x"}
    statuses = [(await client.post("/api/v1/messages", json=body, headers=AUTH)).status for _ in range(3)]
    assert statuses == [202, 202, 429]
    other = await client.post("/api/v1/messages", json=body, headers={"Authorization": f"Bearer {OTHER}"})
    assert other.status == 202


async def test_every_call_is_audited_by_token_name_never_the_token(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _, body = await world.post({"platform": "dingtalk", "conversation": "cidA", "text": "x"})
    await world.post({"platform": "dingtalk", "conversation": "cidA", "text": "x"}, headers={})
    records = [r for r in caplog.records if getattr(r, "audit", False)]
    sent = [r for r in records if getattr(r, "outbox_id", "") == body["id"]]
    assert sent and getattr(sent[0], "token", "").startswith("token-") and getattr(sent[0], "status", 0) == 202
    assert any(getattr(r, "status", 0) == 401 for r in records)
    assert TOKEN not in caplog.text


async def test_kill_9_between_202_and_delivery_delivers_after_restart(
    aiohttp_server: Callable[..., Any], spawn_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    ding = DingTalkDouble()
    await serve(aiohttp_server, ding)
    ding.throttle_next = 10_000  # every attempt is refused as throttled: the message stays queued
    env = env_for(
        {
            "dingtalk": {**dingtalk_section(ding), "mode": "webhook"},
            "store": {"url": f"sqlite:///{tmp_path}/state/botgate.sqlite3"},
            "api": {"tokens": [TOKEN]},
        }
    )
    gateway = spawn_gateway(env=env, start=False)
    await asyncio.to_thread(gateway.start)
    async with aiohttp.ClientSession() as http:
        body = {"platform": "dingtalk", "conversation": "cidK", "text": "deploy finished"}
        async with http.post(f"{gateway.url}/api/v1/messages", json=body, headers=AUTH) as resp:
            assert resp.status == 202
            entry_id = (await resp.json())["id"]
        await ding.wait_for(lambda: ding.throttled)  # an attempt was made and refused
        gateway.kill()
        ding.throttle_next = 0
        assert not [c for c in ding.api_calls if c[1] == GROUP_SEND]
        gateway = spawn_gateway(env=env, start=False)  # same state directory
        await asyncio.to_thread(gateway.start)
        await ding.wait_for(lambda: [c for c in ding.api_calls if c[1] == GROUP_SEND], timeout=15)
        async with http.get(f"{gateway.url}/api/v1/messages/{entry_id}", headers=AUTH) as resp:
            state = await resp.json()
    assert state["state"] == "sent"
    assert len([c for c in ding.api_calls if c[1] == GROUP_SEND]) == 1
    assert await asyncio.to_thread(gateway.stop) == 0


@pytest.mark.redis
async def test_two_instances_on_one_redis_deliver_each_message_once(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], redis_url: str
) -> None:
    ding = DingTalkDouble()
    await serve(aiohttp_server, ding)
    config = make_config(
        dingtalk={**dingtalk_section(ding), "mode": "webhook"},
        store={"url": redis_url},
        api={"tokens": [TOKEN], "rate_per_minute": 1000},
    )
    first, second = await gateway(config), await gateway(config)
    ids = []
    for i in range(12):  # both couriers see every entry in the shared queue; each is sent once
        client = first if i % 2 else second
        body = {"platform": "dingtalk", "conversation": f"cid{i % 3}", "text": f"m{i}"}
        resp = await client.post("/api/v1/messages", json=body, headers=AUTH)
        ids.append((await resp.json())["id"])
    await ding.wait_for(lambda: len([c for c in ding.api_calls if c[1] == GROUP_SEND]) >= 12)
    for entry_id in ids:
        resp = await first.get(f"/api/v1/messages/{entry_id}", headers=AUTH)
        assert (await resp.json())["state"] == "sent"
    texts = [orjson.loads(c[2]["msgParam"])["content"] for c in ding.api_calls if c[1] == GROUP_SEND]
    assert sorted(texts) == sorted(f"m{i}" for i in range(12))
    for target in ("cid0", "cid1", "cid2"):  # one target's messages in the order accepted
        calls = [c for c in ding.api_calls if c[2].get("openConversationId") == target]
        mine = [orjson.loads(c[2]["msgParam"])["content"] for c in calls]
        assert mine == sorted(mine, key=lambda t: int(t[1:]))


class Counted(logging.Handler):
    """Sets `reached` once `n` records with this message have been logged."""

    def __init__(self, message: str, n: int) -> None:
        super().__init__()
        self.message, self.n, self.count = message, n, 0
        self.reached = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == self.message:
            self.count += 1
            if self.count >= self.n:
                self.reached.set()


async def test_a_store_that_refuses_writes_after_a_send_never_sends_it_again(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (reads still work) after the platform took the message: the outcome is written
    once the store takes it, the message is not posted again (nor spun on)."""
    monkeypatch.setattr(outbox_module, "STORE_RETRY", 0.2)
    monkeypatch.setattr(outbox_module, "RESCAN_LOCAL", 0.1)  # the courier finds the entry written below
    ding = DingTalkDouble()
    await serve(aiohttp_server, ding)
    config = make_config(
        dingtalk={**dingtalk_section(ding), "mode": "webhook"},
        store={"url": f"sqlite:///{tmp_path}/botgate.sqlite3"},
        api={"tokens": [TOKEN]},
    )
    client = await gateway(config)
    store = client.app[STORE]
    assert isinstance(store, SqliteStore)
    failures = Counted("outbox entry not updated: %s", 2)
    logging.getLogger("gateway.outbox").addHandler(failures)
    try:
        # A big message (its row spans overflow pages, so rewriting it needs new ones), due shortly.
        now = time.time()
        entry = OutboxEntry(
            id="full1",
            platform="dingtalk",
            bot="default",
            to_kind="conversation",
            to="cidFull",
            text="满" * 5000,
            markdown=False,
            origin="token:t",
            created_at=now,
            next_at=now + 0.3,
        )
        await store.outbox_add(entry, 60)
        pages = await store.db.write(lambda conn, now: conn.execute("PRAGMA page_count").fetchone()[0])
        await store.db.write(lambda conn, now: conn.execute(f"PRAGMA max_page_count = {pages}"))
        async with asyncio.timeout(10):
            await failures.reached.wait()  # the outcome was refused twice by the store
        assert len(world_sends(ding, "cidFull")) == 1
        await store.db.write(lambda conn, now: conn.execute("PRAGMA max_page_count = 1073741823"))
        async with asyncio.timeout(10):
            done = await client.app[OUTBOX].settled("full1")
    finally:
        logging.getLogger("gateway.outbox").removeHandler(failures)
    assert done.state == "sent" and done.attempts == 1
    assert len(world_sends(ding, "cidFull")) == 1


def world_sends(ding: DingTalkDouble, target: str) -> list[dict[str, Any]]:
    return [body for _, path, body in ding.api_calls if path == GROUP_SEND and body["openConversationId"] == target]
