"""Admin API: status snapshot, reset a conversation, reconnect a channel, reload the config (API and
SIGHUP on a real `run.py`), all behind the admin login."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.channel import ChannelState, ChannelStatus
from gateway.config import load
from gateway.keys import CHANNELS, LIVE
from gateway.messages import Attachment, InboundMessage, Reply
from tests.conftest import make_config
from tests.doubles.openai import OpenAIDouble
from tests.helpers import chat, hello, webchat_answer
from tests.process import GatewayProcess


class ManualChannel:
    """A channel whose connection the test can see being dropped and re-made."""

    platform = "manual"

    def __init__(self) -> None:
        self.reconnects = 0

    def status(self) -> ChannelStatus:
        return ChannelStatus(self.platform, ChannelState.CONNECTED, reconnects=self.reconnects)

    async def send(self, reply: Reply) -> None:
        return None

    async def open_stream(self, message: InboundMessage) -> None:
        return None

    async def fetch(self, message: InboundMessage, attachment: Attachment) -> tuple[bytes, str]:
        raise NotImplementedError

    async def reconnect(self) -> None:
        self.reconnects += 1


async def post(client: Any, path: str, body: object = None, **headers: str) -> tuple[int, Any]:
    resp = await client.post(
        path,
        data=orjson.dumps(body if body is not None else {}),
        headers={"Content-Type": "application/json", **headers},
    )
    return resp.status, await resp.json()


async def test_reset_a_conversation(gateway: Any, openai_double: Any) -> None:
    double, url = openai_double
    client = await gateway(make_config(model={"base_url": url}, cache={"enabled": False}))
    async with client.ws_connect("/chat/ws") as ws:
        _, conversation = await hello(ws)
        await chat(client, ws, "remember 42", "a")
        status, body = await post(
            client, "/api/conversations/reset", {"conversation": f"web:{conversation}"}
        )
        assert (status, body) == (200, {"reset": f"web:{conversation}"})
        await chat(client, ws, "what number?", "b")
    assert [m["content"] for m in double.requests[-1]["messages"][1:]] == ["what number?"]
    for bad in (
        {},
        {"conversation": 5},
        {"conversation": "no-platform"},
        [1],
        {"conversation": "x" * 600},
    ):
        status, body = await post(client, "/api/conversations/reset", bad)
        assert status == 400 and "conversation" in body["error"], bad
    resp = await client.post(
        "/api/conversations/reset", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400


async def test_reconnect_a_channel(gateway: Any) -> None:
    channel = ManualChannel()
    client = await gateway(make_config())
    client.server.app[CHANNELS][channel.platform] = channel
    status, body = await post(client, "/api/channels/manual/reconnect")
    assert (status, body) == (200, {"platform": "manual", "bot": "default", "state": "connected"})
    assert channel.reconnects == 1
    status, body = await post(client, "/api/channels/nope/reconnect")
    assert status == 404 and body["channels"] == ["manual", "web/default"]
    snapshot = orjson.loads(await (await client.get("/api/status")).read())
    assert {c["platform"]: c["reconnects"] for c in snapshot["channels"]}["manual"] == 1


def write_config(
    path: Path,
    model_url: str,
    answer_port: int = 18789,
    level: str = "INFO",
    password: str = "first-password",
    extra: str = "",
) -> None:
    path.write_text(
        f"""
[server]
port = {answer_port}
[store]
url = "memory://"
[model]
base_url = "{model_url}"
max_retries = 0
[cache]
enabled = false
[admin]
password = "{password}"
jwt_secret = "reload-test-secret-of-at-least-32-bytes"
[log]
level = "{level}"
{extra}
"""
    )


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture
async def two_models(aiohttp_server: Any) -> tuple[str, str]:
    urls = []
    for answer in ("from model A", "from model B"):
        server = await aiohttp_server(OpenAIDouble(answer=answer).app())
        urls.append(str(server.make_url("/v1")))
    return urls[0], urls[1]


async def test_reload_applies_live_settings_and_reports_restarts(
    gateway: Any, two_models: tuple[str, str], tmp_path: Path, restore_logging: None
) -> None:
    path = tmp_path / "config.toml"
    write_config(path, two_models[0])
    client = await gateway(load(path, env={}))
    token = (await (await client.post("/login", json={"password": "first-password"})).json())[
        "token"
    ]
    bearer = {"Authorization": f"Bearer {token}"}
    async with client.ws_connect("/chat/ws?session=reloadsession1", headers=bearer) as ws:
        await ws.receive()
        assert (await chat(client, ws, "hi", "a"))[-1]["text"] == "from model A"

        write_config(
            path,
            two_models[1],
            answer_port=18790,
            level="DEBUG",
            extra="[dispatcher]\nmax_queue = 5",
        )
        status, report = await post(client, "/api/reload", **bearer)
        assert status == 200
        assert report == {
            "source": str(path),
            "applied": ["model.base_url", "log.level"],
            "needs_restart": ["server.port", "dispatcher.max_queue"],
        }
        assert (await chat(client, ws, "hi again", "b"))[-1]["text"] == "from model B"
    assert logging.getLogger().level == logging.DEBUG
    snapshot = orjson.loads(await (await client.get("/api/status", headers=bearer)).read())
    assert snapshot["config"]["needs_restart"] == ["server.port", "dispatcher.max_queue"]
    assert snapshot["config"]["settings"]["model"]["base_url"] == two_models[1]

    # A broken file is refused with the key named; the running config stays.
    path.write_text('[model]\ntemperature = "hot"\n')
    status, body = await post(client, "/api/reload", **bearer)
    assert status == 400 and "model.temperature" in body["error"]
    assert client.server.app[LIVE].config.model.base_url == two_models[1]

    # A new password is live at once: old sessions end, the new password logs in.
    write_config(path, two_models[1], password="second-password")
    assert (await post(client, "/api/reload", **bearer))[0] == 200
    resp = await client.get("/api/status", headers=bearer)
    assert (
        resp.status == 401
        and (await resp.json())["error"] == "token was issued for another password"
    )
    assert (await client.post("/login", json={"password": "second-password"})).status == 200


async def test_sighup_reloads_the_running_process(
    spawn_gateway: Callable[..., GatewayProcess], two_models: tuple[str, str]
) -> None:
    """`systemctl reload` on a real `python run.py`: the next answer comes from the new model."""
    first = f'[model]\nbase_url = "{two_models[0]}"\n[store]\nurl = "memory://"\n'
    gw = spawn_gateway(first)
    async with aiohttp.ClientSession(headers=gw.admin_headers()) as http:
        assert await webchat_answer(http, gw.url, "sighupsession1") == "from model A"
        gw.config_path.write_text(first.replace(two_models[0], two_models[1]))
        gw.signal(signal.SIGHUP)
        await gw.notify.await_for("RELOADING=1")
        assert (await gw.notify.areceive())[0] == "READY=1"
        assert await webchat_answer(http, gw.url, "sighupsession2") == "from model B"
        status = await (await http.get(f"{gw.url}/api/status")).json()
    assert status["config"]["settings"]["model"]["base_url"] == two_models[1]
    assert await asyncio.to_thread(gw.stop) == 0


async def test_reload_without_a_config_file_says_so(gateway: Any) -> None:
    client = await gateway(make_config())
    status, body = await post(client, "/api/reload")
    assert status == 400 and "not a file" in body["error"]
