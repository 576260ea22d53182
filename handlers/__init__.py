"""Platform adapters and HTTP routes; `setup(app)` plugs them into the core's app, `doctor` collects
the enabled platforms' `python run.py doctor` checks."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from gateway.config import Config
from gateway.doctor import Check
from gateway.keys import CONFIG

from . import admin, auth, dingtalk, feishu, robots, routes, status, webchat
from .dingtalk import doctor as dingtalk_doctor
from .feishu import doctor as feishu_doctor


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


def doctor(config: Config, http: aiohttp.ClientSession) -> list[Check]:
    checks: list[Check] = []
    if config.dingtalk.enabled:
        checks += dingtalk_doctor.checks(config, http)
    if config.feishu.enabled:
        checks += feishu_doctor.checks(config, http)
    return checks
