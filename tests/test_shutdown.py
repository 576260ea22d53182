"""`python run.py` as a real process: health, readiness, and SIGTERM draining in-flight answers.

The OpenAI double runs in the test's own loop on 127.0.0.1; the gateway is a separate process, so
holding the model's answer cannot deadlock the test. Nothing sleeps blindly: the test waits for the
port to open/close and for frames, each bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.doubles.openai import OpenAIDouble

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


class GatewayProcess:
    """One `python run.py` child with stdout/stderr captured to files."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        self.tmp_path = tmp_path
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None
        self.stdout = tmp_path / "stdout.log"
        self.stderr = tmp_path / "stderr.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *args: str, env: dict[str, str] | None = None) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("BOTGATE_")}
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:  # noqa: ASYNC230 - local files
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(ROOT / "run.py"),
                *args,
                cwd=self.tmp_path,  # a clean working directory: nothing to reuse
                env={**clean, **(env or {})},
                stdout=out,
                stderr=err,
            )
        async with asyncio.timeout(START_TIMEOUT):
            while not await port_open(self.port):
                assert self.proc.returncode is None, self.stderr.read_text()
                await asyncio.sleep(0.05)

    async def stopped(self, sig: int, bound: float) -> int:
        """Send `sig` and wait (at most `bound` seconds) for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        async with asyncio.timeout(bound):
            return await self.proc.wait()

    async def wait_port_closed(self) -> None:
        async with asyncio.timeout(10):
            while await port_open(self.port):  # noqa: ASYNC110 - polling another process
                await asyncio.sleep(0.02)

    def logs(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.stdout.read_text().splitlines() if line]

    def admin_headers(self) -> dict[str, str]:
        """The login token from the login link logged at start (no admin password is set)."""
        [url] = [line["login_url"] for line in self.logs() if "login_url" in line]
        return {"Authorization": f"Bearer {url.partition('?token=')[2]}"}

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def gateway_process(tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    process = GatewayProcess(tmp_path, free_port())
    try:
        yield process
    finally:
        await process.kill()


def write_config(tmp_path: Path, port: int, model_url: str, drain_timeout: float) -> Path:
    path = tmp_path / "botgate.toml"
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}

[model]
base_url = "{model_url}"
api_keys = ["sk-shutdown-test-key"]

[dispatcher]
drain_timeout = {drain_timeout}
""",
        encoding="utf-8",
    )
    return path


async def send_chat(ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
    hello = await ws.receive_json()
    assert hello["type"] == "hello"
    await ws.send_json({"type": "message", "id": "m1", "text": text})
    assert (await ws.receive_json())["type"] == "accepted"


async def frames_until_closed(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    frames = []
    async with asyncio.timeout(30):
        async for frame in ws:
            if frame.type is aiohttp.WSMsgType.TEXT:
                frames.append(orjson.loads(frame.data))
    return frames


async def test_sigterm_during_work_drains_the_answer_and_exits_0(
    gateway_process: GatewayProcess, openai_double: tuple[OpenAIDouble, str]
) -> None:
    double, url = openai_double
    double.hold = True
    drain_timeout = 15.0
    config = write_config(gateway_process.tmp_path, gateway_process.port, url, drain_timeout)
    await gateway_process.start("--config", str(config))
    async with aiohttp.ClientSession(headers=gateway_process.admin_headers()) as http:
        async with http.get(f"{gateway_process.url}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{gateway_process.url}/readyz") as resp:
            assert resp.status == 200
            ready = await resp.json()
        assert ready["ready"] is True and ready["store"] == "ok"
        assert ready["channels"] == {"web/default": "connected"}
        async with http.ws_connect(f"{gateway_process.url}/chat/ws") as ws:
            await send_chat(ws, "finish me please")
            async with asyncio.timeout(10):
                await double.received.wait()  # the gateway is now waiting for the model
            assert gateway_process.proc is not None
            gateway_process.proc.send_signal(signal.SIGTERM)
            await gateway_process.wait_port_closed()  # intake stopped; the answer is in flight
            double.release()
            frames = await frames_until_closed(ws)
        assert frames[-1]["type"] == "done" and frames[-1]["text"] == "echo: finish me please"
        assert frames[-1]["reply_to"].endswith(":m1")
        assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
    assert gateway_process.proc is not None
    async with asyncio.timeout(drain_timeout):
        assert await gateway_process.proc.wait() == 0
    assert gateway_process.stderr.read_text() == ""
    logs = gateway_process.logs()
    events = [line["message"] for line in logs]
    assert "answered" in events and events[-1] == "stopped"
    draining = next(line for line in logs if line["message"].startswith("shutting down"))
    assert (draining["inflight"], draining["timeout_s"]) == (1, drain_timeout)
    assert events.index("answered") > events.index(draining["message"])  # answered while draining
    assert "drain timeout, unfinished messages stay in the inbox" not in events
    assert "sk-shutdown-test-key" not in gateway_process.stdout.read_text()


async def test_work_beyond_drain_timeout_is_cut_off_and_exit_is_still_0(
    gateway_process: GatewayProcess, openai_double: tuple[OpenAIDouble, str]
) -> None:
    double, url = openai_double
    double.hold = True  # never released while the gateway runs
    config = write_config(gateway_process.tmp_path, gateway_process.port, url, drain_timeout=0.5)
    await gateway_process.start("--config", str(config))
    async with aiohttp.ClientSession(headers=gateway_process.admin_headers()) as http:
        async with http.ws_connect(f"{gateway_process.url}/chat/ws?session=shutdown02") as ws:
            await send_chat(ws, "this will not finish")
            async with asyncio.timeout(10):
                await double.received.wait()
            # Bounded: the drain timeout plus closing sockets, far below aiohttp's own 60 s.
            assert await gateway_process.stopped(signal.SIGTERM, bound=10.0) == 0
            frames = await frames_until_closed(ws)
        assert [f for f in frames if f["type"] in ("done", "delta")] == []
    events = [line["message"] for line in gateway_process.logs()]
    assert "drain timeout, unfinished messages stay in the inbox" in events
    assert events[-1] == "stopped"


async def test_fresh_start_with_shipped_config_answers_by_echo(gateway_process: GatewayProcess) -> None:
    """`python run.py` with no arguments from a clean directory: the shipped config, echo model."""
    port = gateway_process.port
    await gateway_process.start(
        env={"BOTGATE_SERVER__HOST": "127.0.0.1", "BOTGATE_SERVER__PORT": str(port)}
    )
    async with aiohttp.ClientSession(headers=gateway_process.admin_headers()) as http:
        async with http.get(f"{gateway_process.url}/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "alive"})
        async with http.get(f"{gateway_process.url}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["ready"] is True
            assert set(body["not_configured"]) == {"dingtalk", "feishu", "wecom"}
        async with http.ws_connect(f"{gateway_process.url}/chat/ws?session=freshstart") as ws:
            await send_chat(ws, "hello echo")
            async with asyncio.timeout(10):
                while (frame := await ws.receive_json())["type"] != "done":
                    pass
        assert frame["text"].startswith("> hello echo")
        assert "尚未配置模型" in frame["text"]  # "no model is configured": a browser naming no language gets Chinese
    assert await gateway_process.stopped(signal.SIGINT, bound=10.0) == 0
    assert gateway_process.stderr.read_text() == ""
    starting = gateway_process.logs()[0]
    assert starting["message"] == "starting" and starting["model"] == "echo"
    assert starting["config"] == str(ROOT / "config.toml")
