"""The Alertmanager receiver (`POST /api/v1/alertmanager`) and the group-robot senders it shares with
the built-in notifier: real version-4 payloads (firing, resolved, grouped) worded in zh-CN and en,
every 400, robots refusing inside an HTTP 200 (502), throttling (503 + Retry-After, then delivered
once), WeCom's group robot (93000, 45009, its size limits, its rate bucket), and an alert for a
bot's conversation through the outbox."""

from __future__ import annotations

import asyncio
import copy
import logging
import zoneinfo
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.alertmanager import parse, render
from gateway.alerts import Monitor
from gateway.errors import PlatformError, Throttled
from gateway.keys import OUTBOX
from gateway.robots import RobotMessage, RobotRefused
from gateway.stats import Stats
from gateway.store import MemoryStore
from gateway.store.sqlite import SqliteStore
from handlers.robots import DingTalkRobot, WeComRobot, robot_senders
from tests.conftest import make_config
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.robots import RobotDouble
from tests.helpers import dingtalk_section, serve

Client = TestClient[web.Request, web.Application]
TOKEN = "am-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTE = "/api/v1/alertmanager"
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")


def alert(instance: str, status: str = "firing", **annotations: str) -> dict[str, Any]:
    """One alert as Alertmanager's webhook sends it (`template.Alert`)."""
    return {
        "status": status,
        "labels": {"alertname": "HighErrorRate", "job": "api", "severity": "critical", "instance": instance},
        "annotations": {
            "summary": f"5xx ratio above 5% on {instance}",
            "description": "7.2% of requests failed in the last 5 minutes",
            **annotations,
        },
        "startsAt": "2026-03-01T02:00:00.123456789Z",  # 10:00 in Shanghai
        "endsAt": "2026-03-01T02:30:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=job%3Aerrors%3Aratio5m+%3E+0.05",
        "fingerprint": f"{abs(hash(instance)):016x}"[:16],
    }


def payload(*alerts: dict[str, Any], status: str = "firing") -> dict[str, Any]:
    """A version-4 webhook payload for one group (`notify/webhook.Message`)."""
    return {
        "version": "4",
        "groupKey": '{}:{alertname="HighErrorRate"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "botgate",
        "groupLabels": {"alertname": "HighErrorRate"},
        "commonLabels": {"alertname": "HighErrorRate", "job": "api", "severity": "critical"},
        "commonAnnotations": {"description": "7.2% of requests failed in the last 5 minutes"},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts) or [alert("api-1:8080")],
    }


FIRING = payload(alert("api-1:8080", runbook_url="https://runbooks.example/high-error-rate"))
RESOLVED = payload(alert("api-1:8080", status="resolved"), status="resolved")


# -- wording (pure) -------------------------------------------------------------------------------
def test_a_firing_alert_in_english_names_everything_an_on_call_engineer_needs() -> None:
    message = render(parse(FIRING), "en", SHANGHAI, 20_000)
    text = message.text
    assert message.markdown and message.title == "Firing: HighErrorRate"
    assert text.startswith("### Firing: HighErrorRate")
    assert "Severity: critical" in text and "Labels: job=api" in text
    assert "**5xx ratio above 5% on api-1:8080**" in text
    assert "7.2% of requests failed in the last 5 minutes" in text
    assert "instance=api-1:8080" in text
    assert "Started: 2026-03-01 10:00:00 CST" in text  # in [alerts] timezone
    assert "[Runbook](https://runbooks.example/high-error-rate)" in text
    assert "resolved" not in text.lower() and "Ended" not in text


def test_a_resolved_alert_says_so_with_its_end_time() -> None:
    text = render(parse(RESOLVED), "en", SHANGHAI, 20_000).text
    assert text.startswith("### Resolved: HighErrorRate")
    assert "Ended: 2026-03-01 10:30:00 CST" in text
    assert "Runbook" not in text  # that alert has none


def test_chinese_is_the_default_and_tells_firing_from_resolved() -> None:
    firing = render(parse(FIRING), None, SHANGHAI, 20_000).text
    resolved = render(parse(RESOLVED), "zh-CN", SHANGHAI, 20_000).text
    assert "HighErrorRate" in firing and "HighErrorRate" in resolved
    assert "已恢复" in resolved and "已恢复" not in firing
    assert "resolved" not in firing.lower() and "Firing" not in firing  # translated, not English


def test_other_time_zones_are_honoured() -> None:
    text = render(parse(FIRING), "en", zoneinfo.ZoneInfo("Europe/Berlin"), 20_000).text
    assert "Started: 2026-03-01 03:00:00 CET" in text


def test_a_group_is_one_message_and_cut_with_how_many_more() -> None:
    group = payload(*(alert(f"api-{i}:8080") for i in range(1, 41)))
    full = render(parse(group), "en", SHANGHAI, 20_000).text
    assert "40 alerts" in full and all(f"api-{i}:8080" in full for i in range(1, 41))
    cut = render(parse(group), "en", SHANGHAI, 2_048).text
    assert len(cut.encode()) <= 2_048
    shown = sum(f"**5xx ratio above 5% on api-{i}:8080**" in cut for i in range(1, 41))
    assert 0 < shown < 40 and cut.endswith(f"… and {40 - shown} more")


def test_alerts_alertmanager_left_out_are_counted() -> None:
    group = payload(alert("api-1:8080"))
    group["truncatedAlerts"] = 7
    text = render(parse(group), "en", SHANGHAI, 20_000).text
    assert "8 alerts" in text and text.endswith("… and 7 more")


# -- the receiver ---------------------------------------------------------------------------------
class World:
    def __init__(self, robots: RobotDouble, client: Client) -> None:
        self.robots, self.client = robots, client

    async def post(self, body: object) -> tuple[int, dict[str, Any], str]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        resp = await self.client.post(ROUTE, data=data, headers=AUTH)
        return resp.status, await resp.json(), resp.headers.get("Retry-After", "")


@pytest.fixture
async def robot_urls(aiohttp_server: Callable[..., Any]) -> tuple[RobotDouble, dict[str, str]]:
    double = RobotDouble()
    server = await aiohttp_server(double.app(), host="127.0.0.1")
    return double, {
        "dingtalk_webhook": str(server.make_url(f"/robot/send?access_token={double.dingtalk_token}")),
        "dingtalk_secret": double.dingtalk_secret,
        "feishu_webhook": str(server.make_url(f"/open-apis/bot/v2/hook/{double.feishu_token}")),
        "feishu_secret": double.feishu_secret,
        "wecom_webhook": str(server.make_url(f"/cgi-bin/webhook/send?key={double.wecom_key}")),
    }


@pytest.fixture
def world(gateway: Callable[..., Any], robot_urls: Any) -> Callable[..., Any]:
    double, urls = robot_urls

    async def start(*robots: str, **alerts: Any) -> World:
        chosen = {k: v for k, v in urls.items() if k.split("_")[0] in robots}
        config = make_config(api={"tokens": [TOKEN]}, alerts={**chosen, **alerts}, cache={"enabled": False})
        return World(double, await gateway(config))

    return start


async def test_every_robot_gets_the_group_signed_and_in_chinese(world: Any) -> None:
    w = await world("dingtalk", "feishu", "wecom")
    status, body, _ = await w.post(FIRING)
    assert status == 200, body
    assert body["targets"] == {"dingtalk": "delivered", "feishu": "delivered", "wecom": "delivered"}
    assert sorted(p for p, _ in w.robots.posts) == ["dingtalk", "feishu", "wecom"]  # signatures checked
    assert all("HighErrorRate" in text and "已恢复" not in text for _, text in w.robots.posts)
    kinds = {platform: body.get("msgtype", body.get("msg_type")) for platform, body in w.robots.bodies}
    assert kinds == {"dingtalk": "markdown", "feishu": "interactive", "wecom": "markdown"}
    assert w.robots.refusals == []


async def test_english_when_configured(world: Any) -> None:
    w = await world("wecom", locale="en", timezone="UTC")
    status, _, _ = await w.post(RESOLVED)
    assert status == 200
    [(_, text)] = w.robots.posts
    assert text.startswith("### Resolved: HighErrorRate") and "Ended: 2026-03-01 02:30:00 UTC" in text


def broken(path: str, value: object) -> dict[str, Any]:
    """FIRING with the value at `path` ("alerts.0.startsAt") replaced; `...` deletes it."""
    data = copy.deepcopy(FIRING)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (broken("version", "3"), "version"),
        (broken("groupKey", ...), "groupKey"),
        (broken("status", "pending"), "status"),
        (broken("receiver", 7), "receiver"),
        (broken("commonLabels", ["severity"]), "commonLabels"),
        (broken("groupLabels.alertname", 1), "groupLabels.alertname"),
        (broken("externalURL", ...), "externalURL"),
        (broken("truncatedAlerts", -1), "truncatedAlerts"),
        (broken("alerts", []), "alerts"),
        (broken("alerts.0.status", "silenced"), "alerts[0].status"),
        (broken("alerts.0.startsAt", "yesterday"), "alerts[0].startsAt"),
        (broken("alerts.0.startsAt", "2026-03-01T02:00:00"), "alerts[0].startsAt"),
        (broken("alerts.0.annotations.summary", None), "alerts[0].annotations.summary"),
        (broken("alerts.0.fingerprint", ...), "alerts[0].fingerprint"),
        (["not", "an", "object"], "body"),
    ],
)
async def test_a_malformed_payload_is_a_400_naming_the_field(world: Any, body: Any, field: str) -> None:
    w = await world("dingtalk")
    status, answer, _ = await w.post(body)
    assert status == 400 and answer["field"] == field and answer["error"].startswith(f"{field}: ")
    assert w.robots.posts == [] and w.robots.refusals == []


async def test_a_body_that_is_not_json_is_a_400(world: Any) -> None:
    w = await world("dingtalk")
    status, answer, _ = await w.post(b"{not json")
    assert status == 400 and "not JSON" in answer["error"]


async def test_no_token_no_delivery(world: Any) -> None:
    w = await world("dingtalk")
    resp = await w.client.post(ROUTE, data=orjson.dumps(FIRING), headers={"Authorization": "Bearer wrong-token-123"})
    assert resp.status == 401 and w.robots.posts == []


async def test_a_robot_refusing_inside_a_200_is_a_502_naming_why(world: Any, caplog: pytest.LogCaptureFixture) -> None:
    w = await world("dingtalk", "feishu", dingtalk_secret="SECwrong-secret")
    with caplog.at_level(logging.WARNING):
        status, body, _ = await w.post(FIRING)
    assert status == 502
    assert "310000" in body["error"] and "signature, keyword or IP allow-list" in body["error"]
    assert body["targets"] == {"dingtalk": "refused", "feishu": "delivered"}
    assert w.robots.refusals == [("dingtalk", 310000)]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "310000" in logged
    assert w.robots.dingtalk_token not in logged + orjson.dumps(body).decode()  # the URL's credential


async def test_a_throttled_robot_is_a_503_then_delivered_once(world: Any) -> None:
    w = await world("dingtalk", "feishu")
    w.robots.next_errcodes["dingtalk"] = [130101]
    status, body, retry_after = await w.post(FIRING)
    assert status == 503 and retry_after == "600"  # DingTalk blocks a robot for ten minutes
    assert body["targets"] == {"dingtalk": "retry", "feishu": "delivered"} and "130101" in body["error"]
    status, body, _ = await w.post(FIRING)  # Alertmanager's retry: the same payload
    assert status == 200 and body["targets"] == {"dingtalk": "delivered", "feishu": "already"}
    assert Counter(p for p, _ in w.robots.posts) == {"dingtalk": 1, "feishu": 1}


async def test_a_busy_dingtalk_robot_is_retried_not_refused(world: Any) -> None:
    w = await world("dingtalk")
    w.robots.next_errcodes["dingtalk"] = [-1]  # "system busy": not taken
    status, body, retry_after = await w.post(FIRING)
    assert status == 503 and retry_after and body["targets"] == {"dingtalk": "retry"}
    assert (await w.post(FIRING))[0] == 200 and len(w.robots.posts) == 1


async def test_a_repeat_with_other_alerts_is_posted_again(world: Any) -> None:
    w = await world("feishu")
    assert (await w.post(FIRING))[0] == 200
    assert (await w.post(payload(alert("api-1:8080"), alert("api-2:8080"))))[0] == 200
    assert len(w.robots.posts) == 2 and "api-2:8080" in w.robots.posts[1][1]


async def test_feishu_throttling_and_keyword_refusal(world: Any) -> None:
    w = await world("feishu")
    w.robots.next_errcodes["feishu"] = [11232, 19024]
    status, _, retry_after = await w.post(FIRING)
    assert status == 503 and retry_after == "60"
    status, body, _ = await w.post(FIRING)
    assert status == 502 and "19024" in body["error"] and "keyword" in body["error"]
    assert (await w.post(FIRING))[0] == 200 and len(w.robots.posts) == 1


async def test_wecom_bad_key_is_a_502_and_the_key_is_never_shown(
    world: Any, robot_urls: Any, caplog: pytest.LogCaptureFixture
) -> None:
    double, urls = robot_urls
    wrong = urls["wecom_webhook"].replace(double.wecom_key, "wrong-key-4f1c")
    w = await world("wecom", wecom_webhook=wrong)
    with caplog.at_level(logging.DEBUG):
        status, body, _ = await w.post(FIRING)
    assert status == 502 and "93000" in body["error"] and "invalid webhook key" in body["error"]
    ours = [r.getMessage() for r in caplog.records if r.name != "aiohttp.access"]  # not the double's
    shown = orjson.dumps(body).decode() + "\n".join(ours)
    assert "wrong-key-4f1c" not in shown and "key=" not in shown
    status_page = await (await w.client.get("/api/status")).json()
    assert status_page["alerts"]["sinks"] == ["wecom"]


async def test_wecom_frequency_limit_is_a_503(world: Any) -> None:
    w = await world("wecom")
    w.robots.next_errcodes["wecom"] = [45009]
    status, body, retry_after = await w.post(FIRING)
    assert status == 503 and retry_after == "60" and "45009" in body["error"]
    assert (await w.post(FIRING))[0] == 200 and len(w.robots.posts) == 1


async def test_a_big_group_fits_wecoms_4096_bytes(world: Any) -> None:
    w = await world("wecom", "dingtalk")
    status, _, _ = await w.post(payload(*(alert(f"api-{i}:8080") for i in range(1, 61))))
    assert status == 200 and w.robots.refusals == []  # the double refuses over 4,096 bytes (40058)
    texts = dict(w.robots.posts)
    assert len(texts["wecom"].encode()) <= 4_096 and "另有" in texts["wecom"]  # "… and N more"
    assert "api-60:8080" in texts["dingtalk"]  # 20,000 bytes take them all


async def test_nowhere_to_deliver_is_a_503_naming_the_keys(world: Any) -> None:
    w = await world()
    status, body, _ = await w.post(FIRING)
    assert status == 503 and "[alerts] dingtalk_webhook" in body["error"]


# -- the senders ----------------------------------------------------------------------------------
async def test_the_robot_bucket_waits_briefly_then_counts_as_throttled(robot_urls: Any) -> None:
    double, urls = robot_urls
    store = MemoryStore()
    async with aiohttp.ClientSession() as session:
        robot = WeComRobot(session, store, urls["wecom_webhook"], wait=0.0)
        for n in range(WeComRobot.per_minute):
            await robot.send(RobotMessage(f"post {n}"))
        with pytest.raises(Throttled):
            await robot.send(RobotMessage("one too many"))
        other = WeComRobot(session, store, urls["wecom_webhook"], wait=0.0)  # another instance, same store
        with pytest.raises(Throttled):
            await other.send(RobotMessage("still too many"))
    assert len(double.posts) == WeComRobot.per_minute and double.refusals == []


async def test_a_robot_whose_bucket_the_store_cannot_give_is_retried_not_a_500(robot_urls: Any, tmp_path: Path) -> None:
    """The Alertmanager receiver answers a retryable `PlatformError` with a 503; a bare `StoreError`
    would escape it as a 500 (and the built-in notifier would log it as a bug)."""
    double, urls = robot_urls
    store = SqliteStore(tmp_path / "botgate.sqlite3")
    await store.open()
    await store.close()  # a store that fails every call
    async with aiohttp.ClientSession() as session:
        robot = DingTalkRobot(session, store, urls["dingtalk_webhook"], urls["dingtalk_secret"], wait=0.0)
        with pytest.raises(PlatformError) as caught:
            await robot.send(RobotMessage("disk full"))
    assert caught.value.retryable and not isinstance(caught.value, Throttled | RobotRefused)
    assert "bucket" in str(caught.value) and double.posts == []


async def test_a_text_too_long_for_wecom_is_cut_with_a_marker(robot_urls: Any) -> None:
    double, urls = robot_urls
    async with aiohttp.ClientSession() as session:
        robot = WeComRobot(session, MemoryStore(), urls["wecom_webhook"])
        await robot.send(RobotMessage("告警" * 2_000))  # 12,000 bytes
    [(_, text)] = double.posts
    assert len(text.encode()) <= 2_048 and text.endswith("\n…") and text.startswith("告警告警")


async def test_wecom_refusals_are_classified(robot_urls: Any) -> None:
    _, urls = robot_urls
    async with aiohttp.ClientSession() as session:
        robot = WeComRobot(session, MemoryStore(), urls["wecom_webhook"].replace("wc-key", "nope"))
        with pytest.raises(RobotRefused) as refused:
            await robot.send(RobotMessage("hi"))
    assert refused.value.code == 93000 and not refused.value.retryable and "nope" not in str(refused.value)


async def test_the_builtin_notifier_posts_to_the_wecom_robot(robot_urls: Any) -> None:
    double, urls = robot_urls
    cfg = make_config(alerts={"wecom_webhook": urls["wecom_webhook"], "model_failures": 2}).alerts
    stats = Stats()
    monitor = Monitor(stats, lambda: [])
    async with aiohttp.ClientSession() as session:
        stats.model_call(1.0, "server_error")
        stats.model_call(1.0, "server_error")
        sent = await monitor.check(cfg, robot_senders(cfg, session, MemoryStore()))
    assert [a.key for a in sent] == ["model_failing"]
    [(platform, text)] = double.posts
    assert platform == "wecom" and text.startswith("[botgate alert] FIRING: model failing")


async def test_the_notifier_logs_a_wecom_refusal(robot_urls: Any, caplog: pytest.LogCaptureFixture) -> None:
    double, urls = robot_urls
    double.errcodes["wecom"] = 93000
    cfg = make_config(alerts={"wecom_webhook": urls["wecom_webhook"], "model_failures": 1}).alerts
    stats = Stats()
    monitor = Monitor(stats, lambda: [])
    async with aiohttp.ClientSession() as session:
        stats.model_call(1.0, "timeout")
        with caplog.at_level(logging.WARNING):
            assert await monitor.check(cfg, robot_senders(cfg, session, MemoryStore())) == []
    [record] = [r for r in caplog.records if r.getMessage().startswith("alert post failed")]
    assert "93000" in record.getMessage() and double.wecom_key not in record.getMessage()


# -- to a bot's conversation, through the outbox ----------------------------------------------------
async def test_an_alert_for_a_conversation_goes_through_the_outbox_once(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]
) -> None:
    ding = DingTalkDouble()
    await serve(aiohttp_server, ding)
    config = make_config(
        dingtalk={**dingtalk_section(ding), "mode": "webhook"},
        api={"tokens": [TOKEN]},
        alerts={"platform": "dingtalk", "conversation": "cidOps", "locale": "en"},
        cache={"enabled": False},
    )
    w = World(RobotDouble(), await gateway(config))
    status, body, _ = await w.post(FIRING)
    assert status == 200 and body["targets"] == {"dingtalk/default/conversation": "delivered"}
    assert (await w.post(FIRING))[1]["targets"] == {"dingtalk/default/conversation": "already"}
    async with asyncio.timeout(10):
        entry = await w.client.app[OUTBOX].settled(body["queued"]["dingtalk/default/conversation"])
    assert entry.state == "sent" and entry.origin == "alertmanager"
    [sent] = ding.calls("/v1.0/robot/groupMessages/send")
    assert sent["openConversationId"] == "cidOps" and sent["msgKey"] == "sampleMarkdown"
    assert "Firing: HighErrorRate" in orjson.loads(sent["msgParam"])["text"]
