"""The one way a background task of the gateway is stopped: cancelled, then awaited, bounded."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0


async def stop_task(task: asyncio.Task[Any] | None, timeout: float = STOP_TIMEOUT) -> None:
    """Cancel `task` and wait for it to end, at most `timeout` seconds (a clean stop takes far
    less). The task's own cancellation is expected; an error it had died of is logged, not
    raised (the caller is stopping). A cancellation of the *caller* still reaches the caller:
    `asyncio.wait` does not swallow it, unlike awaiting the task under a suppress."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task}, timeout=timeout)
    if not task.done():
        log.warning("background task did not stop in time", extra={"task": task.get_name(), "timeout_s": timeout})
    elif not task.cancelled() and task.exception() is not None:
        log.error("background task had failed", exc_info=task.exception(), extra={"task": task.get_name()})
