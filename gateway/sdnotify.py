"""systemd service notifications (READY, WATCHDOG, STOPPING, STATUS) sent to $NOTIFY_SOCKET directly.

The protocol is one newline-separated `KEY=value` datagram on a unix socket (sd_notify(3)), so no
libsystemd is needed. Outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping

from aiohttp import web

from .tasks import stop_task

log = logging.getLogger(__name__)


def _address(env: Mapping[str, str]) -> str | None:
    raw = env.get("NOTIFY_SOCKET", "")
    if raw.startswith("@"):
        return "\0" + raw[1:]  # abstract namespace socket
    if raw.startswith("/"):
        return raw
    if raw:
        log.warning("NOTIFY_SOCKET %r is not a unix socket path; systemd notifications are off", raw)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of $WATCHDOG_USEC (as sd_watchdog_enabled(3) advises), when the watchdog is meant for us."""
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


class Notifier:
    """Tells systemd where the service is in its life; `watchdog` is a `cleanup_ctx` for the app."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _address(env)
        self.watchdog_interval = _watchdog_interval(env) if self._address else None
        self._ready = asyncio.Event()
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> None:
        """Send one datagram; never blocks and never raises (a lost ping is systemd's to judge)."""
        if self._address is None:
            return
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, socket.MSG_DONTWAIT, self._address)
        except OSError as e:
            if not self._failing:  # once per outage, not once per watchdog tick
                log.warning("systemd notification failed: %s", e)
            self._failing = True
        else:
            self._failing = False

    def ready(self, status: str) -> None:
        """The HTTP server listens and the channels are started."""
        self.send("READY=1", f"STATUS={status}")
        self._ready.set()

    def reloading(self) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", "STATUS=reloading config")

    def reloaded(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    async def watchdog(self, app: web.Application) -> AsyncIterator[None]:
        """Ping from the event loop itself, so a wedged loop stops pinging and systemd restarts us."""
        if self.watchdog_interval is None:
            yield
            return
        task = asyncio.create_task(self._ping(self.watchdog_interval), name="sd-watchdog")
        try:
            yield
        finally:
            await stop_task(task)

    async def _ping(self, interval: float) -> None:
        # systemd arms the watchdog once start-up completes, so pings begin with READY=1.
        await self._ready.wait()
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)
