"""The faults of tests/test_faults.py one after another on a real `python run.py` process, where a
crash, a dead task or a traceback cannot hide: the process answers through all of them, is ready at
the end, logs no unhandled error and stops cleanly (exit 0)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from gateway.answer import MODEL_DOWN
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.openai import OpenAIDouble
from tests.helpers import notice_start
from tests.process import GatewayProcess
from tests.redisd import listen_port


async def ask(double: DingTalkDouble, text: str) -> str:
    before = len(double.session_posts)
    await double.push(double.message(text, staff_id="ops"))
    await double.wait_for(lambda: len(double.session_posts) > before, timeout=20)
    return str(double.session_posts[-1]["markdown"]["text"])


async def test_one_process_survives_every_fault(
    aiohttp_server: Any, spawn_gateway: Callable[..., Any]
) -> None:
    double = DingTalkDouble()
    double.base = str((await aiohttp_server(double.app(), host="127.0.0.1")).make_url("")).rstrip("/")
    model_port = listen_port()  # the model is down at first
    gw: GatewayProcess = spawn_gateway(
        f"""
[dingtalk]
enabled = true
client_id = "{double.client_id}"
api_base = "{double.base}"
oapi_base = "{double.base}"
reconnect_delay = 0.05
[model]
base_url = "http://127.0.0.1:{model_port}/v1"
max_retries = 0
[cache]
enabled = false
""",
        env={"BOTGATE_DINGTALK__CLIENT_SECRET": double.client_secret},
        start=False,
    )
    await asyncio.to_thread(gw.start)
    await double.wait_for(lambda: double.connected, timeout=20)

    assert (await ask(double, "model down?")).startswith(notice_start(MODEL_DOWN, reason="connection"))
    await aiohttp_server(OpenAIDouble().app(), host="127.0.0.1", port=model_port)
    assert await ask(double, "model back?") == "echo: model back?"

    for n in range(2, 5):
        await double.drop()
        await double.wait_for(lambda n=n: double.connections == n and double.connected)  # type: ignore[misc]
    double.drop_on_connect = 2
    await double.drop()
    await double.wait_for(lambda: double.connections == 7 and double.connected)
    assert await ask(double, "after the drops") == "echo: after the drops"

    double.send_failures = 2
    assert await ask(double, "sends failing") == "echo: sends failing"
    assert double.failed_sends == 2

    async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/readyz") as resp:
        assert resp.status == 200, await resp.text()
    assert gw.proc is not None and gw.proc.poll() is None
    assert await asyncio.to_thread(gw.stop) == 0
    assert gw.stderr() == ""
    lines = gw.log_lines()
    # Tracebacks (an "exception" field) only come from errors nobody handled on purpose.
    bad = [line for line in lines if line["level"] == "CRITICAL" or "exception" in line]
    assert bad == [], bad
    events = [line["message"] for line in lines]
    assert events.count("connected") == 7 and "stopped" in events
