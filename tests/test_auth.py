"""Admin access: JWT HS256, login page and API tokens, rate-limited failures, expiry, the
loopback-only mode without a password (headers never grant access), /metrics token, headers."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import handlers
from gateway import auth
from gateway.app import create_app
from gateway.keys import AUTH, LIVE
from tests.conftest import make_config

PASSWORD = "open sesame 42"
SECRET = "a-long-random-jwt-secret"
HTML = {"Accept": "text/html,application/xhtml+xml"}

# The example token from RFC 7519 tooling (jwt.io): HS256, secret "your-256-bit-secret", no exp.
JWT_IO = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)


def test_jwt_interoperates_with_the_reference_example() -> None:
    # The signature verifies (so the refusal is about the missing expiry, not the HMAC);
    with pytest.raises(auth.TokenError, match="no expiry"):
        auth.decode(b"your-256-bit-secret", JWT_IO)
    # ...one changed character does not, even one base64 decodes to the same bytes (spare bits)...
    for forged in (JWT_IO[:-3] + "x5c", JWT_IO[:-1] + "d"):
        with pytest.raises(auth.TokenError, match="bad token signature"):
            auth.decode(b"your-256-bit-secret", forged)
    token = auth.encode(b"k", {"sub": "admin", "exp": 2_000_000_000})
    assert token.split(".")[0] == JWT_IO.split(".")[0]  # same canonical header
    assert auth.decode(b"k", token, now=1_999_999_999) == {"sub": "admin", "exp": 2_000_000_000}


def b64url(data: bytes) -> str:
    """JWT's base64url without padding (RFC 7515 §2), as whoever forges a token writes it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def test_jwt_refuses_expired_forged_unsigned_and_malformed_tokens() -> None:
    token = auth.encode(b"k", {"sub": "admin", "exp": 1000})
    with pytest.raises(auth.TokenError, match="expired"):
        auth.decode(b"k", token, now=1000)
    with pytest.raises(auth.TokenError, match="bad token signature"):
        auth.decode(b"other", token, now=10)
    head, body, sig = token.split(".")
    forged_body = b64url(b'{"sub":"admin","exp":99999999999}')
    with pytest.raises(auth.TokenError, match="bad token signature"):
        auth.decode(b"k", f"{head}.{forged_body}.{sig}", now=10)
    none_head = b64url(b'{"alg":"none","typ":"JWT"}')
    with pytest.raises(auth.TokenError, match="unsupported token algorithm"):
        auth.decode(b"k", f"{none_head}.{body}.{sig}", now=10)
    for junk in ("", "a.b", "a.b.c.d", "!!.??.**", f"{head}.{body}."):
        with pytest.raises(auth.TokenError):
            auth.decode(b"k", junk, now=10)


def test_login_limiter_locks_then_forgets_and_stays_bounded() -> None:
    now = [0.0]
    limiter = auth.LoginLimiter(max_failures=3, window=60, max_clients=100, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 60
    assert limiter.retry_after("10.0.0.2") == 0  # per client
    now[0] = 61
    assert limiter.retry_after("10.0.0.1") == 0
    for i in range(1000):
        limiter.failed(f"10.1.{i // 256}.{i % 256}")
    assert len(limiter) == 100


@pytest.fixture
def protected(gateway: Callable[..., Any]) -> Callable[..., Any]:
    async def start(**admin: Any) -> Any:
        return await gateway(
            make_config(admin={"password": PASSWORD, "jwt_secret": SECRET, **admin})
        )

    return start


async def login_token(client: Any) -> str:
    resp = await client.post("/login", json={"password": PASSWORD})
    assert resp.status == 200
    return str((await resp.json())["token"])


async def test_pages_and_api_require_login(protected: Any) -> None:
    client = await protected()
    for path in ("/", "/chat"):
        resp = await client.get(path, headers=HTML, allow_redirects=False)
        assert resp.status == 302 and resp.headers["Location"] == f"/login?next={path}"
    for path in ("/api/status", "/status/events"):
        resp = await client.get(path)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="botgate"'
        assert (await resp.json())["error"] == "login required"
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await client.ws_connect("/chat/ws")
    assert err.value.status == 401
    resp = await client.post("/api/reload")
    assert resp.status == 401
    for path in ("/healthz", "/readyz", "/login", "/static/admin.css"):
        assert (await client.get(path)).status == 200, path


async def test_browser_login_sets_a_strict_httponly_cookie(protected: Any) -> None:
    client = await protected()
    page = await client.get("/login?next=/chat")
    assert 'name="next" value="/chat"' in await page.text()
    resp = await client.post(
        "/login", data={"password": PASSWORD, "next": "/chat"}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == "/chat"
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("botgate_admin=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Max-Age=43200" in cookie and "Secure" not in cookie  # plain http here
    token = resp.cookies["botgate_admin"].value
    page = await client.get(
        "/", headers=HTML, cookies={"botgate_admin": token}, allow_redirects=False
    )
    assert page.status == 200 and 'id="messages-in"' in await page.text()
    async with client.ws_connect(
        "/chat/ws?session=cookiesession1", headers={"Cookie": f"botgate_admin={token}"}
    ) as ws:
        assert (await ws.receive_json())["type"] == "hello"
    # Behind a TLS proxy the cookie is Secure.
    resp = await client.post(
        "/login",
        data={"password": PASSWORD},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    )
    assert "Secure" in resp.headers["Set-Cookie"]
    # Logging out clears it.
    resp = await client.post("/logout", allow_redirects=False)
    assert resp.status == 303 and 'botgate_admin=""' in resp.headers["Set-Cookie"]


async def test_login_never_redirects_off_site(protected: Any) -> None:
    client = await protected()
    for target in (
        "//evil.example/x",
        "https://evil.example/",
        "/\\evil.example",
        "javascript:alert(1)",
    ):
        resp = await client.post(
            "/login", data={"password": PASSWORD, "next": target}, allow_redirects=False
        )
        assert resp.headers["Location"] == "/", target


async def test_api_accepts_the_login_token_as_bearer_and_refuses_a_forged_one(protected: Any) -> None:
    client = await protected()
    token = await login_token(client)
    resp = await client.get("/api/status", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200
    assert (await resp.json())["admin"]["password_set"] is True
    resp = await client.get("/api/status", headers={"Authorization": f"Bearer {token}x"})
    assert resp.status == 401
    assert (await resp.json())["error"] == "bad token signature"
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_expired_token_refused(protected: Any) -> None:
    client = await protected(token_ttl=60.0)
    app = client.server.app
    cfg = app[LIVE].config.admin
    old, _ = app[AUTH].issue(cfg, now=time.time() - 61)
    resp = await client.get("/api/status", headers={"Authorization": f"Bearer {old}"})
    assert resp.status == 401 and (await resp.json())["error"] == "token expired"
    resp = await client.get(
        "/", headers=HTML, cookies={"botgate_admin": old}, allow_redirects=False
    )
    assert resp.status == 302 and resp.headers["Location"].startswith("/login")
    fresh, expires = app[AUTH].issue(cfg)
    assert 59 <= expires - time.time() <= 61
    assert (
        await client.get("/api/status", headers={"Authorization": f"Bearer {fresh}"})
    ).status == 200


async def test_token_from_another_secret_or_password_refused(protected: Any) -> None:
    client = await protected()
    cfg = client.server.app[LIVE].config.admin
    other = auth.AdminAuth()
    forged, _ = other.issue(
        make_config(admin={"password": PASSWORD, "jwt_secret": "guessed"}).admin
    )
    resp = await client.get("/api/status", headers={"Authorization": f"Bearer {forged}"})
    assert (await resp.json())["error"] == "bad token signature"
    # Same secret, but issued for an older password: changing the password logs everyone out.
    stale, _ = other.issue(
        make_config(admin={"password": "old password", "jwt_secret": cfg.jwt_secret}).admin
    )
    resp = await client.get("/api/status", headers={"Authorization": f"Bearer {stale}"})
    assert (await resp.json())["error"] == "token was issued for another password"


async def test_wrong_passwords_are_rate_limited(protected: Any) -> None:
    client = await protected()
    for _ in range(5):
        resp = await client.post("/login", json={"password": "guess"})
        assert resp.status == 401 and (await resp.json())["error"] == "wrong password"
    resp = await client.post("/login", json={"password": PASSWORD})  # even the right one, now
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 300
    # A forwarded-for header does not buy a fresh allowance: the limit is per TCP peer.
    resp = await client.post(
        "/login", json={"password": "guess"}, headers={"X-Forwarded-For": "198.51.100.7"}
    )
    assert resp.status == 429
    form = await client.post("/login", data={"password": "guess"})
    assert form.status == 429 and "too many failed logins" in await form.text()


async def test_without_password_loopback_only(gateway: Any) -> None:
    client = await gateway(make_config())
    page = await client.get("/", headers=HTML)
    assert page.status == 200
    assert "BOTGATE_ADMIN__PASSWORD" in await page.text()  # says how to set one
    assert (await client.get("/chat")).status == 200
    assert (await client.get("/api/status")).status == 200
    refused = {
        "proxied client": {"X-Forwarded-For": "203.0.113.7"},
        "header claiming loopback": {"X-Forwarded-For": "127.0.0.1"},
        "RFC 7239 proxy": {"Forwarded": "for=127.0.0.1"},
        "DNS rebinding": {"Host": "rebind.example:18789"},
        "cross-site page": {"Origin": "https://evil.example"},
    }
    for case, headers in refused.items():
        resp = await client.get("/", headers={**HTML, **headers})
        assert resp.status == 403, case
        body = await resp.json()
        assert "BOTGATE_ADMIN__PASSWORD" in body["error"], case
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await client.ws_connect("/chat/ws", headers={"Origin": "http://evil.example"})
    assert err.value.status == 403
    resp = await client.post("/login", json={"password": "anything"})
    assert resp.status == 403
    login = await client.get("/login")
    assert "BOTGATE_ADMIN__PASSWORD" in await login.text()


def _non_loopback_address() -> str | None:
    """This machine's own non-loopback IPv4 address, if it has one (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only used to pick the outgoing interface
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


async def test_without_password_a_real_non_loopback_peer_is_refused(aiohttp_client: Any) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback interface on this machine")
    app = create_app(make_config(), [handlers.setup])
    client = await aiohttp_client(TestServer(app, host=address))
    # The Host header names this machine, so only the TCP peer address can decide.
    resp = await client.get("/", headers={**HTML, "Host": "127.0.0.1"})
    assert resp.status == 403
    assert (await client.get("/healthz")).status == 200


async def test_without_password_the_peer_address_decides(aiohttp_client: Any) -> None:
    """With a trusted-proxy middleware in front (as aiohttp-remotes does), `request.remote` is the
    real client; the guard must use it."""

    @web.middleware
    async def from_proxy(request: web.Request, handler: Any) -> web.StreamResponse:
        client = request.headers.get("X-Test-Client", request.remote or "")
        response: web.StreamResponse = await handler(request.clone(remote=client))
        return response

    app = create_app(make_config(), [handlers.setup])
    app.middlewares.insert(0, from_proxy)
    client = await aiohttp_client(TestServer(app, host="127.0.0.1"))
    assert (await client.get("/api/status", headers={"X-Test-Client": "127.0.0.1"})).status == 200
    assert (await client.get("/api/status", headers={"X-Test-Client": "::1"})).status == 200
    assert (
        await client.get("/api/status", headers={"X-Test-Client": "::ffff:127.0.0.1"})
    ).status == 200
    for peer in ("192.0.2.10", "10.0.0.5", "2001:db8::1", "::ffff:192.0.2.1", ""):
        assert (await client.get("/api/status", headers={"X-Test-Client": peer})).status == 403, (
            peer
        )


async def test_metrics_token_is_required_only_when_configured(gateway: Any) -> None:
    client = await gateway(make_config(admin={"metrics_token": "scrape-me-please"}))
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status == 401
    resp = await client.get("/metrics", headers={"Authorization": "Bearer scrape-me-please"})
    assert resp.status == 200 and "botgate_http_requests_total" in await resp.text()
    open_client = await gateway(make_config())
    assert (await open_client.get("/metrics")).status == 200


async def test_security_headers(protected: Any) -> None:
    client = await protected()
    for path in ("/login", "/api/status", "/static/status.js"):
        resp = await client.get(path)
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert (await client.get("/login")).headers["Cache-Control"] == "no-store"
