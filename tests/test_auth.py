"""Admin access: JWT HS256, login page and API tokens, rate-limited failures (per client, per IPv6
/64, global; the client named by a trusted proxy), expiry, logout revocation, Origin checks,
re-authentication for sensitive operations, audit records, the login token when no password is set
(no exemption for any peer), a public-safe /readyz, /metrics token, headers."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import auth
from gateway.keys import AUTH, LIVE
from tests.conftest import make_config
from tests.doubles.dingtalk import DingTalkDouble
from tests.helpers import start

PASSWORD = "open sesame 42"
SECRET = "a-long-random-jwt-secret-of-32-bytes"
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
    here = str(client.make_url("")).rstrip("/")
    async with client.ws_connect(
        "/chat/ws?session=cookiesession1", headers={"Cookie": f"botgate_admin={token}", "Origin": here}
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
    # Logging out (from the page, so with its Origin) clears it.
    resp = await client.post("/logout", headers={"Origin": here}, allow_redirects=False)
    assert resp.status == 303 and 'botgate_admin=""' in resp.headers["Set-Cookie"]


async def test_login_never_redirects_off_site(protected: Any) -> None:
    client = await protected()
    for target in (
        "//evil.example/x",
        "https://evil.example/",
        "/\\evil.example",
        "javascript:alert(1)",
        "/\t/evil.example",  # a browser drops the TAB and reads //evil.example
        "/\n/evil.example",  # would break the Location header
        "/\r\nSet-Cookie: x=1",
        "/ /evil.example",
        "/x\x7f",
        "/caf\u00e9",
    ):
        resp = await client.post(
            "/login", data={"password": PASSWORD, "next": target}, allow_redirects=False
        )
        assert resp.headers["Location"] == "/", target
    resp = await client.post("/login", data={"password": PASSWORD, "next": "/chat?x=1"}, allow_redirects=False)
    assert resp.headers["Location"] == "/chat?x=1"


async def test_with_a_password_a_login_link_logs_nobody_in(protected: Any) -> None:
    client = await protected()
    resp = await client.get("/login", params={"token": PASSWORD}, allow_redirects=False)
    assert resp.status == 400 and "Set-Cookie" not in resp.headers  # a password never goes in a URL


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
        make_config(admin={"password": PASSWORD, "jwt_secret": "a guessed secret of 32 bytes or more"}).admin
    )
    resp = await client.get("/api/status", headers={"Authorization": f"Bearer {forged}"})
    assert (await resp.json())["error"] == "bad token signature"
    # Same secret, but issued for an older password: changing the password logs everyone out.
    stale, _ = other.issue(
        make_config(admin={"password": "the old password", "jwt_secret": cfg.jwt_secret}).admin
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
    form = await client.post("/login", data={"password": "guess"}, headers={"Accept-Language": "en"})
    assert form.status == 429 and "too many failed logins" in await form.text()
    form = await client.post("/login", data={"password": "guess"})  # the page's default language
    assert form.status == 429 and "登录失败次数太多" in await form.text()


def test_login_limiter_counts_an_ipv6_64_as_one_client_and_has_a_global_budget() -> None:
    now = [0.0]
    limiter = auth.LoginLimiter(max_failures=3, window=60, global_max=10, clock=lambda: now[0])
    for i in range(3):
        limiter.failed(f"2001:db8:1:2::{i + 1}")  # three addresses of one /64
    assert limiter.retry_after("2001:db8:1:2:ffff::9") == 60
    assert limiter.retry_after("2001:db8:1:3::1") == 0  # the next /64 is someone else
    # Rotating IPv4 addresses: each stays under its own limit; the global budget catches them.
    for i in range(7):
        limiter.failed(f"192.0.2.{i}")
        assert limiter.retry_after(f"192.0.2.{i}") == (60 if i == 6 else 0)
    assert limiter.retry_after("198.51.100.1") == 60  # a fresh address is locked out too
    now[0] = 61
    assert limiter.retry_after("198.51.100.1") == 0


def behind_proxy(**admin: Any) -> Any:
    """A gateway whose every request comes through a trusted proxy on 127.0.0.1."""
    return make_config(
        admin={"password": PASSWORD, "jwt_secret": SECRET, **admin},
        server={"trusted_proxies": ["127.0.0.1/32"]},
    )


def audits(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.__dict__ for r in caplog.records if r.__dict__.get("audit") is True]


async def test_a_trusted_proxy_names_the_client_for_the_limiter_and_the_logs(
    gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="botgate.audit")
    client = await gateway(behind_proxy())
    guesser = {"X-Forwarded-For": "198.51.100.7"}
    for _ in range(5):
        assert (await client.post("/login", json={"password": "guess"}, headers=guesser)).status == 401
    assert (await client.post("/login", json={"password": PASSWORD}, headers=guesser)).status == 429
    # Another client of the same proxy may still log in. The proxy appends the address it saw, so a
    # hop the client wrote itself (the left one) is not believed.
    spoofing = {"X-Forwarded-For": "198.51.100.7, 198.51.100.8"}
    assert (await client.post("/login", json={"password": PASSWORD}, headers=spoofing)).status == 200
    last = audits(caplog)[-1]
    assert (last["action"], last["result"], last["actor"]) == ("login", "ok", "admin")
    assert (last["client_ip"], last["peer"]) == ("198.51.100.8", "127.0.0.1")


async def test_forwarded_for_from_a_peer_that_is_not_a_trusted_proxy_is_ignored(gateway: Any) -> None:
    client = await gateway(
        make_config(
            admin={"password": PASSWORD, "jwt_secret": SECRET}, server={"trusted_proxies": ["10.0.0.0/8"]}
        )
    )
    for i in range(5):  # 127.0.0.1 is no proxy of ours: every guess counts against it
        headers = {"X-Forwarded-For": f"198.51.100.{i}"}
        assert (await client.post("/login", json={"password": "guess"}, headers=headers)).status == 401
    fresh = {"X-Forwarded-For": "198.51.100.99"}
    assert (await client.post("/login", json={"password": PASSWORD}, headers=fresh)).status == 429


async def test_rotating_addresses_run_into_the_global_budget(gateway: Any) -> None:
    client = await gateway(behind_proxy())
    for i in range(50):  # 10 addresses, 5 guesses each: none of them over its own limit
        resp = await client.post(
            "/login", json={"password": "guess"}, headers={"X-Forwarded-For": f"203.0.113.{i // 5}"}
        )
        assert resp.status == 401, i
    fresh = {"X-Forwarded-For": "203.0.113.200"}
    resp = await client.post("/login", json={"password": PASSWORD}, headers=fresh)
    assert resp.status == 429 and 1 <= int(resp.headers["Retry-After"]) <= 300


async def test_logout_revokes_every_session(protected: Any) -> None:
    client = await protected()
    token, other = await login_token(client), await login_token(client)
    resp = await client.post("/logout", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200 and await resp.json() == {"logged_out": True}
    for old in (token, other):
        resp = await client.get("/api/status", headers={"Authorization": f"Bearer {old}"})
        assert resp.status == 401 and (await resp.json())["error"] == "token revoked (logged out)"
    new = await login_token(client)
    assert (await client.get("/api/status", headers={"Authorization": f"Bearer {new}"})).status == 200


async def test_a_logout_ends_an_open_status_feed(protected: Any) -> None:
    client = await protected()
    bearer = {"Authorization": f"Bearer {await login_token(client)}"}
    async with client.get("/status/events", headers=bearer) as events:
        await events.content.readuntil(b"event: status")  # the feed is live
        assert (await client.post("/logout", headers=bearer)).status == 200
        async with asyncio.timeout(30):  # the feed looks again at least every 5 s
            await events.content.read()  # ... and ends


async def test_a_logout_outlives_a_restart(gateway: Any, tmp_path: Path) -> None:
    config = make_config(
        admin={"password": PASSWORD, "jwt_secret": SECRET},
        server={"state_dir": str(tmp_path)},
        store={"url": "sqlite:///bot.sqlite3"},
    )
    first = await gateway(config)
    token = await login_token(first)
    assert (await first.post("/logout", headers={"Authorization": f"Bearer {token}"})).status == 200
    await first.close()
    second = await gateway(config)  # the next start, with the same state directory
    resp = await second.get("/api/status", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 401 and (await resp.json())["error"] == "token revoked (logged out)"
    assert (tmp_path / "session-epoch").stat().st_mode & 0o777 == 0o600


async def test_state_changing_requests_must_come_from_this_origin(protected: Any) -> None:
    client = await protected()
    here = str(client.make_url("")).rstrip("/")
    app = client.server.app
    session, _ = app[AUTH].issue(app[LIVE].config.admin)
    cookie = {"Cookie": f"botgate_admin={session}"}
    bearer = {"Authorization": f"Bearer {session}"}
    reset = {"conversation": "web:origincheck"}
    refused = {
        "another site": {**cookie, "Origin": "https://evil.example"},
        "a sibling port": {**cookie, "Origin": "http://127.0.0.1:1"},
        "an opaque origin": {**cookie, "Origin": "null"},
        "no Origin with a cookie": cookie,
        "a bearer token from another site": {**bearer, "Origin": "https://evil.example"},
        "a sibling subdomain, as the browser says": {**cookie, "Origin": here, "Sec-Fetch-Site": "same-site"},
        "another site, as the browser says": {**cookie, "Sec-Fetch-Site": "cross-site"},
    }
    for case, headers in refused.items():
        resp = await client.post("/api/conversations/reset", json=reset, headers=headers)
        assert resp.status == 403, case
    for headers in (
        {**cookie, "Origin": here},
        {**cookie, "Origin": here, "Sec-Fetch-Site": "same-origin"},
        # A form on our own page (Referrer-Policy: no-referrer) is posted with Origin: null.
        {**cookie, "Origin": "null", "Sec-Fetch-Site": "same-origin"},
        bearer,  # a script's bearer token needs no Origin
    ):
        assert (await client.post("/api/conversations/reset", json=reset, headers=headers)).status == 200
    # The web chat's upgrade too: a page elsewhere cannot chat over the admin's cookie.
    for headers in ({**cookie, "Origin": "http://evil.example"}, cookie):
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await client.ws_connect("/chat/ws?session=originchk1", headers=headers)
        assert err.value.status == 403
    async with client.ws_connect("/chat/ws?session=originchk1", headers={**cookie, "Origin": here}) as ws:
        assert (await ws.receive_json())["type"] == "hello"
    # Login and logout: a page elsewhere can neither log the admin in nor out.
    resp = await client.post("/login", data={"password": PASSWORD}, headers={"Origin": "https://evil.example"})
    assert resp.status == 403
    resp = await client.post("/logout", headers={**cookie, "Origin": "https://evil.example"})
    assert resp.status == 403
    assert (await client.get("/api/status", headers=cookie)).status == 200  # still logged in


async def test_sensitive_operations_need_a_recent_login(protected: Any) -> None:
    client = await protected()
    app = client.server.app
    stale, _ = app[AUTH].issue(app[LIVE].config.admin, auth_time=time.time() - auth.REAUTH_WINDOW - 1)
    bearer = {"Authorization": f"Bearer {stale}"}
    for path, body in (
        ("/api/reload", {}),
        ("/api/conversations/reset", {"conversation": "web:reauth"}),
        ("/api/login-token/rotate", {}),
    ):
        resp = await client.post(path, json=body, headers=bearer)
        assert resp.status == 401, path
        assert (await resp.json())["error"] == "re-authentication required"
        assert 'error="insufficient_user_authentication", max_age=300' in resp.headers["WWW-Authenticate"]
    # Looking, and everything not sensitive, needs only the session.
    assert (await client.get("/api/status", headers=bearer)).status == 200
    assert (await client.post("/api/channels/nope/reconnect", headers=bearer)).status == 404
    # Confirming the password again gives a session that may.
    fresh = {"Authorization": f"Bearer {await login_token(client)}"}
    resp = await client.post("/api/conversations/reset", json={"conversation": "web:reauth"}, headers=fresh)
    assert resp.status == 200


async def test_every_admin_api_call_and_login_is_an_audit_record(
    protected: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="botgate.audit")
    client = await protected()
    await client.get("/api/status")
    await client.post("/login", json={"password": "guess"})
    bearer = {"Authorization": f"Bearer {await login_token(client)}"}
    await client.get("/api/status", headers=bearer)
    await client.post("/api/conversations/reset", json={"conversation": "web:audited"}, headers=bearer)
    await client.post("/api/channels/nope/reconnect", headers=bearer)
    await client.post("/logout", headers=bearer)
    got = [(r["action"], r["result"], r["actor"], r.get("status")) for r in audits(caplog)]
    assert got == [
        ("GET /api/status", "refused", "anonymous", 401),
        ("login", "refused", "anonymous", None),
        ("login", "ok", "admin", None),
        ("GET /api/status", "ok", "admin", 200),
        ("POST /api/conversations/reset", "ok", "admin", 200),
        ("POST /api/channels/{platform}/reconnect", "failed", "admin", 404),
        ("logout", "ok", "admin", None),
    ]
    records = audits(caplog)
    assert all(r["client_ip"] == "127.0.0.1" for r in records)
    assert records[4]["conversation"] == "web:audited" and records[4]["credential"] == "password"
    assert records[4]["session"] and records[1]["reason"] == "wrong password"


async def test_readyz_tells_outsiders_states_and_the_admin_details(
    aiohttp_server: Any, gateway: Any
) -> None:
    env = await start(aiohttp_server, gateway, double=DingTalkDouble(open_failures=1000), connect=False)
    await env.double.wait_for(lambda: len(env.double.opens) >= 2)
    admin = await env.client.get("/readyz")  # the test client sends the login token
    assert admin.status == 503 and "HTTP 503" in (await admin.json())["reason"]
    async with aiohttp.ClientSession() as anyone, anyone.get(env.client.make_url("/readyz")) as resp:
        body = await resp.json()
    assert resp.status == 503 and body["channels"]["dingtalk/default"] == "reconnecting"
    assert body["reason"] == "dingtalk/default reconnecting"  # no error text, URL or ticket


async def test_an_unauthenticated_client_gets_nothing_without_a_password(gateway: Any) -> None:
    """In-process counterpart of tests/test_admin_access.py: no password means the login token,
    from every peer, loopback included; there is no "local" exemption any more."""
    client = await gateway(make_config())
    base = client.make_url("")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as anyone:
        for path in ("/", "/chat", "/api/status", "/status/events"):
            async with anyone.get(base.with_path(path), headers=HTML, allow_redirects=False) as resp:
                assert resp.status in (302, 401), path
        async with anyone.post(base.with_path("/api/reload")) as resp:
            assert resp.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await anyone.ws_connect(base.with_path("/chat/ws"))
        assert err.value.status == 401
        page = await (await anyone.get(base.with_path("/login"))).text()
        assert 'name="token"' in page and "python run.py login-link" in page
        async with anyone.post(base.with_path("/login"), json={"token": "guess"}) as resp:
            assert resp.status == 401 and (await resp.json())["error"] == "wrong login token"
        # The login link logs in (303 to the page) and sets the session cookie.
        token = client.server.app[AUTH].login_token.current()
        async with anyone.get(base.with_path("/login").with_query(token=token, next="/chat")) as resp:
            assert resp.status == 200 and resp.url.path == "/chat"
        assert (await anyone.get(base.with_path("/api/status"))).status == 200


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
