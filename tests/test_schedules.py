"""Scheduled posts (`[[schedules]]`): due times (cron in the schedule's zone, DST included), exactly
once per due time with two instances on one Redis, catch-up after downtime (the last missed run
once, never a backlog; none with catch_up off or for a brand-new schedule), prompt schedules (the
agent's answer posted; a model failure recorded, nothing posted), reload adding and removing one,
and the status page and /api/schedules. Posts go through the outbox to the DingTalk double's
robot API (`groupMessages/send`, `oToMessages/batchSend`).

Time is the tests': the scheduler's clock (`app[SCHEDULE_CLOCK]`) is a `StepClock` the test moves;
no test waits for a real minute."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import handlers
from gateway.app import create_app
from gateway.config import Config, ScheduleConfig, build, load
from gateway.keys import AUTH, OUTBOX, SCHEDULE_CLOCK, STORE
from gateway.schedules import due_key, last_due, next_due
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.openai import OpenAIDouble
from tests.helpers import dingtalk_section, sample, serve

Client = TestClient[web.Request, web.Application]

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")
GROUP_SEND = "/v1.0/robot/groupMessages/send"
DIRECT_SEND = "/v1.0/robot/oToMessages/batchSend"


def at(zone: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=zone).timestamp()


def local(zone: ZoneInfo, ts: float | None) -> str:
    assert ts is not None
    return datetime.fromtimestamp(ts, zone).strftime("%Y-%m-%d %H:%M %z")


def schedule(cron: str, timezone: str = "Asia/Shanghai") -> ScheduleConfig:
    return ScheduleConfig("s", cron, "dingtalk", conversation="cid", text="x", timezone=timezone)


# -- due times -------------------------------------------------------------------------------------
def test_next_due_is_in_the_schedules_zone() -> None:
    workdays = schedule("0 9 * * 1-5")  # 09:00 Shanghai time on workdays
    friday = at(SHANGHAI, 2026, 3, 6, 9, 0)
    assert local(SHANGHAI, next_due(workdays, friday)) == "2026-03-09 09:00 +0800"  # strictly after: Monday
    assert local(SHANGHAI, next_due(workdays, friday - 1)) == "2026-03-06 09:00 +0800"
    assert next_due(workdays, friday - 1) == at(ZoneInfo("UTC"), 2026, 3, 6, 1, 0)
    assert local(SHANGHAI, last_due(workdays, friday)) == "2026-03-06 09:00 +0800"  # at or before
    assert local(SHANGHAI, last_due(workdays, friday - 1)) == "2026-03-05 09:00 +0800"
    # Day of month OR day of week when both are restricted (Vixie cron): the 1st, and Mondays.
    either = schedule("0 9 1 * 1")
    assert local(SHANGHAI, next_due(either, at(SHANGHAI, 2026, 3, 28, 0, 0))) == "2026-03-30 09:00 +0800"
    assert local(SHANGHAI, next_due(either, at(SHANGHAI, 2026, 3, 30, 10, 0))) == "2026-04-01 09:00 +0800"


def test_next_due_across_daylight_saving_changes() -> None:
    nightly = schedule("30 2 * * *", "America/New_York")
    # 2026-03-08: 02:00 jumps to 03:00, so 02:30 does not exist: it runs at 03:00, then 02:30 again.
    runs, t = [], at(NEW_YORK, 2026, 3, 7, 12, 0)
    for _ in range(3):
        t = next_due(nightly, t) or 0.0
        runs.append(local(NEW_YORK, t))
    assert runs == ["2026-03-08 03:00 -0400", "2026-03-09 02:30 -0400", "2026-03-10 02:30 -0400"]
    # 2026-11-01: 01:00-02:00 happens twice; a 01:30 job runs once, in the first of them.
    early = schedule("30 1 * * *", "America/New_York")
    first = next_due(early, at(NEW_YORK, 2026, 10, 31, 12, 0)) or 0.0
    assert local(NEW_YORK, first) == "2026-11-01 01:30 -0400"
    assert local(NEW_YORK, next_due(early, first)) == "2026-11-02 01:30 -0500"
    # A half-hourly job runs in both 01:xx hours: every real half hour, none lost, none doubled.
    half = schedule("*/30 * * * *", "America/New_York")
    t, gaps = at(NEW_YORK, 2026, 11, 1, 0, 30), []
    for _ in range(5):
        nxt = next_due(half, t) or 0.0
        gaps.append(nxt - t)
        t = nxt
    assert gaps == [1800.0] * 5
    assert last_due(half, t - 1) == t - 1800


def test_due_key_names_the_instant_not_the_wall_clock() -> None:
    """The claim and idempotency key is the same on every instance and different for the two
    01:30s of a fall-back night."""
    half = schedule("*/30 * * * *", "America/New_York")
    one = next_due(half, at(NEW_YORK, 2026, 11, 1, 1, 10)) or 0.0
    two = one + 3600
    assert due_key(half, one) == "schedule:s:2026-11-01T05:30:00+00:00"
    assert due_key(half, two) == "schedule:s:2026-11-01T06:30:00+00:00"


# -- the scheduler's time, moved by the test ---------------------------------------------------------
class StepClock:
    """The schedulers' clock. `advance` moves it and returns once every scheduler sharing it has
    taken its round and gone back to sleep (or to sleep anew after a reload woke it)."""

    def __init__(self, start: float) -> None:
        self.t = start
        self._generation = 0
        self._moved = asyncio.Event()
        self._changed = asyncio.Event()
        self._sleeping: dict[int, int] = {}  # sleeper (its task) -> the generation it last saw

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        me = id(asyncio.current_task())
        deadline = self.t + seconds
        try:
            while self.t < deadline and not wake.is_set():
                self._sleeping[me] = self._generation
                self._changed.set()
                waiters = {asyncio.ensure_future(self._moved.wait()), asyncio.ensure_future(wake.wait())}
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
        finally:
            self._sleeping.pop(me, None)
            self._changed.set()

    async def settle(self, sleepers: int = 1) -> None:
        async with asyncio.timeout(10):
            while True:
                self._changed.clear()
                now = self._generation
                if len(self._sleeping) == sleepers and all(g == now for g in self._sleeping.values()):
                    return
                await self._changed.wait()

    async def advance(self, seconds: float, sleepers: int = 1) -> None:
        self.t += seconds
        self._generation += 1
        self._moved.set()
        self._moved = asyncio.Event()
        await self.settle(sleepers)


START = at(SHANGHAI, 2026, 3, 2, 8, 59, 30)  # a Monday, 30 s before 09:00 in Shanghai


def every_minute(name: str = "standup", **extra: Any) -> dict[str, Any]:
    return {"name": name, "cron": "* * * * *", "platform": "dingtalk", "conversation": "cidTEAM",
            "text": f"{name} time", **extra}  # fmt: skip


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    return tmp_path


@pytest.fixture
async def ding(aiohttp_server: Callable[..., Any]) -> DingTalkDouble:
    double = DingTalkDouble()
    await serve(aiohttp_server, double)
    return double


Start = Callable[..., Any]


@pytest.fixture
def start(aiohttp_client: Callable[..., Any], state: Path) -> Start:
    """A gateway (core + handlers) whose scheduler runs on `clock`; returns its client once the
    scheduler has taken up the configured schedules (its first round)."""

    async def run(config: Config, clock: StepClock, sleepers: int = 1) -> Client:
        app = create_app(config, [handlers.setup])
        app[SCHEDULE_CLOCK] = clock
        headers = {"Authorization": f"Bearer {app[AUTH].login_token.current()}"}
        client: Client = await aiohttp_client(TestServer(app, host="127.0.0.1"), headers=headers)
        await clock.settle(sleepers)
        return client

    return run


def config(ding: DingTalkDouble, store: str, *schedules: dict[str, Any], **sections: Any) -> Config:
    data: dict[str, Any] = {
        "dingtalk": {**dingtalk_section(ding), "mode": "webhook"},
        "store": {"url": store},
        "cache": {"enabled": False},
        "schedules": list(schedules),
        **sections,
    }
    return build(data, env={}, source="<test>")


def posts(ding: DingTalkDouble, path: str = GROUP_SEND) -> list[str]:
    return [orjson.loads(body["msgParam"]).get("content") or orjson.loads(body["msgParam"])["text"]
            for body in ding.calls(path)]  # fmt: skip


async def delivered(clients: list[Client]) -> None:
    """Until every message queued in the (shared) store was sent or failed, by whichever instance."""
    async with asyncio.timeout(10):
        for entry in await clients[0].app[STORE].outbox_queued():
            waits = {asyncio.ensure_future(c.app[OUTBOX].settled(entry.id)) for c in clients}
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()


async def api(client: Client) -> dict[str, dict[str, Any]]:
    resp = await client.get("/api/schedules")
    assert resp.status == 200, await resp.text()
    return {row["name"]: row for row in (await resp.json())["schedules"]}


# -- exactly once with two instances ------------------------------------------------------------------
@pytest.mark.redis
async def test_a_schedule_due_every_minute_fires_once_per_minute_with_two_instances(
    ding: DingTalkDouble, start: Start, redis_url: str
) -> None:
    clock = StepClock(START)
    cfg = config(ding, redis_url, every_minute())
    a = await start(cfg, clock)
    b = await start(cfg, clock, sleepers=2)
    assert posts(ding) == []  # brand new at 08:59:30: nothing for the past
    for minute in range(1, 4):
        await clock.advance(30 if minute == 1 else 60, sleepers=2)  # 09:00, 09:01, 09:02
        await ding.wait_for(lambda n=minute: len(ding.calls(GROUP_SEND)) >= n)  # type: ignore[misc]
    await delivered([a, b])
    assert posts(ding) == ["standup time"] * 3
    assert {body["openConversationId"] for body in ding.calls(GROUP_SEND)} == {"cidTEAM"}
    runs = sum(sample(c.app, "botgate_schedule_runs_total", schedule="standup", result="queued") for c in (a, b))
    assert runs == 3
    # Every instance shows the last run, whichever instance ran it.
    for client in (a, b):
        row = (await api(client))["standup"]
        assert row["last_run_local"] == "2026-03-02 09:02" and row["next_run_local"] == "2026-03-02 09:03"
        assert row["state"] == "sent" and row["result"] == "sent"


# -- catch-up after downtime --------------------------------------------------------------------------
async def downtime(ding: DingTalkDouble, start: Start, store: str, **schedule: Any) -> list[str]:
    """Run 09:00 with the gateway up, stop it, start it again at 09:03:30 (09:01, 09:02 and 09:03
    missed); the posts made after the restart."""
    clock = StepClock(START)
    first = await start(config(ding, store, every_minute(**schedule)), clock)
    await clock.advance(30)
    await delivered([first])
    assert len(ding.calls(GROUP_SEND)) == 1
    await first.close()
    clock.t = at(SHANGHAI, 2026, 3, 2, 9, 3, 30)
    again = await start(config(ding, store, every_minute(**schedule)), clock)
    await delivered([again])
    return posts(ding)[1:]


async def test_after_downtime_over_three_due_times_the_last_one_runs_once(
    ding: DingTalkDouble, start: Start, state: Path
) -> None:
    assert await downtime(ding, start, f"sqlite:///{state}/botgate.sqlite3") == ["standup time"]


async def test_catch_up_off_runs_none_of_the_missed(ding: DingTalkDouble, start: Start, state: Path) -> None:
    assert await downtime(ding, start, f"sqlite:///{state}/botgate.sqlite3", catch_up=False) == []


async def test_a_new_schedule_does_not_run_for_the_past(ding: DingTalkDouble, start: Start, state: Path) -> None:
    clock = StepClock(at(SHANGHAI, 2026, 3, 2, 9, 3, 30))  # 09:03 has passed, never ran: it is new
    client = await start(config(ding, f"sqlite:///{state}/botgate.sqlite3", every_minute()), clock)
    await clock.advance(15)
    assert ding.calls(GROUP_SEND) == []
    row = (await api(client))["standup"]
    assert row["state"] == "never run" and row["last_run"] is None and row["next_run_local"] == "2026-03-02 09:04"
    await clock.advance(15)  # 09:04
    await ding.wait_for(lambda: len(ding.calls(GROUP_SEND)) == 1)


async def test_a_loop_woken_late_runs_only_the_latest_due_time(ding: DingTalkDouble, start: Start) -> None:
    """A stalled process (a suspended VM, a blocked loop) posts no backlog: the latest due time that
    passed, once; one missed by more than a minute only with catch_up."""
    hourly = {"name": "hourly", "cron": "0 * * * *", "platform": "dingtalk", "conversation": "cidH",
              "text": "hourly", "catch_up": False}  # fmt: skip
    clock = StepClock(START)
    client = await start(config(ding, "memory://", every_minute(), hourly), clock)
    await clock.advance(330)  # 08:59:30 -> 09:05:00 in one step: 09:00 ... 09:05 have all passed
    await ding.wait_for(lambda: len(ding.calls(GROUP_SEND)) >= 1)
    await delivered([client])
    assert posts(ding) == ["standup time"]
    listed = await api(client)
    assert listed["standup"]["last_run_local"] == "2026-03-02 09:05"
    assert listed["hourly"]["state"] == "never run"  # 09:00 was 5 minutes late: skipped, catch_up off
    assert listed["hourly"]["next_run_local"] == "2026-03-02 10:00"


# -- prompt schedules ---------------------------------------------------------------------------------
@pytest.fixture
async def model(aiohttp_server: Callable[..., Any]) -> AsyncIterator[tuple[OpenAIDouble, str]]:
    double = OpenAIDouble(answer="今日要点：一切正常")
    server = await aiohttp_server(double.app(), host="127.0.0.1")
    yield double, str(server.make_url("/v1"))
    double.release()


def digest(**extra: Any) -> dict[str, Any]:
    return {"name": "digest", "cron": "0 9 * * *", "platform": "dingtalk", "user": "staff42",
            "prompt": "Summarise yesterday", **extra}  # fmt: skip


async def test_a_prompt_schedule_posts_the_agents_answer(
    ding: DingTalkDouble, start: Start, model: tuple[OpenAIDouble, str]
) -> None:
    double, url = model
    double.reasoning = "let me think"
    double.reasoning_as = "think"  # inline <think>: stripped under the default `reasoning = "strip"`
    clock = StepClock(START)
    client = await start(config(ding, "memory://", digest(), model={"base_url": url, "max_retries": 0}), clock)
    await clock.advance(30)
    await ding.wait_for(lambda: len(ding.calls(DIRECT_SEND)) == 1)
    body = ding.calls(DIRECT_SEND)[0]
    assert body["userIds"] == ["staff42"] and body["msgKey"] == "sampleMarkdown"
    text = orjson.loads(body["msgParam"])["text"]
    assert "今日要点：一切正常" in text and "think" not in text
    asked = double.requests[0]["messages"]
    assert asked[-1] == {"role": "user", "content": "Summarise yesterday"}
    assert asked[0]["role"] == "system"
    await delivered([client])
    assert (await api(client))["digest"]["result"] == "sent"


async def test_a_model_failure_is_the_runs_result_and_nothing_is_posted(
    ding: DingTalkDouble, start: Start, model: tuple[OpenAIDouble, str], caplog: pytest.LogCaptureFixture
) -> None:
    double, url = model
    double.script = [500]
    clock = StepClock(START)
    client = await start(config(ding, "memory://", digest(), model={"base_url": url, "max_retries": 0}), clock)
    await clock.advance(30)
    assert len(double.requests) == 1
    row = (await api(client))["digest"]
    assert row["state"] == "failed" and row["result"] == "failed: model: server error"
    assert row["last_run_local"] == "2026-03-02 09:00"
    assert ding.calls(DIRECT_SEND) == [] and await client.app[STORE].outbox_queued() == []
    assert sample(client.app, "botgate_schedule_runs_total", schedule="digest", result="failed") == 1
    assert any("schedule run failed" in r.getMessage() for r in caplog.records)


# -- reload -------------------------------------------------------------------------------------------
def config_file(path: Path, ding: DingTalkDouble, *schedules: dict[str, Any]) -> Path:
    lines = ['[store]\nurl = "memory://"\n[dingtalk]\nmode = "webhook"\n']
    lines += [f"{k} = {orjson.dumps(v).decode()}\n" for k, v in dingtalk_section(ding).items() if k != "enabled"]
    lines.append("enabled = true\n")
    for entry in schedules:
        lines.append("[[schedules]]\n")
        lines += [f"{k} = {orjson.dumps(v).decode()}\n" for k, v in entry.items()]
    path.write_text("".join(lines))
    return path


async def test_reload_adding_and_removing_a_schedule_takes_effect(
    ding: DingTalkDouble, start: Start, state: Path
) -> None:
    path = config_file(state / "config.toml", ding, every_minute("standup"))
    clock = StepClock(START)
    client = await start(load(path, env={}), clock)
    await clock.advance(30)  # 09:00: standup
    await ding.wait_for(lambda: len(ding.calls(GROUP_SEND)) == 1)

    config_file(path, ding, every_minute("retro"))  # standup removed, retro added
    resp = await client.post("/api/reload")
    assert resp.status == 200 and "schedules" in (await resp.json())["applied"]
    await clock.advance(0)  # the reload woke the scheduler: it took the new list
    assert list(await api(client)) == ["retro"]
    await clock.advance(60)  # 09:01: retro only
    await ding.wait_for(lambda: len(ding.calls(GROUP_SEND)) == 2)
    await delivered([client])
    assert posts(ding) == ["standup time", "retro time"]


# -- the operator's view ------------------------------------------------------------------------------
async def test_status_page_lists_schedules_with_next_run_and_last_result(
    ding: DingTalkDouble, start: Start
) -> None:
    clock = StepClock(START)
    weekly = {"name": "weekly", "cron": "0 10 * * 5", "platform": "dingtalk", "conversation": "cidOPS",
              "text": "weekly report", "timezone": "Europe/Berlin"}  # fmt: skip
    client = await start(config(ding, "memory://", every_minute(), weekly), clock)
    await clock.advance(30)
    await ding.wait_for(lambda: len(ding.calls(GROUP_SEND)) == 1)
    await delivered([client])

    page = await (await client.get("/", headers={"Accept-Language": "en"})).text()
    start_at, end_at = page.index('id="schedules"'), page.index("</section>", page.index('id="schedules"'))
    panel = page[start_at:end_at]
    row = panel[panel.index('id="schedule-standup"') :]
    row = row[: row.index("</tr>")]
    assert "dingtalk/default" in row and "cidTEAM" in row and "<code>* * * * *</code>" in row
    assert "Asia/Shanghai" in row and "2026-03-02 09:01" in row and "2026-03-02 09:00" in row and ">sent<" in row
    weekly_row = panel[panel.index('id="schedule-weekly"') :]
    weekly_row = weekly_row[: weekly_row.index("</tr>")]
    assert "Europe/Berlin" in weekly_row and "2026-03-06 10:00" in weekly_row and "never run" in weekly_row

    listed = await api(client)
    assert {k: listed["weekly"][k] for k in ("platform", "bot", "target_kind", "target", "cron", "timezone")} == {
        "platform": "dingtalk",
        "bot": "default",
        "target_kind": "conversation",
        "target": "cidOPS",
        "cron": "0 10 * * 5",
        "timezone": "Europe/Berlin",
    }
    assert listed["weekly"]["next_run"] == at(ZoneInfo("Europe/Berlin"), 2026, 3, 6, 10, 0)
    entry = listed["standup"]["entry"]
    stored = await client.app[OUTBOX].get(entry)
    assert stored is not None and stored.idempotency_key == "schedule:standup:2026-03-02T01:00:00+00:00"
    async with aiohttp.ClientSession() as anonymous, anonymous.get(client.make_url("/api/schedules")) as resp:
        assert resp.status == 401  # no login: refused like every admin route
