"""OrderedIntake: concurrent across keys, in order within a key, bounded, and owned (nothing left
running or remembered after the session)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.intake import OrderedIntake


def step(log: list[str], name: str, gate: asyncio.Event | None = None) -> Callable[[], Awaitable[None]]:
    async def work() -> None:
        log.append(f"start {name}")
        if gate is not None:
            await gate.wait()
        log.append(f"end {name}")

    return work


async def test_one_key_in_order_while_another_key_is_not_held_up() -> None:
    log: list[str] = []
    slow = asyncio.Event()
    other_done = asyncio.Event()

    async def other() -> None:
        log.append("other")
        other_done.set()

    async with OrderedIntake() as intake:
        await intake.put("a", step(log, "a1", slow))
        await intake.put("a", step(log, "a2"))
        await intake.put("b", other)
        async with asyncio.timeout(5):
            await other_done.wait()  # b ran although a1 is still waiting
        assert log == ["start a1", "other"]  # a2 waits for a1
        slow.set()
        async with asyncio.timeout(5):
            await intake.wait_idle()
        assert log == ["start a1", "other", "end a1", "start a2", "end a2"]
        assert intake.keys == 0 and len(intake) == 0  # finished keys are forgotten


async def test_a_failing_frame_does_not_stop_the_next_one_of_its_key() -> None:
    log: list[str] = []

    async def broken() -> None:
        raise RuntimeError("bad frame")

    async with OrderedIntake() as intake:
        await intake.put("a", broken)
        await intake.put("a", step(log, "a2"))
        async with asyncio.timeout(5):
            await intake.wait_idle()
    assert log == ["start a2", "end a2"]


async def test_full_intake_makes_the_reader_wait() -> None:
    gate = asyncio.Event()
    log: list[str] = []
    async with OrderedIntake(limit=2) as intake:
        await intake.put("a", step(log, "a", gate))
        await intake.put("b", step(log, "b", gate))
        third = asyncio.create_task(intake.put("c", step(log, "c")))
        await asyncio.sleep(0)  # let it try; the slots are taken
        await asyncio.sleep(0)
        assert not third.done() and len(intake) == 2
        gate.set()
        async with asyncio.timeout(5):
            await third
            await intake.wait_idle()
    assert sorted(log) == ["end a", "end b", "end c", "start a", "start b", "start c"]


async def test_leaving_drains_in_flight_work() -> None:
    log: list[str] = []
    gate = asyncio.Event()
    intake = OrderedIntake()
    async with intake:
        await intake.put("a", step(log, "a", gate))
        asyncio.get_running_loop().call_soon(gate.set)
    assert log == ["start a", "end a"] and len(intake) == 0


async def test_cancelled_session_cancels_its_work() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()
    intake = OrderedIntake()

    async def stuck() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def session() -> None:
        async with intake:
            await intake.put("a", stuck)
            await asyncio.Event().wait()

    task = asyncio.create_task(session())
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set() and len(intake) == 0 and intake.keys == 0
