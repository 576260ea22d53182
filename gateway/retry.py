"""Retrying a platform call that failed transiently (`PlatformError.retryable`): a few attempts
with jittered backoff, each retry counted and logged, then the error.

Throttling is a delay, not a failure: a `Throttled` answer is waited out for the time the platform
asked for (plus jitter, so a throttled burst does not come back in lockstep), and does not use up
an attempt; only the total time spent waiting for throttling is bounded (`max_throttle_wait`).

Adapters wrap each delivery step in it (one message part, not a whole multi-part reply), so a retry
never repeats a part the user already has. Which failures are retryable is the API client's call:
a send without an idempotency key is retryable only when the answer says it was not accepted.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .backoff import Backoff
from .errors import PlatformError, Throttled
from .metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
ATTEMPTS = 4  # with the default backoff, all retries together wait less than 2 s
MAX_THROTTLE_WAIT = 60.0  # seconds one call may spend waiting out throttling, all retries together
THROTTLE_JITTER = 0.5  # a throttled call waits retry_after * (1 + up to this)
MIN_THROTTLE_WAIT = 0.25  # even when the platform says "0 s": a throttled call never spins


async def retry_transient(
    call: Callable[[], Awaitable[T]],
    *,
    platform: str,
    what: str,
    metrics: Metrics,
    attempts: int = ATTEMPTS,
    backoff: Backoff | None = None,
    max_throttle_wait: float = MAX_THROTTLE_WAIT,
) -> T:
    backoff = backoff or Backoff(first=0.25, cap=2.0)
    attempt = 1
    throttled_for = 0.0
    while True:
        try:
            return await call()
        except Throttled as e:
            wait = max(e.retry_after, MIN_THROTTLE_WAIT) * (1.0 + THROTTLE_JITTER * random.random())
            if throttled_for + wait > max_throttle_wait:
                log.error(
                    "%s still throttled after waiting %.1f s, giving up: %s",
                    what,
                    throttled_for,
                    e,
                    extra={"platform": platform},
                )
                raise
            throttled_for += wait
            metrics.send_retries.labels(platform).inc()
            log.info(
                "%s throttled, waiting: %s",
                what,
                e,
                extra={"platform": platform, "retry_in_s": round(wait, 2)},
            )
            await asyncio.sleep(wait)
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
