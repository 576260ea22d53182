"""The one way a background task of the gateway is stopped: cancelled, then awaited, bounded."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

STOP_TIMEOUT = 5.0


async def stop_task(task: asyncio.Task[Any] | None, timeout: float = STOP_TIMEOUT) -> None:
    """Cancel `task` and wait for it to end, at most `timeout` seconds (a clean stop takes far
    less). Its cancellation and any error it ends with are its own: the caller is stopping."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
        async with asyncio.timeout(timeout):
            await task
