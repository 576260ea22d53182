"""Faults survived: the model endpoint down, too slow, rate limiting or garbled; the platforms' send
APIs failing then recovering; the long connection dropped again and again; DNS failing for an
upstream; the SQLite disk full. In each, the user gets an answer or a clear notice, nothing the
gateway accepted is lost, no task dies unseen, and /readyz is ready again once the fault clears.

The gateway runs in the test's loop (a loop exception handler catches any task that dies unseen);
tests/test_faults_process.py repeats the worst of it on a real `python run.py` process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

import handlers
from gateway.answer import MODEL_DOWN
from gateway.app import create_app
from gateway.dispatcher import TIMEOUT_NOTICE
from gateway.keys import AUTH, DISPATCHER, METRICS, RESOLVER, STORE
from gateway.store import SqliteStore
from tests.conftest import make_config
from tests.doubles import feishu as fd
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu_events import message_event
from tests.doubles.openai import OpenAIDouble
from tests.helpers import DingTalkEnv, dingtalk_section, notice_start, ping_round_trip, start
from tests.redisd import listen_port


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Whatever reaches the loop's exception handler (e.g. "Task exception was never retrieved")
    fails the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    yield errors
    gc.collect()  # a dead task's exception is reported when the task is collected
    loop.set_exception_handler(previous)
    assert errors == []


async def readyz(env: DingTalkEnv) -> tuple[int, dict[str, Any]]:
    resp = await env.client.get("/readyz")
    return resp.status, await resp.json()


async def ask(env: DingTalkEnv, text: str) -> str:
    """Send a 1:1 message over the stream; the text of the one reply it gets."""
    before = len(env.double.session_posts)
    frame_id = await env.double.push(env.double.message(text))
    await env.double.wait_for(lambda: env.double.acked(frame_id) is not None)
    posts = await env.answers(before + 1)
    await env.client.app[DISPATCHER].wait_idle()
    assert len(env.double.session_posts) == before + 1  # one reply, never two
    return str(posts[-1]["markdown"]["text"])


def metric(env: DingTalkEnv, name: str, labels: dict[str, str]) -> float:
    return env.client.app[METRICS].registry.get_sample_value(name, labels) or 0.0


# -- the model -------------------------------------------------------------------------------------
async def test_model_down_then_back(aiohttp_server: Any, gateway: Any, loop_errors: Any) -> None:
    port = listen_port()  # nothing listens: connection refused
    url = f"http://127.0.0.1:{port}/v1"
    env = await start(aiohttp_server, gateway, model_url=url, sections={"model": {"max_retries": 1}})
    notice = await ask(env, "anyone there?")
    assert notice.startswith(notice_start(MODEL_DOWN, reason="connection"))  # in Chinese, by default
    assert (await readyz(env))[0] == 200  # the gateway itself is fine: it answers with notices
    model = OpenAIDouble()
    await aiohttp_server(model.app(), host="127.0.0.1", port=port)
    assert await ask(env, "and now?") == "echo: and now?"


async def test_model_slower_than_the_deadline(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], loop_errors: Any
) -> None:
    model, url = openai_double
    model.hold = True  # answers only when released
    env = await start(aiohttp_server, gateway, model_url=url, sections={"dispatcher": {"deadline": 0.5}})
    notice = await ask(env, "a hard one")
    assert notice.startswith(notice_start(TIMEOUT_NOTICE))
    model.hold = False
    model.release()
    assert await ask(env, "an easy one") == "echo: an easy one"
    assert (await readyz(env))[0] == 200


async def test_model_rate_limited_past_the_retries_gives_a_notice_then_recovers(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], loop_errors: Any
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url, sections={"model": {"max_retries": 2}})
    model.script = [429]
    assert await ask(env, "one") == "echo: one"  # a single 429 is retried unseen (Retry-After: 0)
    model.script = [429, 429, 429]  # more than the retries allow
    notice = await ask(env, "two")
    assert notice.startswith(notice_start(MODEL_DOWN, reason="rate limited"))
    assert await ask(env, "three") == "echo: three"


@pytest.mark.parametrize(("step", "reason"), [("garbage", "bad response"), ("error-event", "server error")])
async def test_model_garbage_stream_gives_a_notice_then_recovers(
    aiohttp_server: Any,
    gateway: Any,
    openai_double: tuple[OpenAIDouble, str],
    loop_errors: Any,
    step: str,
    reason: str,
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    model.script = [step]
    notice = await ask(env, "hello?")
    assert notice.startswith(notice_start(MODEL_DOWN, reason=reason))
    assert await ask(env, "hello again") == "echo: hello again"


# -- the platform ----------------------------------------------------------------------------------
async def test_send_api_failing_then_recovering(
    aiohttp_server: Any, gateway: Any, loop_errors: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    env = await start(aiohttp_server, gateway)
    ok = {"platform": "dingtalk", "outcome": "ok"}
    failed = {"platform": "dingtalk", "outcome": "failed"}

    env.double.send_failures = 2  # two 503s, then it works: retried with backoff, answered once
    assert "a blip" in await ask(env, "a blip")
    assert env.double.failed_sends == 2
    assert metric(env, "botgate_send_retries_total", {"platform": "dingtalk"}) == 2
    assert metric(env, "botgate_replies_total", ok) == 1

    env.double.send_failures = 1000  # an outage: retries are bounded, then the failure is reported
    await env.double.push(env.double.message("an outage"))
    await env.double.wait_for(lambda: metric(env, "botgate_replies_total", failed) >= 1)
    await env.client.app[DISPATCHER].wait_idle()
    # The answer and then the apology both gave up after their attempts.
    assert env.double.failed_sends == 2 + 4 + 4
    gave_up = [r.getMessage() for r in caplog.records if "giving up" in r.getMessage()]
    assert len(gave_up) == 2, gave_up
    expected = "reply failed 4 times, giving up: dingtalk session_webhook: HTTP 503"
    assert all(m.startswith(expected) for m in gave_up)
    assert (await readyz(env))[0] == 200

    env.double.send_failures = 0
    assert "after the outage" in await ask(env, "after the outage")


async def test_feishu_replies_failing_then_recovering(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], loop_errors: Any
) -> None:
    double, domain = await fd.start(aiohttp_server)
    client = await gateway(fd.config(domain, openai_double[1]))
    await double.wait_for(lambda: double.pings >= 1)
    double.fail_replies = 2  # two 500s, then it works
    frame_id = await double.push_event(message_event("through the blip", message_id="om_blip"))
    assert await double.response(frame_id) == {"code": 200}
    await double.wait_for(lambda: double.answer("om_blip") is not None)
    await client.app[DISPATCHER].wait_idle()
    assert double.answer("om_blip") == "echo: through the blip"
    assert len(double.replies_to("om_blip")) == 1  # retried, shown once
    registry = client.app[METRICS].registry
    assert registry.get_sample_value("botgate_send_retries_total", {"platform": "feishu"}) == 2


async def test_websocket_dropped_again_and_again(aiohttp_server: Any, gateway: Any, loop_errors: Any) -> None:
    env = await start(aiohttp_server, gateway)
    for n in range(2, 5):  # dropped once connected, three times in a row
        await env.double.drop()
        await env.double.wait_for(lambda n=n: env.double.connections == n)  # type: ignore[misc]
        await env.connected()
    env.double.drop_on_connect = 3  # then cut right after each handshake, three more times
    await env.double.drop()
    await env.double.wait_for(lambda: env.double.connections == 8 and env.double.connected)
    await env.connected()
    assert "still with us" in await ask(env, "still with us?")
    assert env.adapter.status().reconnects == 7
    assert metric(env, "botgate_reconnects_total", {"platform": "dingtalk"}) == 7
    assert (await readyz(env))[0] == 200
    assert env.double.ack_errors == []


# -- DNS -------------------------------------------------------------------------------------------
class Resolver(AbstractResolver):
    """Resolves `names` to 127.0.0.1 unless they are `broken` (then: "Name or service not known",
    as getaddrinfo says). No DNS server is ever asked; other names fail too."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.broken = set(names)
        self.lookups: list[str] = []
        self._looked_up = asyncio.Condition()

    async def wait_lookups(self, host: str, count: int) -> None:
        async with asyncio.timeout(10), self._looked_up:
            await self._looked_up.wait_for(lambda: self.lookups.count(host) >= count)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        async with self._looked_up:
            self._looked_up.notify_all()
        if host not in self.names or host in self.broken:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        address = ResolveResult(
            hostname=host,
            host="127.0.0.1",
            port=port,
            family=socket.AF_INET,
            proto=0,
            flags=socket.AI_NUMERICHOST,
        )
        return [address]

    async def close(self) -> None:
        pass


async def test_dns_failure_for_the_platform_and_the_model(
    aiohttp_server: Any, aiohttp_client: Any, loop_errors: Any
) -> None:
    dingtalk_name, model_name = "dingtalk.botgate-nonexistent.invalid", "model.botgate-nonexistent.invalid"
    resolver = Resolver({dingtalk_name, model_name})
    double, model = DingTalkDouble(), OpenAIDouble()
    dingtalk_port = (await aiohttp_server(double.app(), host="127.0.0.1")).port
    model_port = (await aiohttp_server(model.app(), host="127.0.0.1")).port
    double.base = f"http://{dingtalk_name}:{dingtalk_port}"  # its sessionWebhooks use the name too
    config = make_config(
        dingtalk=dingtalk_section(double),
        model={"base_url": f"http://{model_name}:{model_port}/v1", "max_retries": 0},
    )
    app = create_app(config, [handlers.setup])
    app[RESOLVER] = resolver
    admin = {"Authorization": f"Bearer {app[AUTH].login_token.current()}"}  # /readyz details: the admin's
    env = DingTalkEnv(double, await aiohttp_client(TestServer(app, host="127.0.0.1"), headers=admin))

    await resolver.wait_lookups(dingtalk_name, 2)  # it keeps trying (with backoff)
    status, body = await readyz(env)
    assert status == 503 and "dingtalk/default reconnecting" in body["reason"]
    assert "ClientConnectorDNSError" in body["reason"] and "Name or service not known" in body["reason"]

    resolver.broken.discard(dingtalk_name)  # the platform resolves again; the model does not yet
    await env.connected()
    assert (await readyz(env))[0] == 200
    notice = await ask(env, "first")
    assert notice.startswith(notice_start(MODEL_DOWN, reason="connection"))

    resolver.broken.discard(model_name)
    assert await ask(env, "second") == "echo: second"


# -- the store -------------------------------------------------------------------------------------
async def fill_the_disk(env: DingTalkEnv) -> tuple[SqliteStore, dict[str, Any]]:
    """Cap the file at its size (a real SQLITE_FULL, as on a full disk), push a message that needs
    new pages; returns the store and the message, which must not have been ACKed."""
    store = env.client.app[STORE]
    assert isinstance(store, SqliteStore)
    pages = await store.db.write(lambda conn, now: conn.execute("PRAGMA page_count").fetchone()[0])
    await store.db.write(lambda conn, now: conn.execute(f"PRAGMA max_page_count = {pages}"))
    body = env.double.message("long question " + "x" * 8000)
    frame_id = await env.double.push(body)
    await ping_round_trip(env)
    assert env.double.acked(frame_id) is None  # held in memory, not ACKed (a redelivery may come)
    status, ready = await readyz(env)
    assert status == 503 and "database or disk is full" in ready["reason"]
    await store.db.write(lambda conn, now: conn.execute("PRAGMA max_page_count = 1073741823"))  # room again
    assert (await readyz(env))[0] == 200
    return store, body


async def test_disk_full_message_is_held_and_answered_once_there_is_room(
    aiohttp_server: Any, gateway: Any, tmp_path: Path, loop_errors: Any
) -> None:
    """No redelivery comes (DingTalk's robot messages are fire-and-forget): the message held in
    memory while the disk was full is answered once there is room, before the next one."""
    sections: dict[str, dict[str, Any]] = {
        "store": {"url": f"sqlite:///{tmp_path}/bot.sqlite3"},
        "limits": {"max_message_chars": 0},
    }
    env = await start(aiohttp_server, gateway, sections=sections)  # no cap: fill_the_disk sends a big message
    _, body = await fill_the_disk(env)
    await env.double.wait_for(lambda: env.double.session_posts)
    await env.client.app[DISPATCHER].wait_idle()
    posts = env.double.session_posts  # a long echo, so several parts, all of one answer
    assert {p["session"] for p in posts} == {body["sessionWebhook"].partition("session=")[2]}
    assert "after the cleanup" in await ask(env, "after the cleanup")


async def test_disk_full_message_is_answered_when_redelivered(
    aiohttp_server: Any, gateway: Any, tmp_path: Path, loop_errors: Any
) -> None:
    sections: dict[str, dict[str, Any]] = {
        "store": {"url": f"sqlite:///{tmp_path}/bot.sqlite3"},
        "limits": {"max_message_chars": 0},
    }
    env = await start(aiohttp_server, gateway, sections=sections)  # no cap: fill_the_disk sends a big message
    _, body = await fill_the_disk(env)
    redelivery = await env.double.push(body)  # DingTalk's redelivery: same msgId, new frame id
    await env.double.wait_for(lambda: env.double.acked(redelivery) is not None)
    await env.client.app[DISPATCHER].wait_idle()  # accepted = queued before the ACK went out
    posts = env.double.session_posts  # a long echo, so several parts, all of one answer
    assert posts and {p["session"] for p in posts} == {body["sessionWebhook"].partition("session=")[2]}
    assert "long question" in posts[0]["markdown"]["text"]
