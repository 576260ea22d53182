"""A real Prometheus Alertmanager (Debian's `prometheus-alertmanager`) with `deploy/alertmanager.yml`
pointed at a running gateway: an alert posted to Alertmanager's API arrives at the robot double,
signed; and a robot refusing inside an HTTP 200 shows up as Alertmanager's own failed
notification (`alertmanager_notifications_failed_total{integration="webhook"}`)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import make_config
from tests.doubles.robots import RobotDouble
from tests.redisd import listen_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "alertmanager.yml"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
AMTOOL = shutil.which("amtool")
TOKEN = "alertmanager-token-0123456789abcdef"
FAILED = re.compile(r'^alertmanager_notifications_failed_total\{[^}]*integration="webhook"[^}]*\} (\S+)$', re.M)
REQUESTS_FAILED = re.compile(
    r'^alertmanager_notification_requests_failed_total\{[^}]*integration="webhook"[^}]*\} (\S+)$', re.M
)

pytestmark = pytest.mark.skipif(
    ALERTMANAGER is None, reason="prometheus-alertmanager not installed (Debian package prometheus-alertmanager)"
)


@pytest.mark.skipif(AMTOOL is None, reason="amtool not installed (Debian package prometheus-alertmanager)")
def test_the_example_config_passes_amtool() -> None:
    result = subprocess.run(
        [str(AMTOOL), "check-config", str(EXAMPLE)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def derived_config(url: str, token_file: Path) -> str:
    """deploy/alertmanager.yml with the gateway's URL, the token file and test-short timings."""
    text = EXAMPLE.read_text()
    text = text.replace("http://127.0.0.1:18789/api/v1/alertmanager", url)
    text = text.replace("/etc/alertmanager/botgate-api-token", str(token_file))
    for key, value in (("group_wait", "100ms"), ("group_interval", "1s"), ("repeat_interval", "1h")):
        text, count = re.subn(rf"^(\s*{key}:) \S+", rf"\1 {value}", text, flags=re.M)
        assert count == 1, key
    return text


class Alertmanager:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process, self.base = process, f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self.listening = asyncio.Event()

    async def follow(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if "Listening on" in line:
                self.listening.set()

    async def metric(self, http: aiohttp.ClientSession, pattern: re.Pattern[str]) -> float:
        async with http.get(f"{self.base}/metrics") as resp:
            return sum(float(v) for v in pattern.findall(await resp.text()))


@pytest.fixture
async def world(
    aiohttp_server: Callable[..., Any], gateway: Callable[..., Any], tmp_path: Path
) -> AsyncIterator[tuple[RobotDouble, Alertmanager]]:
    double = RobotDouble()
    robots = await aiohttp_server(double.app(), host="127.0.0.1")
    client = await gateway(
        make_config(
            api={"tokens": [TOKEN]},
            alerts={
                "dingtalk_webhook": str(robots.make_url(f"/robot/send?access_token={double.dingtalk_token}")),
                "dingtalk_secret": double.dingtalk_secret,
                "locale": "en",
            },
            cache={"enabled": False},
        )
    )
    token_file = tmp_path / "botgate-api-token"
    token_file.write_text(TOKEN)
    config = tmp_path / "alertmanager.yml"
    config.write_text(derived_config(str(client.make_url("/api/v1/alertmanager")), token_file))
    port = listen_port()
    process = await asyncio.create_subprocess_exec(
        str(ALERTMANAGER),
        f"--config.file={config}",
        f"--storage.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip port: a single instance
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    am = Alertmanager(process, port)
    follower = asyncio.create_task(am.follow())
    try:
        async with asyncio.timeout(10):
            await am.listening.wait()
        yield double, am
    finally:
        process.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        follower.cancel()


async def fire(http: aiohttp.ClientSession, am: Alertmanager, alertname: str) -> None:
    alert = {
        "labels": {"alertname": alertname, "severity": "critical", "instance": "gw-1:18789"},
        "annotations": {"summary": f"{alertname} on gw-1", "runbook_url": "https://runbooks.example/botgate"},
        "generatorURL": "http://prometheus:9090/graph",
    }
    async with http.post(f"{am.base}/api/v2/alerts", json=[alert]) as resp:
        assert resp.status == 200, await resp.text()


async def test_alertmanager_posts_through_the_gateway_to_the_robot(world: Any) -> None:
    double, am = world
    async with aiohttp.ClientSession() as http:
        await fire(http, am, "BotgateTestAlert")
        [(platform, text)] = await double.wait_posts(1)
        assert platform == "dingtalk" and text.startswith("### Firing: BotgateTestAlert")  # signed: the double checks
        assert "[Runbook](https://runbooks.example/botgate)" in text and "instance=gw-1:18789" in text
        assert await am.metric(http, FAILED) == 0

        # The robot now refuses inside an HTTP 200: the gateway answers 502, Alertmanager retries
        # and, at the notification's deadline, counts a failed notification.
        double.errcodes["dingtalk"] = 310000
        await fire(http, am, "BotgateRefusedAlert")
        async with asyncio.timeout(14):
            while await am.metric(http, FAILED) < 1:
                seen = len(double.refusals)
                while len(double.refusals) == seen:  # the next attempt (a retry, or the next flush)
                    double.changed.clear()
                    await double.changed.wait()
        assert await am.metric(http, REQUESTS_FAILED) >= 1
    assert [p for p, _ in double.posts] == ["dingtalk"] and set(double.refusals) == {("dingtalk", 310000)}
    assert any("310000" in line for line in am.lines)  # Alertmanager logs the gateway's answer
