"""Alerts: Prometheus rules (promtool), and the built-in notifier posting signed messages to
DingTalk/Feishu robot-webhook doubles — once per incident, then a resolve."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
import pytest
import yaml

from gateway.alerts import RETRY_AFTER, Monitor
from gateway.channel import ChannelState, ChannelStatus
from gateway.config import AlertsConfig
from gateway.stats import Stats
from gateway.store import MemoryStore
from handlers.dingtalk.webhook import sign as dingtalk_sign
from handlers.robots import DingTalkRobot, robot_senders
from tests.conftest import make_config
from tests.doubles.robots import RobotDouble
from tests.helpers import chat

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "alerts.yml"
RULE_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "file:///opt/botgate/docs/runbook.md#"  # docs/runbook.md says how to point it elsewhere
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def anchor(heading: str) -> str:
    """The id GitHub and GitLab give a Markdown heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    """Runbook sections by anchor: each heading's text up to the next heading of any level."""
    parts = re.split(r"^#{2,4} (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    return {anchor(heading): body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
def test_alert_rules_fire_on_the_documented_conditions() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert set(alerts()) - firing == set(), "alerts without a promtool case where they fire"
    assert set(alerts()) - quiet == set(), "alerts without a promtool case where they must not fire"
    assert (firing | quiet) - set(alerts()) == set(), "promtool cases for alerts that do not exist"


def test_every_alert_links_its_runbook_section() -> None:
    sections = runbook_sections()
    for name, rule in alerts().items():
        url = rule["annotations"].get("runbook_url", "")
        assert url == RUNBOOK_URL + name.lower(), (name, url)
        body = sections.get(name.lower())
        assert body is not None, f"docs/runbook.md has no section {name}"
        for part in ("**Means:**", "**Check:**", "**Do:**"):
            assert part in body, f"docs/runbook.md {name}: no {part}"
        assert "```" in body, f"docs/runbook.md {name}: no commands to check with"


@needs_promtool
def test_example_prometheus_config_loads_the_rules(tmp_path: Path) -> None:
    shipped = ROOT / "deploy" / "prometheus.yml"
    result = promtool("check", "config", "--syntax-only", str(shipped))
    assert result.returncode == 0, result.stdout + result.stderr
    # Fully, with the files it names in place: the installed rules are deploy/alerts.yml.
    config = yaml.safe_load(shipped.read_text())
    assert config["rule_files"] == ["/etc/prometheus/botgate-alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"botgate", "node"} <= set(jobs)  # what the rules select
    token = tmp_path / "botgate-metrics-token"
    token.write_text("metrics-token\n")
    assert jobs["botgate"]["authorization"]["credentials_file"] == "/etc/prometheus/botgate-metrics-token"
    text = shipped.read_text().replace("/etc/prometheus/botgate-alerts.yml", str(RULES))
    installed = tmp_path / "prometheus.yml"
    installed.write_text(text.replace("/etc/prometheus/botgate-metrics-token", str(token)))
    result = promtool("check", "config", str(installed))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_dingtalk_signature_matches_the_documented_example() -> None:
    # Example from the DingTalk robot docs (see docs/protocols/dingtalk.md §C.2).
    assert (
        dingtalk_sign("1700000000000", "this is secret")
        == "sSFWELbV2YwjdDQhWZwTcWlX5BWUx5J6TPpsZmuPii0="
    )


def test_dingtalk_sign_is_url_encoded_in_the_query() -> None:
    robot = DingTalkRobot(None, None, "https://robot.example/robot/send?access_token=t", "SECx")  # type: ignore[arg-type]
    for ms in range(1_700_000_000_000, 1_700_000_001_000):  # find a signature with + or /
        if any(c in dingtalk_sign(str(ms), "SECx") for c in "+/"):
            break
    url = robot.url(ms / 1000)
    query = dict(parse_qsl(url.raw_query_string))  # decodes like the platform's servlet would
    assert query == {
        "access_token": "t",
        "timestamp": str(ms),
        "sign": dingtalk_sign(str(ms), "SECx"),
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def robots(aiohttp_server: Callable[..., Any]) -> tuple[RobotDouble, dict[str, str]]:
    double = RobotDouble()
    server = await aiohttp_server(double.app())
    urls = {
        "dingtalk_webhook": str(
            server.make_url(f"/robot/send?access_token={double.dingtalk_token}")
        ),
        "dingtalk_secret": double.dingtalk_secret,
        "feishu_webhook": str(server.make_url(f"/open-apis/bot/v2/hook/{double.feishu_token}")),
        "feishu_secret": double.feishu_secret,
    }
    return double, urls


def alerts_config(urls: dict[str, str], **overrides: Any) -> AlertsConfig:
    return make_config(alerts={**urls, **overrides}).alerts


async def test_model_failures_alert_once_then_resolve(robots: Any) -> None:
    double, urls = robots
    cfg = alerts_config(urls, model_failures=3)
    clock = Clock()
    stats = Stats(clock)
    monitor = Monitor(stats, lambda: [], clock)
    async with aiohttp.ClientSession() as session:
        sinks = robot_senders(cfg, session, MemoryStore())
        for _ in range(10):  # ten failures in a row, checked after each one
            stats.model_call(1.0, "server_error")
            await monitor.check(cfg, sinks)
            clock.now += 1
        assert [(p, t.splitlines()[0]) for p, t in double.posts] == [
            ("dingtalk", "[botgate alert] FIRING: model failing"),
            ("feishu", "[botgate alert] FIRING: model failing"),
        ]
        assert "model calls failed in a row (last reason: server_error)" in double.posts[0][1]
        assert [i.key for i in monitor.incidents] == ["model_failing"]

        stats.model_call(0.5, None)  # the model answers again
        for _ in range(3):
            await monitor.check(cfg, sinks)
            clock.now += 1
    assert [(p, t.splitlines()[0]) for p, t in double.posts[2:]] == [
        ("dingtalk", "[botgate alert] RESOLVED: model failing"),
        ("feishu", "[botgate alert] RESOLVED: model failing"),
    ]
    assert monitor.incidents == [] and double.refusals == []


async def test_wrongly_signed_post_is_refused_and_retried_later(robots: Any) -> None:
    double, urls = robots
    wrong = alerts_config(
        {**urls, "feishu_webhook": ""}, dingtalk_secret="SECwrong", model_failures=1
    )
    clock = Clock()
    stats = Stats(clock)
    monitor = Monitor(stats, lambda: [], clock)
    async with aiohttp.ClientSession() as session:
        stats.model_call(1.0, "timeout")
        assert await monitor.check(wrong, robot_senders(wrong, session, MemoryStore())) == []
        assert double.refusals == [("dingtalk", 310000)] and double.posts == []
        clock.now += RETRY_AFTER / 2
        await monitor.check(wrong, robot_senders(wrong, session, MemoryStore()))
        assert len(double.refusals) == 1  # no hammering while it is failing
        right = alerts_config({**urls, "feishu_webhook": ""}, model_failures=1)
        clock.now += RETRY_AFTER
        sent = await monitor.check(right, robot_senders(right, session, MemoryStore()))
    assert [a.firing for a in sent] == [True]
    assert [p for p, _ in double.posts] == ["dingtalk"]


async def test_flapping_alert_is_rate_limited(robots: Any) -> None:
    double, urls = robots
    cfg = alerts_config(urls, model_failures=1, min_interval=600.0)
    clock = Clock()
    stats = Stats(clock)
    monitor = Monitor(stats, lambda: [], clock)
    async with aiohttp.ClientSession() as session:
        sinks = robot_senders(cfg, session, MemoryStore())
        stats.model_call(1.0, "connection")
        await monitor.check(cfg, sinks)  # FIRING x2
        stats.model_call(1.0, None)
        clock.now += 10
        await monitor.check(cfg, sinks)  # RESOLVED x2
        stats.model_call(1.0, "connection")
        clock.now += 10
        assert await monitor.check(cfg, sinks) == []  # back within min_interval: held back
        assert [i.key for i in monitor.incidents] == ["model_failing"]  # but shown on the page
        clock.now += 600
        sent = await monitor.check(cfg, sinks)  # still failing after min_interval: now it goes out
    assert [a.firing for a in sent] == [True]  # one alert, to both robots
    states = [t.split(":")[0].split()[-1] for _, t in double.posts]
    assert states == ["FIRING", "FIRING", "RESOLVED", "RESOLVED", "FIRING", "FIRING"]


async def test_channel_down_alert_after_channel_down_after(robots: Any) -> None:
    double, urls = robots
    cfg = alerts_config({**urls, "dingtalk_webhook": ""}, channel_down_after=120.0)
    clock = Clock()
    statuses = [
        ChannelStatus("dingtalk", ChannelState.RECONNECTING, last_error="ConnectionResetError")
    ]
    monitor = Monitor(Stats(clock), lambda: statuses, clock)
    async with aiohttp.ClientSession() as session:
        sinks = robot_senders(cfg, session, MemoryStore())
        await monitor.check(cfg, sinks)
        clock.now += 60
        assert await monitor.check(cfg, sinks) == []  # down, but not for long enough yet
        clock.now += 61
        fired = await monitor.check(cfg, sinks)
        statuses[0] = ChannelStatus("dingtalk", ChannelState.CONNECTED)
        clock.now += 5
        resolved = await monitor.check(cfg, sinks)
    assert [(a.key, a.firing) for a in fired + resolved] == [
        ("channel_down:dingtalk/default", True),
        ("channel_down:dingtalk/default", False),
    ]
    assert (
        "dingtalk has been reconnecting for 2 min 1 s (last error: ConnectionResetError)"
        in double.posts[0][1]
    )
    assert [p for p, _ in double.posts] == ["feishu", "feishu"]


async def test_each_bot_is_its_own_channel_down_alert(robots: Any) -> None:
    """Two robots of one platform: one down, the other up is an alert for the one; the other
    going down later is a second alert, and one coming back clears only its own."""
    double, urls = robots
    cfg = alerts_config({**urls, "dingtalk_webhook": ""}, channel_down_after=60.0)
    clock = Clock()
    hr = ChannelStatus("dingtalk", ChannelState.CONNECTED, bot="hrbot")
    it = ChannelStatus("dingtalk", ChannelState.REFUSED, last_error="bad secret", bot="itbot")
    statuses = [hr, it]
    monitor = Monitor(Stats(clock), lambda: statuses, clock)
    async with aiohttp.ClientSession() as session:
        sinks = robot_senders(cfg, session, MemoryStore())
        await monitor.check(cfg, sinks)
        clock.now += 61
        first = await monitor.check(cfg, sinks)
        statuses[0] = ChannelStatus("dingtalk", ChannelState.RECONNECTING, bot="hrbot")
        await monitor.check(cfg, sinks)
        clock.now += 61
        second = await monitor.check(cfg, sinks)
        statuses[1] = ChannelStatus("dingtalk", ChannelState.CONNECTED, bot="itbot")
        clock.now += 5
        third = await monitor.check(cfg, sinks)
    assert [(a.key, a.firing) for a in first + second + third] == [
        ("channel_down:dingtalk/itbot", True),
        ("channel_down:dingtalk/hrbot", True),
        ("channel_down:dingtalk/itbot", False),
    ]
    assert first[0].title == "dingtalk/itbot channel down" and "bad secret" in first[0].detail
    assert [i.key for i in monitor.incidents] == ["channel_down:dingtalk/hrbot"]
    assert "dingtalk/itbot channel down" in double.posts[0][1]


async def test_error_ratio_alert_needs_enough_replies() -> None:
    cfg = make_config(alerts={"error_ratio": 0.05}).alerts
    clock = Clock()
    stats = Stats(clock)
    monitor = Monitor(stats, lambda: [], clock)
    for _ in range(5):
        stats.reply(failed=True)
    assert monitor.conditions(cfg, clock()) == {}  # 5 of 5 failed, but 5 replies prove little
    for _ in range(15):
        stats.reply(failed=False)
    _, detail = monitor.conditions(cfg, clock())["error_ratio"]
    assert detail.startswith("25.0% of 20 replies in the last 5 minutes were errors")


async def test_gateway_posts_signed_alert_when_the_model_keeps_failing(
    gateway: Any, openai_double: Any, robots: Any
) -> None:
    double, urls = robots
    _, model_url = openai_double
    client = await gateway(
        make_config(
            model={"base_url": model_url, "max_retries": 0},
            cache={"enabled": False},
            alerts={**urls, "model_failures": 3, "error_ratio": 1.0},
        )
    )
    async with client.ws_connect("/chat/ws?session=alertsession1") as ws:
        await ws.receive()
        for n in range(3):
            frames = await chat(client, ws, f"status:500 attempt {n}", f"m{n}")
            assert "模型现在没有响应" in frames[-1]["text"]  # the model-down notice, Chinese by default
        posts = await double.wait_posts(2)
        assert sorted(p for p, _ in posts) == ["dingtalk", "feishu"]
        assert all(t.startswith("[botgate alert] FIRING: model failing") for _, t in posts)

        await chat(client, ws, "status:500 once more", "m3")  # still failing: no new post
        frames = await chat(client, ws, "all good now", "m4")
        assert frames[-1]["type"] == "done"
        posts = await double.wait_posts(4)
    assert [t.split("\n")[0] for _, t in posts[2:]] == [
        "[botgate alert] RESOLVED: model failing"
    ] * 2
    assert len(double.posts) == 4 and double.refusals == []

    status = orjson.loads(await (await client.get("/api/status")).read())
    assert status["alerts"] == {"sinks": ["dingtalk", "feishu"], "active": []}
