"""Platform adapters and HTTP routes; `setup(app)` plugs them into the core's app."""

from __future__ import annotations

from aiohttp import web

from gateway.keys import CONFIG

from . import dingtalk, feishu, routes, webchat


def setup(app: web.Application) -> None:
    routes.setup(app)
    webchat.setup(app)
    if app[CONFIG].dingtalk.enabled:
        dingtalk.setup(app)
    if app[CONFIG].feishu.enabled:
        feishu.setup(app)
