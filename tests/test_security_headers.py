"""The admin pages and the web chat send security headers, on every kind of response, and their HTML
keeps to the policy it announces: no inline script, event handler or style, nothing from elsewhere
(so the strict CSP costs nothing, and a page that broke it would show up here, not in a browser)."""

from __future__ import annotations

import io
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

from aiohttp import ClientResponse, ClientSession

from tests.conftest import make_config

PASSWORD = "headers-test-password"
HTML = {"Accept": "text/html"}


def assert_protected(resp: ClientResponse) -> None:
    """CSP without inline script, nosniff, no referrer, framing denied (two ways, for old browsers)."""
    csp = {
        name: value.strip()
        for name, _, value in (
            d.strip().partition(" ") for d in resp.headers["Content-Security-Policy"].split(";")
        )
    }
    assert csp["default-src"] == "'none'", csp
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'", csp
    assert csp["frame-ancestors"] == "'none'" and csp["base-uri"] == "'none'", csp
    assert "unsafe-inline" not in str(csp) and "unsafe-eval" not in str(csp)
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["X-Frame-Options"] == "DENY"


class Inline(HTMLParser):
    """Everything in a page that a CSP of script-src/style-src 'self' would block."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: list[str] = []
        self.scripts: list[str] = []
        self._in: str = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name, value in attrs:
            if (
                name.startswith("on")
                or name == "style"
                or (value or "").lstrip().lower().startswith("javascript:")
            ):
                self.blocked.append(f"<{tag} {name}=...>")
        if tag == "style":
            self.blocked.append("<style>")
        if tag == "script":
            src = values.get("src")
            if not src:
                self._in = "script"
            else:
                self.scripts.append(src)
        for name in ("src", "href"):
            url = values.get(name) or ""
            if tag in ("script", "link", "img") and urlsplit(url).netloc:
                self.blocked.append(f"<{tag} {name}={url}> (not same-origin)")

    def handle_data(self, data: str) -> None:
        if self._in == "script" and data.strip():
            self.blocked.append("inline <script>")

    def handle_endtag(self, tag: str) -> None:
        self._in = ""


async def test_pages_and_their_errors_carry_security_headers(gateway: Callable[..., Any]) -> None:
    client = await gateway(make_config(admin={"password": PASSWORD, "jwt_secret": "j" * 32}))

    # Before logging in: the redirect to the login page, the login page, an API refusal.
    resp = await client.get("/", headers=HTML, allow_redirects=False)
    assert resp.status == 302
    assert_protected(resp)
    for path, status in (("/login", 200), ("/api/status", 401)):
        resp = await client.get(path, headers=HTML)
        assert resp.status == status
        assert_protected(resp)

    resp = await client.post("/login", json={"password": PASSWORD})
    assert resp.status == 200
    assert_protected(resp)
    auth = {"Authorization": f"Bearer {(await resp.json())['token']}", **HTML}

    scripts: list[str] = []
    for path in ("/", "/chat", "/login"):
        resp = await client.get(path, headers=auth)
        assert resp.status == 200 and resp.content_type == "text/html", path
        assert_protected(resp)
        page = Inline()
        page.feed(await resp.text())
        assert page.blocked == [], (path, page.blocked)
        scripts += page.scripts
    assert {"/static/status.js", "/static/chat.js"} <= {urlsplit(s).path for s in scripts}
    for script in scripts:  # what the pages load exists and is protected as well
        resp = await client.get(script)
        assert resp.status == 200 and resp.content_type == "application/javascript", script
        assert_protected(resp)

    # Errors of every kind.
    for method, path, status in (("GET", "/nope", 404), ("POST", "/chat", 405), ("GET", "/api/status", 200)):
        resp = await client.request(method, path, headers=auth)
        assert resp.status == status, path
        assert_protected(resp)
    resp = await client.post("/api/reload", data=io.BytesIO(b"x" * 2_000_000), headers=auth)
    assert resp.status == 413
    assert_protected(resp)


async def test_without_a_password_the_local_pages_are_protected_too(gateway: Callable[..., Any]) -> None:
    client = await gateway(make_config())
    for path in ("/", "/chat"):
        resp = await client.get(path, headers=HTML)
        assert resp.status == 200, path
        assert_protected(resp)
        assert resp.headers["Cache-Control"] == "no-store"
    async with ClientSession() as anyone:  # no login token: sent to the login page
        resp = await anyone.get(client.make_url("/"), headers=HTML, allow_redirects=False)
        assert resp.status == 302
        assert_protected(resp)
