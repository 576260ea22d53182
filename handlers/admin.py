"""Admin API (JSON, behind the admin login): status snapshot, reset a conversation, reconnect a
channel, reload the config."""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from gateway.app import reload_config
from gateway.config import ConfigError
from gateway.errors import GatewayError, StoreError
from gateway.keys import CHANNELS, STORE

from .http import json_error
from .status import snapshot

log = logging.getLogger(__name__)

MAX_KEY = 512


async def status(request: web.Request) -> web.Response:
    return web.json_response(await snapshot(request), dumps=lambda v: orjson.dumps(v).decode())


async def reset_conversation(request: web.Request) -> web.Response:
    """Body `{"conversation": "<platform>:<conversation id>"}` (the key shown in the logs)."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return json_error(400, "malformed JSON")
    key = body.get("conversation") if isinstance(body, dict) else None
    if not isinstance(key, str) or ":" not in key or not 2 < len(key) <= MAX_KEY:
        return json_error(400, 'expected {"conversation": "<platform>:<conversation id>"}')
    try:
        await request.app[STORE].reset(key)
    except StoreError as e:
        return json_error(503, f"store unavailable: {e}")
    log.info("admin reset a conversation", extra={"conversation": key, "client": request.remote})
    return web.json_response({"reset": key})


async def reconnect_channel(request: web.Request) -> web.Response:
    platform = request.match_info["platform"]
    channels = request.app[CHANNELS]
    channel = channels.get(platform)
    if channel is None:
        return json_error(404, f"no channel {platform!r}", channels=sorted(channels))
    try:
        await channel.reconnect()
    except GatewayError as e:
        return json_error(502, f"reconnect failed: {e}")
    log.info("admin requested a reconnect", extra={"platform": platform, "client": request.remote})
    return web.json_response({"platform": platform, "state": channel.status().state.value})


async def reload(request: web.Request) -> web.Response:
    try:
        report = await reload_config(request.app)
    except ConfigError as e:
        return json_error(400, f"config not reloaded: {e}")
    return web.json_response(report.to_dict())


def setup(app: web.Application) -> None:
    app.router.add_get("/api/status", status)
    app.router.add_post("/api/conversations/reset", reset_conversation)
    app.router.add_post("/api/channels/{platform}/reconnect", reconnect_channel)
    app.router.add_post("/api/reload", reload)
