"""No admin surface without a credential, on a real `python run.py`: with no password, a same-host
proxy that adds no forwarding header (socat, stunnel, nginx's default proxy_pass) gets nothing
without the login token; the login link from the log logs a browser in; the token survives a
restart, `python run.py rotate-login-token` replaces it; weak secrets are refused at config check.
Plus the re-authentication prompt of the status page in headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from gateway import auth
from gateway.config import load
from gateway.keys import AUTH, LIVE
from tests.chromium import CHROMIUM, Chromium
from tests.process import ROOT, GatewayProcess

HTML = {"Accept": "text/html,application/xhtml+xml"}
CHECK_TIMEOUT = 60.0


class Forwarder:
    """A TCP proxy on 127.0.0.1 that adds nothing to what it relays, like socat or nginx `stream`:
    to the gateway every visitor's request then comes from 127.0.0.1, with whatever Host the
    visitor wrote."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Forwarder:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


@pytest.fixture
async def gateway_process(spawn_gateway: Callable[..., GatewayProcess]) -> AsyncIterator[GatewayProcess]:
    """`python run.py` as a newcomer runs it: no password, state (SQLite, login token) on disk."""
    gw = spawn_gateway(start=False)
    await asyncio.to_thread(gw.start)
    yield gw


def lines_with(gw: GatewayProcess, secret: str) -> list[str]:
    return [line for line in gw.output().splitlines() if secret in line]


async def test_no_peer_reaches_an_admin_surface_without_the_token(gateway_process: GatewayProcess) -> None:
    gw = gateway_process
    token = gw.login_token()
    # One log line carries the token: the login link, on this machine's loopback and port.
    [announced] = lines_with(gw, token)
    link = f"http://127.0.0.1:{gw.port}/login?token={token}"
    assert orjson.loads(announced)["login_url"] == link and link in orjson.loads(announced)["message"]

    async with Forwarder(gw.port) as proxy, aiohttp.ClientSession() as visitor:
        for base, host in (
            (f"http://127.0.0.1:{proxy.port}", "localhost"),  # through the proxy, claiming to be local
            (f"http://127.0.0.1:{proxy.port}", f"127.0.0.1:{gw.port}"),
            (gw.url, f"127.0.0.1:{gw.port}"),  # and straight from this machine: no exemption either
        ):
            headers = {"Host": host}
            for path in ("/", "/chat"):
                async with visitor.get(base + path, headers={**headers, **HTML}, allow_redirects=False) as resp:
                    assert resp.status == 302 and resp.headers["Location"] == f"/login?next={path}", (base, host)
            for path in ("/api/status", "/status/events"):
                async with visitor.get(base + path, headers=headers) as resp:
                    assert resp.status == 401, (base, host, path)
            for path in (
                "/api/reload",
                "/api/conversations/reset",
                "/api/channels/web/reconnect",
                "/api/login-token/rotate",
            ):
                async with visitor.post(base + path, json={"conversation": "web:x"}, headers=headers) as resp:
                    assert resp.status == 401, (base, host, path)
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await visitor.ws_connect(base + "/chat/ws", headers=headers)
            assert err.value.status == 401
            async with visitor.get(base + "/healthz", headers=headers) as resp:
                assert resp.status == 200
            async with visitor.get(base + "/readyz", headers=headers) as resp:
                assert resp.status == 200 and "reason" not in await resp.json()

    # The login link (opened through the proxy here) logs in: a session cookie, then everything works.
    jar = aiohttp.CookieJar(unsafe=True)  # the cookie is for an IP address
    async with Forwarder(gw.port) as proxy, aiohttp.ClientSession(cookie_jar=jar) as admin:
        here = f"http://127.0.0.1:{proxy.port}"
        async with admin.get(str(URL(link).with_port(proxy.port)), headers=HTML) as resp:
            assert resp.status == 200 and resp.url.path == "/" and 'id="messages-in"' in await resp.text()
            assert [r.status for r in resp.history] == [303]
        async with admin.get(here + "/api/status") as resp:
            assert resp.status == 200 and (await resp.json())["admin"]["password_set"] is False
        async with admin.ws_connect(here + "/chat/ws", headers={"Origin": here}) as ws:
            assert (await ws.receive_json())["type"] == "hello"
        async with admin.post(here + "/api/reload", json={}, headers={"Origin": here}) as resp:
            assert resp.status == 200, await resp.text()  # fresh from the link: no re-authentication
    await asyncio.to_thread(gw.stop)
    assert len(lines_with(gw, token)) == 1  # opening the link logged no token anywhere
    audit = [line for line in gw.log_lines() if line.get("audit") is True]
    assert ("login", "ok", "login-token") in [(a["action"], a["result"], a.get("credential")) for a in audit]
    assert [a["result"] for a in audit if a["action"] == "POST /api/reload"] == ["refused"] * 3 + ["ok"]


async def run_cli(gw: GatewayProcess, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "run.py"),
        *args,
        "--config",
        str(gw.config_path),
        cwd=gw.workdir,
        env=gw.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CHECK_TIMEOUT):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def status_code(http: aiohttp.ClientSession, url: str, **headers: str) -> int:
    async with http.get(url + "/api/status", headers=headers) as resp:
        return resp.status


async def test_the_login_token_survives_a_restart_and_rotating_it_ends_every_session(
    gateway_process: GatewayProcess,
) -> None:
    first = gateway_process
    token = first.login_token()
    stored = first.workdir / "state" / auth.LOGIN_TOKEN_FILE
    assert stored.read_text().strip() == token and stored.stat().st_mode & 0o777 == 0o600
    code, out, _ = await run_cli(first, "login-link")
    assert (code, out.strip()) == (0, f"http://127.0.0.1:{first.port}/login?token={token}")
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:
        async with browser.get(f"{first.url}/login", params={"token": token}) as resp:
            assert resp.status == 200
        assert await asyncio.to_thread(first.stop) == 0

        second = GatewayProcess(first.workdir)  # the next start: same state directory
        try:
            await asyncio.to_thread(second.start)
            assert second.login_token() == token
            assert await status_code(browser, second.url) == 200  # the session outlived the restart

            code, out, err = await run_cli(second, "rotate-login-token")
            assert code == 0, err
            new = URL(out.strip()).query["token"]
            assert new != token and stored.read_text().strip() == new
            [record] = [orjson.loads(line) for line in err.splitlines() if line.startswith("{")]
            assert (record["audit"], record["action"], record["result"]) == (True, "login_token.rotate", "ok")

            # The running gateway follows the file: the old token and its sessions are done.
            assert await status_code(browser, second.url) == 401
            assert await status_code(browser, second.url, Authorization=f"Bearer {token}") == 401
            assert await status_code(browser, second.url, Authorization=f"Bearer {new}") == 200
            assert new not in second.output()  # only the command printed it
        finally:
            second.kill()


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("PASSWORD", "short-pw", "admin.password: must be at least 12 characters"),
        ("JWT_SECRET", "only-twenty-one-bytes", "admin.jwt_secret: must be at least 32 bytes"),
    ],
)
async def test_check_config_refuses_weak_admin_secrets(key: str, value: str, why: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOTGATE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "run.py"),
        "--check-config",
        cwd=tmp_path,
        env={**env, f"BOTGATE_ADMIN__{key}": value},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CHECK_TIMEOUT):
        out, err = await proc.communicate()
    assert proc.returncode == 2
    assert f"environment variable BOTGATE_ADMIN__{key}: {why}" in err.decode()
    assert value not in err.decode() + out.decode()


# -- the status page asks for the credential again -------------------------------------------------
WAIT_FOR = """
new Promise((resolve, reject) => {
  const test = () => { try { return %s; } catch (e) { return false; } };
  if (test()) return resolve(true);
  const obs = new MutationObserver(() => { if (test()) { obs.disconnect(); resolve(true); } });
  obs.observe(document.documentElement,
              {subtree: true, childList: true, characterData: true, attributes: true});
  setTimeout(() => { obs.disconnect(); reject(new Error("timed out")); }, 15000);
})
"""


@pytest.mark.browser
@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"chromium not installed ({CHROMIUM})")
async def test_the_login_link_logs_a_browser_in_and_reload_asks_for_the_token_again(
    gateway: Any, tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[store]\nurl = "memory://"\n')
    client = await gateway(load(path, env={}))
    app = client.server.app
    base = str(client.make_url("")).rstrip("/")
    token = app[AUTH].login_token.current()
    async with Chromium() as browser:
        page = await browser.new_page()
        await page.navigate(f"{base}/login?token={token}")
        assert await page.evaluate("location.pathname + location.search") == "/"  # the token left the URL
        assert await page.evaluate("fetch('/api/status').then(r => r.status)") == 200

        # A session whose credential was confirmed more than 5 minutes ago (as after a long look).
        stale, _ = app[AUTH].issue(app[LIVE].config.admin, auth_time=0)
        await page.send(
            "Network.setCookie",
            name="botgate_admin",
            value=stale,
            url=base + "/",
            httpOnly=True,
            sameSite="Strict",
        )
        await page.evaluate("document.querySelector('button[data-action=\"/api/reload\"]').click()")
        await page.evaluate(WAIT_FOR % "!document.getElementById('reauth-form').hidden")
        assert "re-authentication required" in await page.evaluate(
            "document.getElementById('action-result').textContent"
        )
        await page.evaluate(
            f"document.querySelector('#reauth-form input').value = {token!r};"
            "document.getElementById('reauth-form').requestSubmit()"
        )
        # Confirmed: the reload it asked for is retried and goes through.
        await page.evaluate(
            WAIT_FOR % "document.getElementById('action-result').textContent.includes('needs_restart')"
        )
        assert await page.evaluate("document.getElementById('reauth-form').hidden") is True
        # The browser reports the one 401 that asked for the token; nothing else went wrong (no CSP
        # violation, no script error).
        assert page.errors == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"]

        # "log out" (a form post from the page) ends the session for good: the cookie is cleared,
        # and put back it is refused.
        [session] = [c for c in (await page.send("Network.getCookies"))["cookies"] if c["name"] == "botgate_admin"]
        await page.submit_and_wait("document.querySelector('form[action=\"/logout\"]').submit()")
        assert await page.evaluate("location.pathname") == "/login"
        await page.send(
            "Network.setCookie", name="botgate_admin", value=session["value"], url=base + "/", httpOnly=True
        )
        await page.navigate(f"{base}/")
        assert await page.evaluate("location.pathname") == "/login"
