"""Admin access: login (password or login token), the credential check in front of every admin
surface, Origin checks, re-authentication for sensitive operations, audit records, security headers.

The status page (`/`, `/status/...`), the web chat (`/chat...`) and the admin API (`/api/...`) need a
credential from every peer, whatever its address (docs/security.md): a session (a JWT from
gateway.auth) in an HttpOnly SameSite=Strict cookie for browsers or `Authorization: Bearer <token>`
for scripts (POST /login with JSON returns one); without `[admin] password`, the login token itself
also works as a bearer token. A state-changing request (and the `/chat/ws` upgrade) must come from
this origin: a foreign `Origin` is refused, and a cookie without any `Origin` too.
`/healthz`, `/readyz`, `/login`, `/logout`, `/static` and the platform webhooks stay open; `/metrics`
needs `Authorization: Bearer <metrics_token>` when `[admin] metrics_token` is set.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import orjson
from aiohttp import hdrs, web
from yarl import URL

from gateway.auth import (
    REAUTH_WINDOW,
    AdminAuth,
    Principal,
    TokenError,
    audit,
    bearer_matches,
    login_url,
)
from gateway.config import Config
from gateway.i18n import N_, Locale, translator
from gateway.keys import AUTH, CONFIG, LIVE
from gateway.logs import SHOWS_CREDENTIAL

from .http import API_V1, json_error
from .pages import locale_of

log = logging.getLogger(__name__)

COOKIE = "botgate_admin"
ADMIN_PREFIXES = ("/status", "/chat", "/api/")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REAUTH_REQUIRED = "re-authentication required"
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
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# When the login behind this request ends (Unix time); long-lived responses stop there.
SESSION_EXPIRES = web.RequestKey("admin_session_expires", float)
PRINCIPAL = web.RequestKey("admin_principal", Principal)
# What an admin handler adds to its audit record (the conversation reset, the channel, ...).
AUDIT_DETAIL = web.RequestKey("admin_audit_detail", dict[str, Any])
TRUSTED_PROXIES = web.AppKey("trusted_proxies", tuple[Network, ...])


def is_admin_path(path: str) -> bool:
    """The page and admin API; not the send API (`/api/v1/`), which takes its own tokens."""
    return path == "/" or (path.startswith(ADMIN_PREFIXES) and not path.startswith(API_V1))


# -- who is asking --------------------------------------------------------------------------------
def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def client_address(request: web.Request) -> str:
    """The client's address: the TCP peer, or — when the peer is one of `[server] trusted_proxies`
    — the first address in `X-Forwarded-For`, read from the right, that is not a trusted proxy.
    Nobody else's forwarding headers are believed."""
    peer = request.remote or ""
    networks = request.app.get(TRUSTED_PROXIES, ())
    if not networks:
        return peer
    hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", ()) for hop in value.split(",")]
    client = peer
    for hop in reversed(hops):
        if not _trusted(client, networks):
            break
        try:
            client = str(ipaddress.ip_address(hop))
        except ValueError:
            break  # a malformed hop: stop at the last proxy we trust
    return client


def _who(request: web.Request) -> dict[str, Any]:
    """The audit record's "who" and "from where"."""
    principal = request.get(PRINCIPAL)
    fields: dict[str, Any] = {"client_ip": client_address(request)}
    if fields["client_ip"] != request.remote:
        fields["peer"] = request.remote
    if principal is None:
        fields["actor"] = "anonymous"
    else:
        fields.update(actor="admin", credential=principal.credential, via=principal.via)
        if principal.session:
            fields["session"] = principal.session
    return fields


def same_origin(request: web.Request, origin: str) -> bool:
    """Does an `Origin` header name the host this request was sent to (scheme's default port
    included)? The `Host` header is what the browser addressed; proxies in front must keep it."""
    try:
        url = URL(origin)
        if url.scheme not in ("http", "https") or not url.host:
            return False
        addressed = URL(f"{url.scheme}://{request.host}")
    except ValueError:
        return False
    return url.host == addressed.host and url.port == addressed.port and url.path in ("", "/")


def _is_upgrade(request: web.Request) -> bool:
    return request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


def _token(request: web.Request) -> tuple[str, str]:
    """The credential presented and how: ("...", "bearer" | "cookie"), or ("", "")."""
    scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), "bearer"
    cookie = request.cookies.get(COOKIE, "")
    return (cookie, "cookie") if cookie else ("", "")


def _wants_page(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and "text/html" in request.headers.get(hdrs.ACCEPT, "")
        and not request.path.startswith(("/api/", "/status/"))
        and not _is_upgrade(request)
    )


def _unauthorized(request: web.Request, reason: str) -> web.StreamResponse:
    if _wants_page(request):
        location = f"/login?next={quote(request.path_qs, safe='/')}"
        return web.Response(status=302, headers={hdrs.LOCATION: location})
    challenge = 'Bearer realm="botgate"' + (', error="invalid_token"' if reason != "login required" else "")
    return web.json_response(
        {"error": reason, "login": "/login"},
        status=401,
        headers={hdrs.WWW_AUTHENTICATE: challenge},
    )


def _origin_refusal(request: web.Request, via: str) -> web.Response | None:
    """State-changing requests and websocket upgrades must come from this origin.

    Browsers say where a request comes from: `Sec-Fetch-Site` (set by the browser, never by a
    page) must be `same-origin` when present, and `Origin` must name this host. A form posted from
    a page with `Referrer-Policy: no-referrer` (ours) carries `Origin: null`; it passes on
    `Sec-Fetch-Site: same-origin` alone. A cookie that arrives with neither is refused: browsers
    send them on every such request. Scripts with a bearer token send neither and need neither (a
    bearer token is never sent implicitly)."""
    if request.method in SAFE_METHODS and not _is_upgrade(request):
        return None
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        return json_error(403, "cross-origin request refused")
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None or origin == "null":
        if site == "same-origin" or (origin is None and via != "cookie"):
            return None
        return json_error(403, "Origin header required" if origin is None else "cross-origin request refused")
    if not same_origin(request, origin):
        return json_error(403, "cross-origin request refused")
    return None


def _check_admin(request: web.Request) -> web.StreamResponse | None:
    """None when the request may proceed (PRINCIPAL set), else the response that refuses it."""
    token, via = _token(request)
    refused = _origin_refusal(request, via)
    if refused is not None:
        return refused
    if not token:
        return _unauthorized(request, "login required")
    cfg = request.app[LIVE].config.admin
    try:
        principal = request.app[AUTH].principal(cfg, token, via)
    except TokenError as e:
        return _unauthorized(request, str(e))
    request[PRINCIPAL] = principal
    request[SESSION_EXPIRES] = principal.expires
    return None


def authenticated(request: web.Request) -> bool:
    """Does this request carry a valid admin credential? (For open routes that tell the admin more
    than they tell everyone, like /readyz.)"""
    token, via = _token(request)
    if not token or AUTH not in request.app:
        return False
    try:
        request.app[AUTH].principal(request.app[LIVE].config.admin, token, via)
    except TokenError:
        return False
    return True


def still_logged_in(request: web.Request) -> bool:
    """For long-lived responses (the status feed): does the credential behind `request` still hold,
    with no logout, rotated token or changed password since it began?"""
    return PRINCIPAL not in request or authenticated(request)


def require_recent_login(request: web.Request) -> web.Response | None:
    """None when the credential behind `request` was confirmed within `REAUTH_WINDOW`; else the 401
    asking for it again (RFC 9470's step-up challenge): POST /login with the password or login token
    gives a fresh session."""
    principal = request.get(PRINCIPAL)
    if principal is not None and principal.fresh():
        return None
    window = int(REAUTH_WINDOW)
    return web.json_response(
        {"error": REAUTH_REQUIRED, "login": "/login", "max_age": window},
        status=401,
        headers={
            hdrs.WWW_AUTHENTICATE: (
                f'Bearer realm="botgate", error="insufficient_user_authentication", max_age={window}'
            )
        },
    )


def _result(status: int) -> str:
    return "ok" if status < 400 else "refused" if status in (401, 403, 429) else "failed"


def _audit_request(request: web.Request, status: int) -> None:
    resource = request.match_info.route.resource
    action = f"{request.method} {resource.canonical if resource is not None else request.path}"
    audit(action, _result(status), status=status, **_who(request), **request.get(AUDIT_DETAIL, {}))


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.match_info.http_exception is not None:
        return await handler(request)  # no such route (404/405): saying so reveals nothing worth a login
    if request.path == "/metrics":
        token = request.app[LIVE].config.admin.metrics_token
        if token and not bearer_matches(request.headers.get(hdrs.AUTHORIZATION, ""), token):
            return web.json_response(
                {"error": "metrics token required"},
                status=401,
                headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="botgate-metrics"'},
            )
        return await handler(request)
    if not is_admin_path(request.path):
        return await handler(request)
    refused = _check_admin(request)
    # Every admin API call is audited, and every opened web chat; page views are not.
    audited = request.path.startswith("/api/") or request.path == "/chat/ws"
    if refused is not None:
        if audited or refused.status == 403:
            _audit_request(request, refused.status)
        return refused
    if request.path == "/chat/ws" and _is_upgrade(request):
        _audit_request(request, 101)  # recorded as it opens: the handler returns only when it closes
        return await handler(request)
    if not audited:
        return await handler(request)
    return await recording_status(handler, request, lambda status: _audit_request(request, status))


async def recording_status(
    handler: Handler, request: web.Request, record: Callable[[int], None]
) -> web.StreamResponse:
    """`handler(request)`, then `record` the status it answered with (500 when it raised anything
    but an HTTP answer): for audit records, which must exist whatever the outcome."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        record(status)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if is_admin_path(request.path) or request.path in ("/login", "/logout"):
        response.headers.setdefault(hdrs.CACHE_CONTROL, "no-store")


# -- login and logout -----------------------------------------------------------------------------
def _safe_next(target: str) -> str:
    """Only local paths: no scheme, no host, no `//evil` or `/\\evil`, and nothing but printable
    ASCII (a TAB or newline would turn into `//evil` in a browser, or break the header)."""
    if (
        target.startswith("/")
        and not target.startswith("//")
        and "\\" not in target
        and all(0x21 <= ord(c) < 0x7F for c in target)
    ):
        return target
    return "/"


def _is_https(request: web.Request) -> bool:
    # Trusting X-Forwarded-Proto here can only make the cookie stricter, never looser.
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


# The login's refusals: in English in JSON answers, in the page's language on the login page.
PASSWORD_IS_SET = N_("a password is set: log in with it")
TOO_MANY_LOGINS = N_("too many failed logins; try again in {seconds} s")
WRONG_PASSWORD = N_("wrong password")
WRONG_TOKEN = N_("wrong login token")


def _field(cfg: Config) -> str:
    """The login form's field: the password, or the login token when no password is set."""
    return "password" if cfg.admin.password else "token"


async def login_page(request: web.Request) -> web.StreamResponse:
    next_ = _safe_next(request.query.get("next", "/"))
    token = request.query.get("token")
    if token is not None:  # the login link
        if request.app[LIVE].config.admin.password:  # never a password in a URL
            return _render_login(request, next_, PASSWORD_IS_SET, status=400)
        return await _attempt(request, token, next_, wants_json=False)
    return _render_login(request, next_=next_)


def _render_login(
    request: web.Request, next_: str, error: str = "", status: int = 200, **fields: object
) -> web.Response:
    """The login page; `error` is a catalog text (its `fields` filled in), shown in the page's language."""
    locale = locale_of(request)
    shown = translator(locale)(error, **fields) if error else ""
    context = {"field": _field(request.app[LIVE].config), "error": shown, "next": next_, "locale": locale}
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


def _set_session(request: web.Request, response: web.StreamResponse, token: str) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(request.app[LIVE].config.admin.token_ttl),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=_is_https(request),
    )


async def login(request: web.Request) -> web.StreamResponse:
    refused = _origin_refusal(request, "")  # login CSRF (no ambient credential to require Origin for)
    if refused is not None:
        audit("login", "refused", reason="origin", **_who(request))
        return refused
    wants_json = request.content_type == "application/json"
    body = await _login_form(request)
    if body is None:
        return json_error(400, "expected a JSON object or a form with a password or login token")
    field = _field(request.app[LIVE].config)
    return await _attempt(request, body.get(field), _safe_next(str(body.get("next") or "/")), wants_json)


async def _attempt(request: web.Request, given: object, next_: str, wants_json: bool) -> web.StreamResponse:
    """Check a password or login token (rate-limited); on success start a session."""
    cfg = request.app[LIVE].config.admin
    auth: AdminAuth = request.app[AUTH]
    client = client_address(request)
    credential = AdminAuth.credential(cfg)

    def refuse(
        status: int, message: str, headers: dict[str, str] | None = None, **fields: object
    ) -> web.StreamResponse:
        if wants_json:
            error = translator(Locale.EN)(message, **fields)
            return web.json_response({"error": error}, status=status, headers=headers)
        response = _render_login(request, next_, message, status, **fields)
        response.headers.update(headers or {})
        return response

    wait = auth.limiter.retry_after(client)
    if wait > 0:
        seconds = int(wait) + 1
        audit("login", "refused", reason="rate limited", credential=credential, **_who(request))
        return refuse(429, TOO_MANY_LOGINS, {hdrs.RETRY_AFTER: str(seconds)}, seconds=seconds)
    if not isinstance(given, str) or not auth.check(cfg, given):
        auth.limiter.failed(client)
        audit("login", "refused", reason=f"wrong {credential}", credential=credential, **_who(request))
        return refuse(401, WRONG_PASSWORD if cfg.password else WRONG_TOKEN)
    auth.limiter.succeeded(client)
    token, expires = auth.issue(cfg)
    audit("login", "ok", **{**_who(request), "actor": "admin", "credential": credential})
    response: web.StreamResponse
    if wants_json:
        response = web.json_response({"token": token, "token_type": "Bearer", "expires_at": expires})
    else:
        response = web.Response(status=303, headers={hdrs.LOCATION: next_})
    _set_session(request, response, token)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """End every session (the session epoch moves on) and clear the cookie."""
    token, via = _token(request)
    refused = _origin_refusal(request, via)
    if refused is not None:
        audit("logout", "refused", reason="origin", **_who(request))
        return refused
    if token:
        try:
            request[PRINCIPAL] = request.app[AUTH].principal(request.app[LIVE].config.admin, token, via)
        except TokenError:
            pass  # nothing to revoke; still clear the cookie
        else:
            request.app[AUTH].logout()
            audit("logout", "ok", **_who(request))
    response: web.StreamResponse
    if via == "bearer":
        response = web.json_response({"logged_out": True})
    else:
        response = web.Response(status=303, headers={hdrs.LOCATION: "/login"})
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
    return response


def start_session(request: web.Request, response: web.StreamResponse) -> str:
    """A new session for the caller (after the credential behind its old one changed), keeping when
    it last confirmed its credential. Returns the token (also set as the cookie for browsers)."""
    principal = request[PRINCIPAL]
    auth_time = None if principal.via == "login-token" else principal.auth_time
    token, _ = request.app[AUTH].issue(request.app[LIVE].config.admin, auth_time=auth_time)
    if principal.via == "cookie":
        _set_session(request, response, token)
    return token


# -- the login link ---------------------------------------------------------------------------------
def announce_login_link(config: Config, auth: AdminAuth) -> None:
    """The one log line that carries the login token: the link to open (no password is set)."""
    url = login_url(config.server, auth.login_token.current())
    log.warning(
        "no admin password is set: log in to the status page, web chat and admin API at %s",
        url,
        extra={"login_url": url, **SHOWS_CREDENTIAL},  # the link must work: not masked
    )


def setup(app: web.Application) -> None:
    config = app[CONFIG]
    # `memory://` keeps nothing on disk, the login token included.
    state_dir = None if config.store.url.startswith("memory://") else config.state_dir
    app[AUTH] = AdminAuth(state_dir)
    app[TRUSTED_PROXIES] = tuple(ipaddress.ip_network(c, strict=False) for c in config.server.trusted_proxies)
    AdminAuth.warn_if_ephemeral(config.admin)

    async def announce(app: web.Application) -> AsyncIterator[None]:
        if not app[LIVE].config.admin.password:
            announce_login_link(app[LIVE].config, app[AUTH])
        yield

    def on_reload(new: Config) -> None:
        if app[LIVE].config.admin.password and not new.admin.password:
            announce_login_link(new, app[AUTH])  # the password was removed: the token takes over

    app.cleanup_ctx.append(announce)
    app[LIVE].add_applier(frozenset(), on_reload)
    app.middlewares.append(guard)
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)

