"""Admin API (JSON, behind the admin login; every call is an audit record): status snapshot, reset a
conversation, reconnect a channel, reload the config, rotate the login token.

Reload, reset and rotate are sensitive: they also need the password or login token confirmed within
the last `gateway.auth.REAUTH_WINDOW` seconds (POST /login again gives a fresh session)."""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from gateway.app import reload_config
from gateway.auth import login_url
from gateway.config import ConfigError
from gateway.errors import GatewayError, StoreError
from gateway.keys import AUTH, CHANNELS, CONFIG, LIVE, STORE

from .auth import AUDIT_DETAIL, PRINCIPAL, require_recent_login, start_session
from .http import json_error
from .status import snapshot

log = logging.getLogger(__name__)

MAX_KEY = 512


async def status(request: web.Request) -> web.Response:
    return web.json_response(await snapshot(request), dumps=lambda v: orjson.dumps(v).decode())


async def reset_conversation(request: web.Request) -> web.Response:
    """Body `{"conversation": "<platform>:<conversation id>"}` (the key shown in the logs)."""
    refused = require_recent_login(request)
    if refused is not None:
        return refused
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return json_error(400, "malformed JSON")
    key = body.get("conversation") if isinstance(body, dict) else None
    if not isinstance(key, str) or ":" not in key or not 2 < len(key) <= MAX_KEY:
        return json_error(400, 'expected {"conversation": "<platform>:<conversation id>"}')
    request[AUDIT_DETAIL] = {"conversation": key}
    try:
        await request.app[STORE].reset(key)
    except StoreError as e:
        return json_error(503, f"store unavailable: {e}")
    return web.json_response({"reset": key})


async def reconnect_channel(request: web.Request) -> web.Response:
    platform = request.match_info["platform"]
    bot = request.match_info.get("bot", "default")
    request[AUDIT_DETAIL] = {"platform": platform, "bot": bot}
    channels = request.app[CHANNELS]
    channel = channels.get(f"{platform}/{bot}") or (channels.get(platform) if bot == "default" else None)
    if channel is None:
        return json_error(404, f"no channel {platform!r}", channels=sorted(channels))
    try:
        await channel.reconnect()
    except GatewayError as e:
        return json_error(502, f"reconnect failed: {e}")
    return web.json_response({"platform": platform, "state": channel.status().state.value})


async def reload(request: web.Request) -> web.Response:
    refused = require_recent_login(request)
    if refused is not None:
        return refused
    try:
        report = await reload_config(request.app)
    except ConfigError as e:
        return json_error(400, f"config not reloaded: {e}")
    request[AUDIT_DETAIL] = {"applied": list(report.applied), "needs_restart": list(report.needs_restart)}
    return web.json_response(report.to_dict())


async def rotate_login_token(request: web.Request) -> web.Response:
    """A new login token: the old one and every session made with it stop working. The caller gets a
    new session (cookie, and `token` for bearer callers); the new link is in the answer only."""
    refused = require_recent_login(request)
    if refused is not None:
        return refused
    auth = request.app[AUTH]
    try:
        token = auth.login_token.rotate()
    except OSError as e:
        return json_error(503, f"cannot store the new login token: {e.strerror or e}")
    body: dict[str, object] = {"rotated": True, "login_url": login_url(request.app[CONFIG].server, token)}
    if request.app[LIVE].config.admin.password:
        body["note"] = "a password is set, so the login token is not accepted until it is removed"
        return web.json_response(body)
    response = web.json_response(body)
    session = start_session(request, response)
    if request[PRINCIPAL].via != "cookie":
        body["token"] = session
        response = web.json_response(body)
    return response


def setup(app: web.Application) -> None:
    app.router.add_get("/api/status", status)
    app.router.add_post("/api/conversations/reset", reset_conversation)
    app.router.add_post("/api/channels/{platform}/reconnect", reconnect_channel)
    app.router.add_post("/api/channels/{platform}/{bot}/reconnect", reconnect_channel)
    app.router.add_post("/api/reload", reload)
    app.router.add_post("/api/login-token/rotate", rotate_login_token)
