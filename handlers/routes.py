"""Operational routes: /healthz (alive), /readyz (store usable, enabled channels connected), /metrics."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.channel import ChannelState
from gateway.errors import StoreError
from gateway.i18n import N_
from gateway.keys import CHANNELS, CONFIG, DISPATCHER, METRICS, STORE
from gateway.logs import redacted
from gateway.outbox import Pusher
from gateway.store import FAILED, QUEUED, SENT

from . import pages
from .auth import authenticated
from .http import errors_and_metrics


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


def unconfigured_platforms(request: web.Request) -> dict[str, str]:
    """Platforms the config leaves disabled, with what to set to enable them."""
    cfg = request.app[CONFIG]
    out = {}
    if not cfg.enabled_bots("dingtalk"):
        out["dingtalk"] = N_(
            "not configured: set [dingtalk] enabled = true, client_id and client_secret "
            "(BOTGATE_DINGTALK__ENABLED, BOTGATE_DINGTALK__CLIENT_ID, BOTGATE_DINGTALK__CLIENT_SECRET)"
        )
    if not cfg.enabled_bots("feishu"):
        out["feishu"] = N_(
            "not configured: set [feishu] enabled = true, app_id and app_secret "
            "(BOTGATE_FEISHU__ENABLED, BOTGATE_FEISHU__APP_ID, BOTGATE_FEISHU__APP_SECRET)"
        )
    if not cfg.enabled_bots("wecom"):
        out["wecom"] = N_(
            "not configured: set [wecom] enabled = true, bot_id and secret "
            "(BOTGATE_WECOM__ENABLED, BOTGATE_WECOM__BOT_ID, BOTGATE_WECOM__SECRET)"
        )
    return out  # English in /readyz; the status page shows them translated (its `translate` filter)


async def readyz(request: web.Request) -> web.Response:
    """Open to everyone, so it says only states and short reasons ("store unavailable", "dingtalk
    reconnecting"); error texts (hosts, URLs, platform messages) are added for a caller with an admin
    credential and are on the status page (docs/security.md)."""
    app = request.app
    detailed = authenticated(request)
    reasons: list[str] = []
    if DISPATCHER in app and not app[DISPATCHER].accepting:
        reasons.append("shutting down")
    try:
        await app[STORE].ping()
        store = "ok"
    except StoreError as e:
        store = f"unavailable: {e}" if detailed else "unavailable"
        reasons.append(f"store {store}")
    channels = {}
    for key, channel in app[CHANNELS].items():  # one per bot: "dingtalk/hrbot"
        status = channel.status()
        channels[key] = status.state.value
        if not status.ready:
            detail = f" ({status.last_error})" if status.last_error and detailed else ""
            reasons.append(f"{key} {status.state.value}{detail}")
    body = {
        "ready": not reasons,
        "store": store,
        "channels": channels,
        "not_configured": unconfigured_platforms(request),
    }
    if reasons:
        body["reason"] = "; ".join(reasons)
    # No credential in what it shows, for an admin either (tickets in URLs, tokens: gateway/logs.py).
    return web.json_response(redacted(body, app[CONFIG].secrets()), status=200 if not reasons else 503)


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    m = app[METRICS]
    # The one place that sets botgate_channel_connected: a series per running bot (bounded: the
    # configured bots), rebuilt at every scrape so a bot no longer running leaves no stale series.
    m.channel_connected.clear()
    for channel in app[CHANNELS].values():
        status = channel.status()
        if status.state is ChannelState.DISABLED:
            continue  # not running on purpose: no series, so no "disconnected" alert
        m.channel_connected.labels(status.platform, status.bot).set(1 if status.ready else 0)
        # Start per-platform counters at 0 so rate() and alerts see them before the first event.
        m.reconnects.labels(status.platform)
        m.dedup_dropped.labels(status.platform)
        if isinstance(channel, Pusher):  # a 0 first, so increase() sees the first failed message
            for state in (QUEUED, SENT, FAILED):
                m.outbox.labels(status.platform, state)
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def setup(app: web.Application) -> None:
    pages.install(aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True))
    app.middlewares.append(errors_and_metrics)  # outermost
    app.router.add_static("/static", TEMPLATES / "static", append_version=True)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
