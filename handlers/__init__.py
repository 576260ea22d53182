"""Platform adapters and HTTP routes; `setup(app)` plugs them into the core's app."""

from __future__ import annotations

from aiohttp import web

from gateway.keys import CONFIG

from . import admin, auth, dingtalk, feishu, robots, routes, status, webchat


def setup(app: web.Application) -> None:
    routes.setup(app)  # templates, JSON errors + request metrics (outermost middleware), ops routes
    auth.setup(app)  # admin login in front of everything below
    status.setup(app)
    admin.setup(app)
    robots.setup(app)  # the alert notifier
    webchat.setup(app)
    if app[CONFIG].dingtalk.enabled:
        dingtalk.setup(app)
    if app[CONFIG].feishu.enabled:
        feishu.setup(app)
