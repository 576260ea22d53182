"""`kill -9` in the middle of a DingTalk Stream burst, then a restart on the same state: every
message the gateway ACKed is answered, DingTalk's redeliveries of the others are answered once, and
no message is answered twice.

The gateway is a real `python run.py` process; the DingTalk double (Stream + sessionWebhooks) and
the model double run in the test process. The model is metered, so the test knows where every
answer is when it pulls the plug: each conversation has its last answer delivered and recorded
and waits on the model, the inbox holds the rest, and frames are still arriving.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.store import RedisStore, SqliteStore, Store
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.openai import OpenAIDouble
from tests.helpers import dingtalk_section, serve
from tests.process import GatewayProcess, env_for

CONVERSATIONS = 5
FIRST = 8  # messages per conversation ACKed before the crash
ANSWERED = 10  # of those, answered before the crash (two rounds of five)
MIDFLIGHT = 5  # a third burst, one per conversation, arriving while the gateway is killed
UNREAD = 5  # and a fourth that it never reads (it is stopped, then killed)


def session_of(body: dict[str, Any]) -> str:
    return str(parse_qs(urlsplit(body["sessionWebhook"]).query)["session"][0])


class Burst:
    """The messages pushed, and which answer belongs to which (each has its own sessionWebhook)."""

    def __init__(self, double: DingTalkDouble) -> None:
        self.double = double
        self.bodies: dict[str, dict[str, Any]] = {}  # msgId -> body, in push order
        self._by_session: dict[str, str] = {}

    async def push(self, rounds: range, conversations: range = range(CONVERSATIONS)) -> None:
        for i in rounds:
            for c in conversations:
                body = self.double.message(f"c{c} m{i}", staff_id=f"u{c}")
                self.bodies[body["msgId"]] = body
                self._by_session[session_of(body)] = body["msgId"]
                await self.double.push(body)

    def answers(self) -> Counter[str]:
        """msgId -> how many answers it got."""
        return Counter(self._by_session[post["session"]] for post in self.double.session_posts)

    def answered_in_order(self, msg_ids: set[str]) -> bool:
        """Within each conversation, the answers to `msg_ids` came in push order."""
        order = [self._by_session[p["session"]] for p in self.double.session_posts]
        for c in range(CONVERSATIONS):
            pushed = [m for m, b in self.bodies.items() if m in msg_ids and b["senderStaffId"] == f"u{c}"]
            if [m for m in dict.fromkeys(order) if m in pushed] != pushed:
                return False
        return True


@pytest.fixture(params=["sqlite", "sqlite-process", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    """The [store] section: SQLite at either `durability` (both survive kill -9), or Redis."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return {"url": url}
    durability = "process" if request.param == "sqlite-process" else "power"
    return {"url": f"sqlite:///{tmp_path}/state/botgate.sqlite3", "durability": durability}


async def pending(store_url: str, tmp_path: Path) -> list[str]:
    """What the stopped gateway left in its inbox."""
    store: Store = RedisStore(store_url) if store_url.startswith("redis") else SqliteStore(
        tmp_path / "state" / "botgate.sqlite3"
    )
    await store.open()
    try:
        return [m.message_id for m in await store.inbox_pending()]
    finally:
        await store.close()


async def test_kill_9_mid_burst_then_restart_answers_every_acked_message_once(
    aiohttp_server: Any,
    openai_double: tuple[OpenAIDouble, str],
    spawn_gateway: Callable[..., GatewayProcess],
    store: dict[str, object],
    tmp_path: Path,
) -> None:
    double = DingTalkDouble()
    await serve(aiohttp_server, double)
    model, model_url = openai_double
    model.metered = True
    env = env_for(
        {
            "dingtalk": dingtalk_section(double),
            "model": {"base_url": model_url, "max_retries": 0},
            "store": store,
            "cache": {"enabled": False},
            # A dead instance's conversation leases (Redis) block the restart this long.
            "dispatcher": {"lease_ttl": 1.0, "drain_timeout": 5.0},
        }
    )
    gateway = spawn_gateway(env=env, start=False)
    await asyncio.to_thread(gateway.start)  # the doubles it talks to run in this loop
    await double.wait_for(lambda: double.open_connections == [1], timeout=15)

    burst = Burst(double)
    await burst.push(range(FIRST))
    await double.wait_for(lambda: len(double.acked_messages()) == FIRST * CONVERSATIONS)
    model.allow(ANSWERED)
    await double.wait_for(lambda: len(double.session_posts) == ANSWERED)
    # One model request more than answers in every conversation: each worker has recorded its
    # last answer and waits on the model, so no answer sits between delivery and record.
    await model.wait_requests(ANSWERED + CONVERSATIONS)

    await burst.push(range(FIRST, FIRST + 1))
    await double.wait_for(lambda: len(double.acked_messages()) > FIRST * CONVERSATIONS)
    gateway.signal(signal.SIGSTOP)  # mid-burst: whatever it has not ACKed by now, it never will
    await burst.push(range(FIRST + 1, FIRST + 2))
    gateway.kill()
    await double.wait_for(lambda: not double.connected)
    acked = double.acked_messages()
    answered_before = set(burst.answers())
    assert len(answered_before) == ANSWERED
    assert len(acked) < len(burst.bodies)  # the last burst, at least, was never ACKed

    model.release()
    gateway = spawn_gateway(env=env, start=False)  # same store
    await asyncio.to_thread(gateway.start)
    await double.wait_for(lambda: double.open_connections == [2], timeout=15)
    redelivered = await double.redeliver()
    assert set(redelivered) == set(burst.bodies) - acked
    await double.wait_for(lambda: set(burst.bodies) <= double.acked_messages())
    await double.wait_for(lambda: set(burst.answers()) == set(burst.bodies), timeout=15)
    # Anything queued twice would be answered before a later message of its conversation.
    await burst.push(range(FIRST + 2, FIRST + 3))
    await double.wait_for(lambda: set(burst.answers()) == set(burst.bodies))
    assert await asyncio.to_thread(gateway.stop) == 0

    answers = burst.answers()
    before = len(burst.bodies) - CONVERSATIONS  # without the last round, pushed after the restart
    duplicates = sum(n - 1 for n in answers.values())
    resumes = [e for e in gateway.log_lines() if e["message"] == "resumed unanswered messages"]
    resumed = sum(int(str(e["count"])) for e in resumes)
    # The numbers docs/state.md quotes (`pytest -s` or `-rP` shows them).
    print(
        f"crash: {before} messages, {len(acked)} ACKed before kill -9, {ANSWERED} answered before it,"
        f" {resumed} resumed from the inbox, {len(redelivered)} redelivered, {duplicates} duplicates"
    )
    assert duplicates == 0, f"{duplicates} answered twice: {[m for m, n in answers.items() if n > 1]}"
    assert resumed >= len(acked) - ANSWERED  # the ACKed, unanswered ones came back from the inbox
    assert burst.answered_in_order(acked)
    assert double.calls("/v1.0/robot/oToMessages/batchSend") == []  # sessionWebhooks still valid
    assert await pending(str(store["url"]), tmp_path) == []
