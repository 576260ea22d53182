"""The store fails while a gateway with a DingTalk Stream runs: readiness flips and recovers; what
arrives meanwhile is held in memory and not ACKed; once the store is back it is answered, once and
in its conversation's order, whether DingTalk redelivers it (the redelivery is then ACKed as a
duplicate) or not (robot messages are fire-and-forget, per DingTalk's developer wiki); and nothing
ACKed before the outage is lost or answered twice."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gateway.keys import DISPATCHER, STORE
from gateway.store import SqliteStore
from tests.doubles.openai import OpenAIDouble
from tests.helpers import DingTalkEnv, ping_round_trip, readiness, start
from tests.redisd import RedisServer


async def ready_again(env: DingTalkEnv) -> None:
    """Readiness has no event to await: ask until it is back (bounded)."""
    for _ in range(200):
        if (await readiness(env.client))[0] == 200:
            return
        await asyncio.sleep(0.05)
    pytest.fail("not ready again within 10 s")


class LogSeen(logging.Handler):
    """Sets `seen` once a record whose message starts with `prefix` is logged."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.seen.set()


def answer_counts(env: DingTalkEnv) -> Counter[str]:
    return Counter(post["markdown"]["text"] for post in env.double.session_posts)


@pytest.mark.redis
async def test_redis_outage_under_the_stream_loses_nothing_and_answers_once(
    aiohttp_server: Any,
    gateway: Any,
    openai_double: tuple[OpenAIDouble, str],
    tmp_path: Path,
) -> None:
    model, url = openai_double
    model.hold = True
    server = RedisServer(tmp_path / "redis", persist=True)
    await asyncio.to_thread(server.start)
    try:
        env = await start(
            aiohttp_server,
            gateway,
            model_url=url,
            sections={"store": {"url": server.url}, "dispatcher": {"lease_ttl": 1.0}},
        )
        double = env.double
        # ACKed before the outage: one being answered (the model holds it), one queued behind it.
        for text in ("before", "queued"):
            frame = await double.push(double.message(text, staff_id="alice"))
            await double.wait_acked(frame)
        acked_before = double.acked_messages()
        await model.wait_requests(1)

        await asyncio.to_thread(server.stop)
        status, body = await readiness(env.client)
        assert status == 503
        assert body["reason"].startswith(f"store unavailable: redis {server.url}: unreachable")
        during = [
            double.message("during one", staff_id="bob"),
            double.message("during two", staff_id="alice"),
        ]
        for message in during:
            await double.push(message)
        await ping_round_trip(env)  # frames are served in order: both were handled, neither ACKed
        assert double.acked_messages() == acked_before
        unrecorded = LogSeen("could not mark message answered")
        logging.getLogger("gateway.dispatcher").addHandler(unrecorded)
        model.release()  # the held answer goes out while Redis is down...
        await env.answers(1)
        async with asyncio.timeout(10):  # ...and cannot be recorded yet
            await unrecorded.seen.wait()
        logging.getLogger("gateway.dispatcher").removeHandler(unrecorded)
        assert sorted(await double.redeliver()) == sorted(m["msgId"] for m in during)
        await ping_round_trip(env)  # DingTalk's redelivery during the outage: still not ACKed
        assert double.acked_messages() == acked_before

        await asyncio.to_thread(server.start)  # with its data (AOF)
        await ready_again(env)
        await double.redeliver()
        await double.wait_for(lambda: len(double.acked_messages()) == 4)
        await double.wait_for(lambda: len(double.session_posts) == 4)
        # A late second answer would come before the next answer of its conversation.
        for who in ("alice", "bob"):
            await double.push(double.message(f"after {who}", staff_id=who))
        await double.wait_for(lambda: len(double.session_posts) == 6)
        texts = ["before", "queued", "during one", "during two", "after alice", "after bob"]
        assert answer_counts(env) == Counter(f"echo: {t}" for t in texts)
        alice = [text for text in (p["markdown"]["text"] for p in double.session_posts) if "one" not in text]
        assert alice[:3] == ["echo: before", "echo: queued", "echo: during two"]  # in order
        # ...and is recorded once Redis is back: nothing left for a restart to answer again.
        async with asyncio.timeout(10):
            await env.client.app[DISPATCHER].wait_idle()
        assert [m.text for m in await env.client.app[STORE].inbox_pending()] == []
    finally:
        server.stop()


async def test_full_disk_refuses_the_frame_and_answers_its_redelivery(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], tmp_path: Path
) -> None:
    """A real SQLITE_FULL while a message arrives: no ACK; DingTalk's redelivery once there is room
    moves the held message into the inbox and is ACKed as its duplicate; the message is answered."""
    _, url = openai_double
    sections: dict[str, dict[str, Any]] = {
        "store": {"url": f"sqlite:///{tmp_path}/s.sqlite3"},
        "limits": {"max_message_chars": 0},
    }
    env = await start(aiohttp_server, gateway, model_url=url, sections=sections)  # no cap: a big message
    store = env.client.app[STORE]
    assert isinstance(store, SqliteStore)
    pages = await store.db.write(lambda conn, now: conn.execute("PRAGMA page_count").fetchone()[0])
    await store.db.write(lambda conn, now: conn.execute(f"PRAGMA max_page_count = {pages}"))
    big = env.double.message("long question " + "x" * 20_000)  # its dedup claim alone would fit
    await env.double.push(big)
    await ping_round_trip(env)
    assert env.double.acked_messages() == set()
    status, body = await readiness(env.client)
    assert status == 503 and "database or disk is full" in body["reason"]

    await store.db.write(lambda conn, now: conn.execute("PRAGMA max_page_count = 1073741823"))
    await ready_again(env)
    assert await env.double.redeliver() == [big["msgId"]]
    await env.double.wait_for(lambda: env.double.acked_messages() == {big["msgId"]})
    [answer] = await env.answers(1)
    assert answer["markdown"]["text"].startswith("echo: long question x")


@pytest.mark.redis
async def test_redis_outage_without_any_redelivery_still_answers_in_order(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], tmp_path: Path
) -> None:
    """DingTalk never redelivers here (fire-and-forget): the messages that arrived while Redis was
    down are answered from memory once it is back, each conversation in order, and a message sent
    after that is answered after them."""
    _, url = openai_double
    server = RedisServer(tmp_path / "redis", persist=True)
    await asyncio.to_thread(server.start)
    try:
        env = await start(
            aiohttp_server,
            gateway,
            model_url=url,
            sections={"store": {"url": server.url}, "dispatcher": {"lease_ttl": 1.0}},
        )
        double, dispatcher = env.double, env.client.app[DISPATCHER]
        await asyncio.to_thread(server.stop)
        held = [("alice", "one"), ("bob", "two"), ("alice", "three")]
        for who, text in held:
            await double.push(double.message(text, staff_id=who))
        await ping_round_trip(env)  # all three handled: held in memory, none ACKed
        assert double.acked_messages() == set() and double.session_posts == []
        assert dispatcher.spilled == 3
        assert env.sample("botgate_spill_total", event="spilled") == 3
        assert env.sample("botgate_spill_depth") == 3
        assert (await readiness(env.client))[0] == 503
        page = await (await env.client.get("/", headers={"Accept": "text/html"})).text()
        assert re.search(r'id="spilled"><span class="state bad">3</span>', page), "status page line"

        await asyncio.to_thread(server.start)
        await double.wait_for(lambda: len(double.session_posts) == 3)  # no redelivery asked for
        await double.push(double.message("four", staff_id="alice"))
        await double.wait_for(lambda: len(double.session_posts) == 4)
        texts = [post["markdown"]["text"] for post in double.session_posts]
        assert [t for t in texts if t != "echo: two"] == ["echo: one", "echo: three", "echo: four"]
        assert sorted(texts) == sorted(f"echo: {t}" for t in ("one", "two", "three", "four"))
        async with asyncio.timeout(10):
            await dispatcher.wait_idle()
        assert await env.client.app[STORE].inbox_pending() == [] and dispatcher.spilled == 0
        assert env.sample("botgate_spill_total", event="recovered") == 3
        assert env.sample("botgate_spill_depth") == 0
    finally:
        server.stop()
