"""Admin API (JSON, behind the admin login; every call is an audit record): status snapshot, the
bots and agents, a day's usage (JSON or CSV), reset a conversation, reconnect a channel, reload the
config, rotate the login token.

Reload, reset and rotate are sensitive: they also need the password or login token confirmed within
the last `gateway.auth.REAUTH_WINDOW` seconds (POST /login again gives a fresh session)."""

from __future__ import annotations

import csv
import io
import logging
import re
import time
from datetime import date
from typing import Any

import orjson
from aiohttp import web

from gateway.app import reload_config
from gateway.auth import login_url
from gateway.backends import uses_echo
from gateway.channel import ChannelState, ChannelStatus
from gateway.config import DEFAULT_NAME, BotConfig, ConfigError, masked
from gateway.errors import GatewayError, StoreError
from gateway.keys import AUTH, CHANNELS, CONFIG, LIVE, STORE
from gateway.logs import redacted
from gateway.usage import REPORT_KINDS, report, today, zone

from .auth import AUDIT_DETAIL, PRINCIPAL, require_recent_login, start_session
from .http import json_error
from .status import bot_agents, schedules, snapshot

log = logging.getLogger(__name__)

MAX_KEY = 512


def _json(body: object) -> web.Response:
    return web.json_response(body, dumps=lambda v: orjson.dumps(v).decode())


async def status(request: web.Request) -> web.Response:
    return _json(await snapshot(request))


WEBHOOK_MODES = ("webhook", "both")


def _bot(request: web.Request, bot: BotConfig, now: float) -> dict[str, Any]:
    """One configured bot: who answers it, how it receives, and its channel's state now."""
    cfg = request.app[LIVE].config
    agent, routed = bot_agents(cfg, bot.platform, bot.name)
    mode = bot.settings.mode
    base = f"/{bot.platform}/webhook"
    out: dict[str, Any] = {
        "key": bot.key,
        "platform": bot.platform,
        "name": bot.name,
        "agent": agent,
        "routed": routed,
        "enabled": bot.enabled,
        "mode": mode,
        "webhook": (base if bot.name == DEFAULT_NAME else f"{base}/{bot.name}") if mode in WEBHOOK_MODES else "",
    }
    channel = request.app[CHANNELS].get(bot.key)
    if channel is None:  # switched off, or listed by a reload: it starts with the next restart
        s = ChannelStatus(bot.platform, ChannelState.DISABLED, bot=bot.name)
        shown = "disabled" if not bot.enabled else "not running (restart to start it)"
    else:
        s = channel.status()
        shown = s.state.value
    return out | {
        "state": shown,
        "ready": s.ready,
        "transports": list(s.transports),
        "connected_since": s.connected_since,
        "last_event_at": s.last_event_at,
        "last_event_age": None if s.last_event_at is None else max(0.0, now - s.last_event_at),
        "reconnects": s.reconnects,
        "last_error": s.last_error,
    }


async def bots(request: web.Request) -> web.Response:
    """Every configured bot (disabled ones too), in config order."""
    cfg = request.app[LIVE].config
    now = time.time()
    body = {"bots": [_bot(request, bot, now) for bot in cfg.bots]}
    return _json(redacted(body, cfg.secrets()))  # error texts may quote a ticket or token


async def agents(request: web.Request) -> web.Response:
    """Every agent ("default" is `[model]`), with the bots and routes it answers for; never a key
    (only how many there are) and no password of its base_url."""
    cfg = request.app[LIVE].config
    dump = masked(cfg)
    base_urls = {DEFAULT_NAME: dump["model"]["base_url"]} | {a["name"]: a["base_url"] for a in dump["agents"]}
    out = []
    for agent in (cfg.agent(DEFAULT_NAME), *cfg.agents):
        model = agent.model
        out.append(
            {
                "name": agent.name,
                "provider": model.provider,
                "echo": uses_echo(model),  # no model behind it: answers are echoed
                "model": model.model,
                "base_url": base_urls[agent.name],
                "api_keys": len(model.api_keys),
                "group_context": agent.group_context,
                "bots": [b.key for b in cfg.bots if bot_agents(cfg, b.platform, b.name)[0] == agent.name],
                "routes": [
                    {"index": i, "platform": r.platform, "bot": r.bot, "conversation": r.conversation}
                    for i, r in enumerate(cfg.routes, 1)
                    if r.agent == agent.name
                ],
            }
        )
    return _json(redacted({"agents": out}, cfg.secrets()))


async def schedules_list(request: web.Request) -> web.Response:
    """Every `[[schedules]]` entry: target, cron and time zone, next run, last run and its result."""
    body = {"schedules": await schedules(request.app)}
    return _json(redacted(body, request.app[LIVE].config.secrets()))  # a failure's reason may quote a URL


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
        name = platform if bot == "default" else f"{platform}/{bot}"
        return json_error(404, f"no channel {name!r}", channels=sorted(channels))
    try:
        await channel.reconnect()
    except GatewayError as e:
        return json_error(502, f"reconnect failed: {e}")
    return web.json_response({"platform": platform, "bot": bot, "state": channel.status().state.value})


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


DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
USAGE_LIMIT, MAX_USAGE_LIMIT = 20, 1000
CSV_COLUMNS = ("kind", "key", "messages", "tokens", "estimated_tokens")


def _cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text, never runs as a formula (a key is user data)."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


async def usage(request: web.Request) -> web.Response:
    """`?day=YYYY-MM-DD` (default: today in `[quotas] timezone`), `?limit=` (20), `?format=csv`:
    the day's top users, groups, bots and agents by tokens (gateway/usage.py)."""
    cfg = request.app[LIVE].config
    day = request.query.get("day") or today(zone(cfg)).isoformat()
    try:
        valid = bool(DAY.fullmatch(day)) and bool(date.fromisoformat(day))
    except ValueError:
        valid = False
    if not valid:
        return json_error(400, "day must be a date, YYYY-MM-DD")
    try:
        limit = int(request.query.get("limit", USAGE_LIMIT))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_USAGE_LIMIT:
        return json_error(400, f"limit must be between 1 and {MAX_USAGE_LIMIT}")
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        return json_error(400, "format must be json or csv")
    request[AUDIT_DETAIL] = {"day": day, "format": fmt}
    try:
        figures = await report(request.app[STORE], day, limit)
    except StoreError as e:
        return json_error(503, f"store unavailable: {e}")
    if fmt == "json":
        return _json({"day": day, "timezone": cfg.quotas.timezone, **figures})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for name, kind in REPORT_KINDS.items():
        for row in figures[name]:
            writer.writerow([kind, *(_cell(row[c]) for c in CSV_COLUMNS[1:])])
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="botgate-usage-{day}.csv"'},
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/bots", bots)
    app.router.add_get("/api/agents", agents)
    app.router.add_get("/api/usage", usage)
    app.router.add_get("/api/schedules", schedules_list)
    app.router.add_post("/api/conversations/reset", reset_conversation)
    app.router.add_post("/api/channels/{platform}/reconnect", reconnect_channel)
    app.router.add_post("/api/channels/{platform}/{bot}/reconnect", reconnect_channel)
    app.router.add_post("/api/reload", reload)
    app.router.add_post("/api/login-token/rotate", rotate_login_token)
