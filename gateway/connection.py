"""One long connection kept alive: connect, serve, and on any failure reconnect with backoff.

Both platform adapters (DingTalk Stream, Feishu ws) plug a `session` coroutine into this loop. The
session opens the connection, calls `connected()` once the handshake is done, then serves frames
until the connection ends: returning normally means "the server asked us to reconnect" (reconnect at
once), raising means a failure (reconnect after a capped, jittered backoff), raising `Refused` means
the platform turned us away in a way a quick retry cannot fix (state `refused`, one retry after its
`retry_after`, or at once on an admin reconnect). A session may replace its socket without ending
(DingTalk's warm swap on `disconnect`): the loop then sees one continuous connection.

Liveness is the session's job: it must raise `StaleConnection` when the link went silent.
`LinkWatch` is the websocket-level part both sessions share: our pings, anything heard proves the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import WSMsgType

from .backoff import Backoff
from .channel import ChannelState, StatusTracker
from .logs import redact
from .metrics import Metrics
from .tasks import stop_task

log = logging.getLogger(__name__)

Session = Callable[[Callable[[], None]], Coroutine[Any, Any, None]]

# Websocket pings go out after this much silence at most, as the SDKs' websocket libraries do
# (websockets: every 20 s, docs/protocols/dingtalk.md §A.4, feishu.md §B.3).
PING_AFTER = 20.0


class StaleConnection(Exception):
    """Nothing arrived for too long: the socket may look open but nobody is talking."""


class Refused(Exception):
    """The platform refused the connection for a reason retrying soon cannot fix (an app banned,
    too many connections): the loop waits `retry_after` seconds, or for an admin reconnect."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LinkWatch:
    """Websocket-level liveness of one socket, opened with `autoping=False, heartbeat=None`.

    Anything the server sends proves the link: a frame, a websocket ping (answered here) or a pong
    (swallowed here). After `ping_after` seconds of silence a websocket ping goes out, again every
    `ping_after` while the silence lasts; `dead_after` seconds of silence raise `StaleConnection`.
    With the defaults a dead link is noticed within 40 s, as the SDKs' libraries notice it (a 20 s
    ping, 20 s for its pong)."""

    def __init__(self, dead_after: float, ping_after: float = PING_AFTER) -> None:
        self.dead_after = dead_after
        self.ping_after = min(ping_after, dead_after / 2)
        self.heard = self._pinged = time.monotonic()

    async def receive(self, ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
        """The next message that is no ping or pong."""
        while (msg := await self.receive_until(ws, math.inf)) is None:
            pass
        return msg

    async def receive_until(self, ws: aiohttp.ClientWebSocketResponse, until: float) -> aiohttp.WSMessage | None:
        """The next message that is no ping or pong, or None once `until` (monotonic) passed."""
        while True:
            now = time.monotonic()
            if now >= until:
                return None
            silent = now - self.heard
            if silent >= self.dead_after:
                raise StaleConnection(f"nothing heard for {silent:.1f} s, not even a pong")
            next_ping = max(self.heard, self._pinged) + self.ping_after
            if now >= next_ping:
                self._pinged = now
                await ws.ping()
                continue
            wake = min(next_ping, self.heard + self.dead_after, until)
            try:
                msg = await ws.receive(timeout=wake - now)  # > 0: every deadline was checked above
            except TimeoutError:
                continue
            self.heard = time.monotonic()
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is not WSMsgType.PONG:
                return msg


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
        self._wake = asyncio.Event()  # an admin reconnect while waiting to retry
        self._conn_id = ""
        self.connected_event = asyncio.Event()

    def _connected(self) -> None:
        self._backoff.reset()
        self._tracker.set(
            state=ChannelState.CONNECTED, connected_since=time.time(), attempt=0, last_error=""
        )
        self.connected_event.set()
        log.info("connected", extra={"platform": self.platform, "conn_id": self._conn_id})

    def _lost(self, error: str, state: ChannelState) -> None:
        status = self._tracker.snapshot()
        self.connected_event.clear()
        if status.state is ChannelState.CONNECTED:
            self._metrics.reconnects.labels(self.platform).inc()
        self._tracker.set(
            state=state,
            attempt=status.attempt + 1,
            reconnects=status.reconnects + (status.state is ChannelState.CONNECTED),
            last_error=redact(error) or status.last_error,  # shown on pages and sent in alerts
        )

    async def run(self) -> None:
        """Run until cancelled. Never returns on its own; every failure is retried."""
        self._tracker.set(state=ChannelState.CONNECTING)
        try:
            while True:
                self._conn_id = uuid.uuid4().hex[:8]
                error, state, level = "", ChannelState.RECONNECTING, logging.WARNING
                self._wake.clear()
                self._current = asyncio.create_task(self._session(self._connected))
                try:
                    await self._current
                    error = "server asked to reconnect"
                    delay = 0.0
                except asyncio.CancelledError:
                    # Our own session was cancelled for a reconnect; a cancellation of this loop
                    # (shutdown) must win even when a reconnect was asked for just before.
                    current = asyncio.current_task()
                    if not self._reconnect_requested or (current is not None and current.cancelling()):
                        raise
                    self._reconnect_requested = False
                    error, delay = "reconnect requested", 0.0
                except Refused as e:  # retrying soon would only be refused again
                    delay = e.retry_after
                    error = f"{e}; next try in {_duration(delay)} or on an admin reconnect"
                    state, level = ChannelState.REFUSED, logging.ERROR
                except Exception as e:  # the loop's edge: any failure means reconnect
                    error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    delay = self._backoff.next()
                finally:
                    self._current = None
                self._lost(error, state)
                log.log(
                    level,
                    "connection refused" if state is ChannelState.REFUSED else "connection lost",
                    extra={
                        "platform": self.platform,
                        "conn_id": self._conn_id,
                        "error_message": error,
                        "retry_in_s": round(delay, 2),
                    },
                )
                if delay:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
        finally:
            await stop_task(self._current)
            self.connected_event.clear()
            self._tracker.set(state=ChannelState.STOPPED)

    def reconnect(self) -> None:
        """Drop the current connection and connect afresh without backoff (also ends a wait to
        retry, a refused connection's included)."""
        if self._current is not None and not self._current.done():
            self._reconnect_requested = True
            self._current.cancel()
        else:
            self._wake.set()


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
