"""Headless Debian Chromium driven over the DevTools protocol (a websocket, via aiohttp).

Just enough for page tests: open tabs, navigate and wait for the load event, evaluate JavaScript
(promises awaited), screenshots, and the console/log errors a page produced (CSP violations show
up there). No selenium/playwright: the browser is the system package.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # loopback only, whatever the environment says
    "--window-size=1280,1600",
    "--remote-debugging-port=0",
)
_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class CDPError(Exception):
    pass


class Page:
    def __init__(self, browser: Chromium, session_id: str) -> None:
        self._browser = browser
        self.session_id = session_id
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.errors: list[str] = []  # console errors, exceptions, CSP violations

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self._browser.send(method, params, self.session_id)

    async def wait_event(self, method: str, within: float = 15.0) -> dict[str, Any]:
        async with asyncio.timeout(within):
            while True:
                event = await self.events.get()
                if event["method"] == method:
                    return event

    async def navigate(self, url: str) -> None:
        """Navigate and wait for the load event of the page finally shown (after redirects)."""
        while not self.events.empty():
            self.events.get_nowait()
        await self.send("Page.navigate", url=url)
        await self.wait_event("Page.loadEventFired")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def submit_and_wait(self, expression: str) -> None:
        """Run JS that submits a form, and wait for the page it leads to."""
        while not self.events.empty():
            self.events.get_nowait()
        await self.evaluate(expression)
        await self.wait_event("Page.loadEventFired")

    async def screenshot(self, path: Path) -> bytes:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        data = base64.b64decode(shot["data"])

        def save() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        await asyncio.to_thread(save)
        return data

    def _on_event(self, event: dict[str, Any]) -> None:
        method = event["method"]
        params = event.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(str(params["exceptionDetails"]))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(str(params.get("args")))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(params["entry"].get("text", ""))
        self.events.put_nowait(event)


class Chromium:
    """`async with Chromium() as browser: page = await browser.new_page()`."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="botgate-chromium-")
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Chromium:
        self._proc = await asyncio.create_subprocess_exec(
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={self._tmp.name}",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self._proc.stderr is not None
        async with asyncio.timeout(30):
            while True:
                line = await self._proc.stderr.readline()
                if not line:
                    raise CDPError("chromium exited before DevTools came up")
                match = _LISTENING.search(line)
                if match:
                    break
        # Keep draining stderr, or chromium blocks once the pipe is full.
        self._tasks.append(asyncio.create_task(self._drain(self._proc.stderr)))
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(match.group(1).decode(), max_msg_size=0)
        self._tasks.append(asyncio.create_task(self._read()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self._proc.wait()
            if self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()
        self._tmp.cleanup()

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.read(65536):
            pass

    async def _read(self) -> None:
        assert self._ws is not None
        async for frame in self._ws:
            if frame.type is not aiohttp.WSMsgType.TEXT:
                break
            message = frame.json()
            if "id" in message:
                future = self._pending.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif message.get("sessionId") in self._pages:
                self._pages[message["sessionId"]]._on_event(message)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CDPError("DevTools connection closed"))

    async def send(
        self, method: str, params: dict[str, Any], session_id: str | None = None
    ) -> dict[str, Any]:
        assert self._ws is not None
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if session_id:
            message["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        await self._ws.send_json(message)
        async with asyncio.timeout(30):
            reply = await future
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        self._pages[page.session_id] = page
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        return page
