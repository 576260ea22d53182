"""Admin access: login page, token middleware and security headers.

The status page (`/`, `/status/...`), the web chat (`/chat...`) and the admin API (`/api/...`) need
a login once `[admin] password` is set: a JWT (gateway.auth) in an HttpOnly SameSite=Strict cookie
for browsers, or `Authorization: Bearer <token>` for scripts (POST /login with JSON returns one).
Without a password they answer only requests that plainly come from this machine (see `is_local`).
`/healthz`, `/readyz`, `/login`, `/static` and the platform webhooks stay open; `/metrics` needs
`Authorization: Bearer <metrics_token>` when `[admin] metrics_token` is set.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import aiohttp_jinja2
import orjson
from aiohttp import hdrs, web
from yarl import URL

from gateway.auth import AdminAuth, TokenError, bearer_matches, password_matches
from gateway.keys import AUTH, LIVE

from .http import json_error

log = logging.getLogger(__name__)

COOKIE = "botgate_admin"
ADMIN_PREFIXES = ("/status", "/chat", "/api/")
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
NO_PASSWORD = (
    "no admin password is set, so this page only answers on the gateway's own machine "
    "(loopback, no proxy); set [admin] password or BOTGATE_ADMIN__PASSWORD to log in from elsewhere"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# When the login behind this request ends (Unix time); long-lived responses stop there.
SESSION_EXPIRES = web.RequestKey("admin_session_expires", float)


def is_admin_path(path: str) -> bool:
    return path == "/" or path.startswith(ADMIN_PREFIXES)


def _loopback_host(url: str) -> bool:
    """Does a Host/Origin name this machine? (Defeats DNS rebinding onto 127.0.0.1.)"""
    try:
        host = URL(url).host or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _loopback_peer(peer: str | None) -> bool:
    try:
        ip = ipaddress.ip_address(peer or "")
    except ValueError:  # a Unix socket or unknown peer is not "this machine" for our purposes
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_local(request: web.Request) -> bool:
    """Does this request come from a browser or tool on the gateway's own machine?

    The TCP peer must be loopback (`request.remote`, never a header), no proxy may have forwarded
    it (a local reverse proxy would otherwise make every visitor look local), and the Host and any
    Origin must name this machine (a page elsewhere cannot script it through DNS rebinding)."""
    if not _loopback_peer(request.remote):
        return False
    if any(name in request.headers for name in FORWARDING_HEADERS):
        return False
    if not _loopback_host(f"http://{request.host}"):
        return False
    origin = request.headers.get(hdrs.ORIGIN)
    return origin is None or _loopback_host(origin)


def _token(request: web.Request) -> str:
    scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE, "")


def _wants_page(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and "text/html" in request.headers.get(hdrs.ACCEPT, "")
        and not request.path.startswith(("/api/", "/status/"))
        and request.headers.get(hdrs.UPGRADE, "").lower() != "websocket"
    )


def _unauthorized(request: web.Request, reason: str) -> web.StreamResponse:
    if _wants_page(request):
        location = f"/login?next={quote(request.path_qs, safe='/')}"
        return web.Response(status=302, headers={hdrs.LOCATION: location})
    challenge = 'Bearer realm="botgate"' + (
        ', error="invalid_token"' if reason != "login required" else ""
    )
    return web.json_response(
        {"error": reason, "login": "/login"},
        status=401,
        headers={hdrs.WWW_AUTHENTICATE: challenge},
    )


def _check_admin(request: web.Request) -> web.StreamResponse | None:
    """None when the request may proceed, else the response that refuses it."""
    cfg = request.app[LIVE].config.admin
    if not cfg.password:
        return None if is_local(request) else json_error(403, NO_PASSWORD)
    token = _token(request)
    if not token:
        return _unauthorized(request, "login required")
    try:
        claims = request.app[AUTH].verify(cfg, token)
    except TokenError as e:
        return _unauthorized(request, str(e))
    request[SESSION_EXPIRES] = float(claims["exp"])
    return None


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.match_info.http_exception is not None:
        pass  # no such route (404/405): saying so reveals nothing worth a login
    elif request.path == "/metrics":
        token = request.app[LIVE].config.admin.metrics_token
        if token and not bearer_matches(request.headers.get(hdrs.AUTHORIZATION, ""), token):
            return web.json_response(
                {"error": "metrics token required"},
                status=401,
                headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="botgate-metrics"'},
            )
    elif is_admin_path(request.path):
        refused = _check_admin(request)
        if refused is not None:
            return refused
    return await handler(request)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if is_admin_path(request.path) or request.path in ("/login", "/logout"):
        response.headers.setdefault(hdrs.CACHE_CONTROL, "no-store")


def _safe_next(target: str) -> str:
    """Only local paths: no scheme, no host, no `//evil` or `/\\evil`."""
    if target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


def _is_https(request: web.Request) -> bool:
    # Trusting X-Forwarded-Proto here can only make the cookie stricter, never looser.
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


async def login_page(request: web.Request) -> web.Response:
    return _render_login(request, next_=_safe_next(request.query.get("next", "/")))


def _render_login(
    request: web.Request, next_: str, error: str = "", status: int = 200
) -> web.Response:
    context = {
        "password_set": bool(request.app[LIVE].config.admin.password),
        "local": is_local(request),
        "error": error,
        "next": next_,
    }
    return aiohttp_jinja2.render_template("login.html", request, context, status=status)


async def _login_form(request: web.Request) -> dict[str, object] | None:
    """The posted fields (JSON object or form), None when the body cannot be read as either."""
    try:
        if request.content_type == "application/json":
            body = orjson.loads(await request.read())
            return body if isinstance(body, dict) else {}
        return dict(await request.post())
    except (ValueError, UnicodeDecodeError):  # orjson.JSONDecodeError is a ValueError
        return None


async def login(request: web.Request) -> web.StreamResponse:
    wants_json = request.content_type == "application/json"
    cfg = request.app[LIVE].config.admin
    auth: AdminAuth = request.app[AUTH]
    body = await _login_form(request) if cfg.password else {}
    if body is None:
        return json_error(400, "expected a JSON object or a form with a password")
    password = body.get("password")
    next_ = _safe_next(str(body.get("next") or "/"))

    def refuse(
        status: int, message: str, headers: dict[str, str] | None = None
    ) -> web.StreamResponse:
        if wants_json:
            return web.json_response({"error": message}, status=status, headers=headers)
        response = _render_login(request, next_, message, status)
        response.headers.update(headers or {})
        return response

    if not cfg.password:
        return refuse(403, NO_PASSWORD)
    client = request.remote or "unknown"
    wait = auth.limiter.retry_after(client)
    if wait > 0:
        seconds = int(wait) + 1
        return refuse(
            429,
            f"too many failed logins; try again in {seconds} s",
            {hdrs.RETRY_AFTER: str(seconds)},
        )
    if not isinstance(password, str) or not password_matches(password, cfg.password):
        auth.limiter.failed(client)
        log.warning("admin login failed", extra={"client": client})
        return refuse(401, "wrong password")
    auth.limiter.succeeded(client)
    token, expires = auth.issue(cfg)
    log.info("admin logged in", extra={"client": client})
    response: web.StreamResponse
    if wants_json:
        response = web.json_response(
            {"token": token, "token_type": "Bearer", "expires_at": expires}
        )
    else:
        response = web.Response(status=303, headers={hdrs.LOCATION: next_})
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(cfg.token_ttl),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=_is_https(request),
    )
    return response


async def logout(request: web.Request) -> web.Response:
    response = web.Response(status=303, headers={hdrs.LOCATION: "/login"})
    response.del_cookie(COOKIE, path="/")
    return response


def setup(app: web.Application) -> None:
    app[AUTH] = AdminAuth()
    AdminAuth.warn_if_ephemeral(app[LIVE].config.admin)
    app.middlewares.append(guard)
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
