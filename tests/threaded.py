"""An aiohttp app (a platform double) served on 127.0.0.1 from its own thread and event loop, for
synchronous tests (hypothesis) that drive a gateway subprocess: the double keeps serving while the
test blocks on a socket, and the test runs the double's coroutines with `run()`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class ThreadedServer:
    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="double", daemon=True)
        self._runner: web.AppRunner | None = None
        self.base = ""

    def start(self) -> ThreadedServer:
        self._thread.start()
        self.base = self.run(self._serve())
        return self

    async def _serve(self) -> str:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine (of the double) in the server's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self._runner is not None:
            self.run(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
