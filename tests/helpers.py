"""Helpers shared by the test modules, so that no test module imports from another: the web chat,
readiness, metrics, store messages, and a gateway whose DingTalk channel points at the DingTalk double."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.i18n import translator
from gateway.keys import CHANNELS, METRICS
from gateway.messages import ConversationKind, InboundMessage
from handlers.dingtalk import DingTalkAdapter
from tests.conftest import make_config
from tests.doubles.dingtalk import DingTalkDouble


# -- the web chat and the HTTP endpoints -----------------------------------------------------------
async def chat(client: Any, ws: Any, text: str, msg_id: str) -> list[dict[str, Any]]:
    """Send one message and collect frames until its final reply."""
    await ws.send_str(orjson.dumps({"type": "message", "id": msg_id, "text": text}).decode())
    frames = []
    async with asyncio.timeout(10):
        while True:
            frame = orjson.loads((await ws.receive()).data)
            frames.append(frame)
            if frame["type"] in ("done", "notice", "error", "busy"):
                return frames


async def hello(ws: Any) -> tuple[str, str]:
    """Read a web chat socket's `hello`: (the session value to hand back, the conversation id that
    message ids, `reply_to` and conversation keys carry)."""
    frame = orjson.loads((await ws.receive()).data)
    assert frame["type"] == "hello", frame
    session = str(frame["session"])
    return session, session.partition(".")[0]


async def webchat_answer(http: aiohttp.ClientSession, url: str, session: str) -> str:
    """One web chat message to a gateway at `url` (e.g. a `python run.py` process): its answer."""
    async with http.ws_connect(f"{url}/chat/ws?session={session}") as ws:
        await ws.receive()
        await ws.send_json({"type": "message", "id": "1", "text": f"hi from {session}"})
        async with asyncio.timeout(20):
            while (frame := await ws.receive_json())["type"] not in ("done", "notice", "error"):
                pass
    return str(frame["text"])


def notice_start(msgid: str, locale: str = "zh-CN", **fields: object) -> str:
    """A notice of `msgid` worded in `locale` up to its `{request_id}` (which a test does not know):
    what the notice the user gets starts with. zh-CN: DingTalk's and Feishu's default."""
    return translator(locale)(msgid, request_id="\0", **fields).partition("\0")[0]


async def readiness(client: Any) -> tuple[int, dict[str, Any]]:
    """`GET /readyz`: its status and JSON body."""
    resp = await client.get("/readyz")
    return resp.status, await resp.json()


def metric(text: str, name: str) -> float:
    """A sample from a `/metrics` page, `name` written as exposed (labels included); 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def sample(app: web.Application, name: str, **labels: str) -> float:
    """A sample of the app's metrics registry (e.g. `botgate_reconnects_total`); 0 if absent."""
    return app[METRICS].registry.get_sample_value(name, labels) or 0.0


# -- the store -----------------------------------------------------------------------------------
def msg(n: int, conversation: str = "c1", **extra: Any) -> InboundMessage:
    """Inbound message number `n` of a DingTalk group conversation."""
    return InboundMessage(
        platform="dingtalk",
        transport="stream",
        conversation_id=conversation,
        conversation_kind=ConversationKind.GROUP,
        sender_id="u1",
        sender_name="Ann",
        text=f"message {n}",
        mentioned=True,
        message_id=f"m{n}",
        **extra,
    )


# -- a gateway against the DingTalk double ----------------------------------------------------------
@dataclass
class DingTalkEnv:
    double: DingTalkDouble
    client: TestClient[web.Request, web.Application]

    @property
    def adapter(self) -> DingTalkAdapter:
        adapter = self.client.app[CHANNELS]["dingtalk/default"]
        assert isinstance(adapter, DingTalkAdapter)
        return adapter

    def sample(self, name: str, **labels: str) -> float:
        """A sample of the gateway's metrics registry (e.g. `botgate_reconnects_total`); 0 if absent."""
        return sample(self.client.app, name, **labels)

    def dropped(self, reason: str) -> float:
        return self.sample("botgate_messages_dropped_total", platform="dingtalk", reason=reason)

    def api_calls(self, endpoint: str) -> float:
        return self.sample("botgate_platform_api_calls_total", platform="dingtalk", endpoint=endpoint)

    async def connected(self) -> None:
        """Both ends agree the stream is up: the double has the socket, the loop said connected()."""
        await self.double.wait_for(lambda: self.double.connected)
        async with asyncio.timeout(10):
            await self.adapter.wait_connected()

    async def answers(self, count: int) -> list[dict[str, Any]]:
        """Wait until `count` sessionWebhook messages arrived; returns them all."""
        await self.double.wait_for(lambda: len(self.double.session_posts) >= count)
        return self.double.session_posts


async def serve(aiohttp_server: Callable[..., Any], double: DingTalkDouble) -> None:
    """Serve the double on a random loopback port; its sessionWebhooks point there."""
    server = await aiohttp_server(double.app(), host="127.0.0.1")
    double.base = str(server.make_url("")).rstrip("/")


def dingtalk_section(double: DingTalkDouble) -> dict[str, Any]:
    """The `[dingtalk]` settings of a gateway talking to the (served) double."""
    return {
        "enabled": True,
        "client_id": double.client_id,
        "client_secret": double.client_secret,
        "api_base": double.base,
        "oapi_base": double.base,
        "reconnect_delay": 0.05,
    }


async def start(
    aiohttp_server: Callable[..., Any],
    gateway: Callable[..., Any],
    *,
    model_url: str = "",
    double: DingTalkDouble | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    connect: bool = True,
    **dingtalk: Any,
) -> DingTalkEnv:
    """A double on a random port and a gateway configured against it (model: the OpenAI double or echo)."""
    double = double or DingTalkDouble()
    sections = dict(sections or {})
    model = {"base_url": model_url} if model_url else {}
    model.update(sections.pop("model", {}))
    await serve(aiohttp_server, double)
    config = make_config(
        dingtalk={**dingtalk_section(double), **dingtalk},
        model=model,
        cache={"enabled": False},
        **sections,
    )
    env = DingTalkEnv(double, await gateway(config))
    if connect and config.dingtalk.mode != "webhook":
        await env.connected()
    return env


async def ping_round_trip(env: DingTalkEnv) -> None:
    """Frames are read in order, so once a later ping is ACKed every earlier frame was read; once
    the session has settled, every message among them was submitted (and ACKed if accepted)."""
    frame_id = await env.double.system("ping", {"opaque": "barrier"})
    await env.double.wait_for(lambda: env.double.acked(frame_id) is not None)
    async with asyncio.timeout(10):
        await env.adapter.settled()
