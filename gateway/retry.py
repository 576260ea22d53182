"""Retrying a platform send that failed transiently (`PlatformError.retryable`: network trouble,
5xx, 429): a few attempts with jittered backoff, each retry counted and logged, then the error.

Adapters wrap each delivery step in it (one message part, not a whole multi-part reply), so a retry
never repeats a part the user already has.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .backoff import Backoff
from .errors import PlatformError
from .metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
ATTEMPTS = 4  # with the default backoff, all retries together wait less than 2 s


async def retry_transient(
    call: Callable[[], Awaitable[T]],
    *,
    platform: str,
    what: str,
    metrics: Metrics,
    attempts: int = ATTEMPTS,
    backoff: Backoff | None = None,
) -> T:
    backoff = backoff or Backoff(first=0.25, cap=2.0)
    attempt = 1
    while True:
        try:
            return await call()
        except PlatformError as e:
            if not e.retryable:
                raise
            if attempt >= attempts:
                log.error("%s failed %d times, giving up: %s", what, attempt, e, extra={"platform": platform})
                raise
            delay = backoff.next()
            metrics.send_retries.labels(platform).inc()
            log.warning(
                "%s failed, retrying: %s",
                what,
                e,
                extra={"platform": platform, "attempt": attempt, "retry_in_s": round(delay, 2)},
            )
            await asyncio.sleep(delay)
            attempt += 1
