"""The send API (docs/api.md): `POST /api/v1/messages`, `GET /api/v1/messages/{id}`, and the guard in
front of every `/api/v1/` route (the Alertmanager receiver's too).

The guard: `[api] tokens` empty = the API is off (403 saying so); otherwise `Authorization: Bearer
<token>` or 401; each token may make `[api] rate_per_minute` calls a minute (429 with Retry-After,
counted in the store, so across instances). Every call is audited with the token's name — a
fingerprint of it, `token-<first 8 hex digits of its SHA-256>` — never the token.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import orjson
from aiohttp import hdrs, web

from gateway.auth import audit, bearer_matches
from gateway.errors import StoreError
from gateway.keys import LIVE, OUTBOX, STORE
from gateway.outbox import SendRefused, SendRequest
from gateway.store import OutboxEntry

from .auth import Handler, client_address, recording_status
from .http import API_V1, json_error

log = logging.getLogger(__name__)

API_TOKEN = web.RequestKey("api_token", str)  # the caller's token name, set by `guard`
# What audit records of this call add (the message id, its target), set by the handler.
API_AUDIT = web.RequestKey("api_audit", dict[str, Any])
MESSAGE_FIELDS = frozenset({"platform", "bot", "conversation", "user", "text", "markdown", "idempotency_key"})


def token_name(token: str) -> str:
    """How logs and audit records name a token: a fingerprint, not the secret."""
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:8]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(API_V1) or request.match_info.http_exception is not None:
        return await handler(request)
    cfg = request.app[LIVE].in_force.api
    resource = request.match_info.route.resource
    route = f"{request.method} {resource.canonical if resource is not None else request.path}"
    who = {"client_ip": client_address(request)}
    if not cfg.tokens:
        audit(route, "refused", status=403, reason="api off", **who)
        return json_error(403, "the send API is off: no [api] tokens are configured")
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    token = next((t for t in cfg.tokens if bearer_matches(header, t)), None)
    if token is None:
        audit(route, "refused", status=401, reason="no valid token" if header else "no token", **who)
        return web.json_response(
            {"error": "a valid API token is required: Authorization: Bearer <token>"},
            status=401,
            headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="botgate-api"'},
        )
    name = token_name(token)
    who["token"] = name
    try:
        allowed = await request.app[STORE].take_token(f"api:{name}", cfg.rate_per_minute)
    except StoreError as e:
        audit(route, "failed", status=503, reason="store unavailable", **who)
        return json_error(503, f"the store is unavailable: {e}")
    if not allowed:
        audit(route, "refused", status=429, reason="rate limited", **who)
        return web.json_response(
            {"error": f"rate limited: at most {cfg.rate_per_minute} calls a minute per token"},
            status=429,
            headers={hdrs.RETRY_AFTER: str(max(1, round(60 / cfg.rate_per_minute)))},
        )
    request[API_TOKEN] = name

    def record(status: int) -> None:
        result = "ok" if status < 400 else "refused" if status < 500 else "failed"
        audit(route, result, status=status, **who, **request.get(API_AUDIT, {}))

    return await recording_status(handler, request, record)


def bad_request(field: str | None, why: str) -> web.Response:
    return json_error(400, f"{field}: {why}" if field else why, field=field)


async def json_body(request: web.Request) -> dict[str, Any] | web.Response:
    """The body as a JSON object, or the 400 saying why not."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as e:
        return bad_request(None, f"the body is not JSON: {e}")
    if not isinstance(body, dict):
        return bad_request(None, "the body must be a JSON object")
    return body


def send_request(body: dict[str, Any], origin: str) -> SendRequest:
    """The message a `POST /api/v1/messages` body asks for; `SendRefused` names what is wrong."""
    unknown = sorted(set(body) - MESSAGE_FIELDS)
    if unknown:
        raise SendRefused(unknown[0], f"unknown field (fields: {', '.join(sorted(MESSAGE_FIELDS))})")
    for field in MESSAGE_FIELDS:
        if field in body and not isinstance(body[field], str):
            raise SendRefused(field, "must be a string")
    if not body.get("platform"):
        raise SendRefused("platform", "is required (dingtalk, feishu or wecom)")
    conversation, user = body.get("conversation"), body.get("user")
    if conversation is not None and user is not None:
        raise SendRefused("user", "give conversation (a group) or user (a 1:1 chat), not both")
    if conversation is None and user is None:
        raise SendRefused("conversation", "one of conversation (a group) or user (a 1:1 chat) is required")
    text, markdown = body.get("text"), body.get("markdown")
    if text is not None and markdown is not None:
        raise SendRefused("markdown", "give text or markdown, not both")
    if text is None and markdown is None:
        raise SendRefused("text", "one of text or markdown is required")
    return SendRequest(
        platform=body["platform"],
        bot=body.get("bot") or "default",
        to_kind="conversation" if conversation is not None else "user",
        to=conversation if conversation is not None else user or "",
        text=text if text is not None else markdown or "",
        markdown=markdown is not None,
        origin=origin,
        idempotency_key=body.get("idempotency_key", ""),
    )


def entry_json(entry: OutboxEntry) -> dict[str, Any]:
    """What the API says of a message: never its text (it may be anyone's to read)."""
    return {
        "id": entry.id,
        "state": entry.state,
        "reason": entry.reason,
        "platform": entry.platform,
        "bot": entry.bot,
        entry.to_kind: entry.to,
        "attempts": entry.attempts,
        "created_at": entry.created_at,
        "done_at": entry.done_at,
    }


async def post_message(request: web.Request) -> web.Response:
    body = await json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        send = send_request(body, f"token:{request[API_TOKEN]}")
        entry, fresh = await request.app[OUTBOX].enqueue(send)
    except SendRefused as e:
        return bad_request(e.field, e.why)
    except StoreError as e:  # nothing was queued: the caller may try again
        return json_error(503, f"not queued, the store is unavailable: {e}")
    request[API_AUDIT] = {"outbox_id": entry.id, "platform": entry.platform, "bot": entry.bot, "duplicate": not fresh}
    return web.json_response({"id": entry.id, "state": entry.state, "duplicate": not fresh}, status=202)


async def get_message(request: web.Request) -> web.Response:
    entry_id = request.match_info["id"]
    try:
        entry = await request.app[OUTBOX].get(entry_id)
    except StoreError as e:
        return json_error(503, f"the store is unavailable: {e}")
    if entry is None:
        return json_error(404, f"no message {entry_id!r} (unknown, or done more than [api] keep_for ago)")
    return web.json_response(entry_json(entry))


def setup(app: web.Application) -> None:
    app.middlewares.append(guard)
    app.router.add_post("/api/v1/messages", post_message)
    app.router.add_get("/api/v1/messages/{id}", get_message)
