"""The one webhook pattern every platform's HTTP event route follows.

1. read the body, capped (`max_body`, never more than `[server] max_body_bytes`): 413 beyond it;
2. `open` it: the platform checks the signature (401), decodes or decrypts the body (400) and may
   answer a handshake itself (Feishu's `url_verification`) — a `web.Response` ends the request;
3. the adapter parses and submits it, and its `Admission` decides: 503 when it was not accepted
   (shutting down, store down), so the platform retries; 400 for a body that is no message;
   otherwise the platform's "accepted" answer, at once (the reply is sent later).

So a stopping gateway answers an unsigned request 401 and a signed one 503, on every route.

Every refusal of an unauthenticated request is the same 401 body (`refuse`), whatever was wrong
(signature, timestamp, token, missing headers, an undecryptable body): a prober learns nothing about
which check failed. The reason goes to the log instead, at most one line per route every
`REFUSAL_LOG_INTERVAL` seconds, so a flood of forged requests cannot flood the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.adapter import Adapter
from gateway.admission import Admission
from gateway.keys import CHANNELS, CONFIG, LIVE

from .http import json_error

log = logging.getLogger(__name__)

# Checks and decodes a request body: the event (decoded JSON), or the answer to give right away.
Opener = Callable[[web.Request, bytes], object]

UNAUTHORIZED = "unauthorized"
REFUSAL_LOG_INTERVAL = 10.0  # seconds between two "refused" log lines of one route


class Refusals:
    """The one answer to every unauthenticated request of a route, and its throttled log line."""

    def __init__(self, platform: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.platform = platform
        self._clock = clock
        self._logged_at: float | None = None
        self._unlogged = 0

    def __call__(self, reason: str) -> web.Response:
        now = self._clock()
        self._unlogged += 1
        if self._logged_at is None or now - self._logged_at >= REFUSAL_LOG_INTERVAL:
            log.info(
                "webhook request refused",
                extra={"platform": self.platform, "reason": reason, "refused": self._unlogged},
            )
            self._logged_at, self._unlogged = now, 0
        return json_error(401, UNAUTHORIZED)


async def read_capped(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it exceeds `limit` (never buffered beyond that)."""
    if request.content_length is not None:
        return None if request.content_length > limit else await request.read()
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


@dataclass(frozen=True, slots=True)
class Webhook:
    adapter: Adapter[Any, Any]
    open: Opener
    accepted: Callable[[], web.Response]
    max_body: int

    async def handle(self, request: web.Request) -> web.Response:
        limit = min(self.max_body, request.app[CONFIG].server.max_body_bytes)
        raw = await read_capped(request, limit)
        if raw is None:
            return json_error(413, "request body too large", limit=limit)
        opened = self.open(request, raw)
        if isinstance(opened, web.Response):
            return opened
        admission = await self.adapter.admit(opened, "webhook")
        if admission is Admission.MALFORMED:
            return json_error(400, "not a robot message: its fields are missing or malformed")
        if not admission.acknowledge:
            return json_error(503, f"not accepted ({admission.value}), retry later")
        return self.accepted()


def install(app: web.Application, webhook: Webhook) -> None:
    """Register a bot: its channel, its webhook route when its mode has one, its context, and its
    secrets for reloads (`Adapter.follow_reloads`)."""
    adapter = webhook.adapter
    if adapter.key in app[CHANNELS]:
        raise ValueError(f"the channel {adapter.key} is installed already")
    app[CHANNELS][adapter.key] = adapter
    if adapter.runs("webhook"):
        for path in adapter.webhook_paths:
            app.router.add_post(path, webhook.handle)
    app.cleanup_ctx.append(adapter.ctx)
    adapter.follow_reloads(app[LIVE])
