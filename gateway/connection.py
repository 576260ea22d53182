"""One long connection kept alive: connect, serve, and on any failure reconnect with backoff.

Both platform adapters (DingTalk Stream, Feishu ws) plug a `session` coroutine into this loop. The
session opens the connection, calls `connected()` once the handshake is done, then serves frames
until the connection ends: returning normally means "the server asked us to reconnect" (reconnect at
once), raising means a failure (reconnect after a capped, jittered backoff). Liveness is the
session's job: it must raise `StaleConnection` when no frame arrived within its stale limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from .backoff import Backoff
from .channel import ChannelState, StatusTracker
from .metrics import Metrics
from .tasks import stop_task

log = logging.getLogger(__name__)

Session = Callable[[Callable[[], None]], Coroutine[Any, Any, None]]


class StaleConnection(Exception):
    """No frame arrived for too long: the socket may look open but nobody is talking."""


class ConnectionLoop:
    def __init__(
        self,
        platform: str,
        tracker: StatusTracker,
        metrics: Metrics,
        session: Session,
        backoff: Backoff | None = None,
    ) -> None:
        self.platform = platform
        self._tracker = tracker
        self._metrics = metrics
        self._session = session
        self._backoff = backoff or Backoff(first=1.0, cap=60.0)
        self._current: asyncio.Task[None] | None = None
        self._reconnect_requested = False
        self._conn_id = ""
        self.connected_event = asyncio.Event()

    def _connected(self) -> None:
        self._backoff.reset()
        self._tracker.set(
            state=ChannelState.CONNECTED, connected_since=time.time(), attempt=0, last_error=""
        )
        self._metrics.channel_connected.labels(self.platform).set(1)
        self.connected_event.set()
        log.info("connected", extra={"platform": self.platform, "conn_id": self._conn_id})

    def _lost(self, error: str) -> None:
        status = self._tracker.snapshot()
        self.connected_event.clear()
        self._metrics.channel_connected.labels(self.platform).set(0)
        if status.state is ChannelState.CONNECTED:
            self._metrics.reconnects.labels(self.platform).inc()
        self._tracker.set(
            state=ChannelState.RECONNECTING,
            attempt=status.attempt + 1,
            reconnects=status.reconnects + (status.state is ChannelState.CONNECTED),
            last_error=error or status.last_error,
        )

    async def run(self) -> None:
        """Run until cancelled. Never returns on its own; every failure is retried."""
        self._tracker.set(state=ChannelState.CONNECTING)
        try:
            while True:
                self._conn_id = uuid.uuid4().hex[:8]
                error = ""
                self._current = asyncio.create_task(self._session(self._connected))
                try:
                    await self._current
                    error = "server asked to reconnect"
                    delay = 0.0
                except asyncio.CancelledError:
                    if not self._reconnect_requested:
                        raise
                    self._reconnect_requested = False
                    error, delay = "reconnect requested", 0.0
                except Exception as e:  # the loop's edge: any failure means reconnect
                    error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    delay = self._backoff.next()
                finally:
                    self._current = None
                self._lost(error)
                log.warning(
                    "connection lost",
                    extra={
                        "platform": self.platform,
                        "conn_id": self._conn_id,
                        "error": error,
                        "retry_in_s": round(delay, 2),
                    },
                )
                if delay:
                    await asyncio.sleep(delay)
        finally:
            await stop_task(self._current)
            self.connected_event.clear()
            self._metrics.channel_connected.labels(self.platform).set(0)
            self._tracker.set(state=ChannelState.STOPPED)

    def reconnect(self) -> None:
        """Drop the current connection and connect afresh without backoff."""
        if self._current is not None and not self._current.done():
            self._reconnect_requested = True
            self._current.cancel()
