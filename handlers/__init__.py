"""Platform adapters and HTTP routes; `setup(app)` plugs them into the core's app, `doctor` collects
the enabled platforms' `python run.py doctor` checks."""

from __future__ import annotations

import dataclasses

import aiohttp
from aiohttp import web

from gateway.config import DEFAULT_NAME, Config, DingTalkConfig
from gateway.doctor import Check

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
    dingtalk.setup(app)  # every enabled bot of each platform
    feishu.setup(app)


def doctor(config: Config, http: aiohttp.ClientSession) -> list[Check]:
    """Every enabled bot's checks; a listed bot's are named by it ("dingtalk/hrbot credentials")."""
    checks: list[Check] = []
    contributors = {"dingtalk": dingtalk_doctor.checks, "feishu": feishu_doctor.checks}
    for bot in config.enabled_bots():
        s = bot.settings
        one = (
            dataclasses.replace(config, dingtalk=s)
            if isinstance(s, DingTalkConfig)
            else dataclasses.replace(config, feishu=s)
        )
        own = contributors[bot.platform](one, http)
        if bot.name != DEFAULT_NAME:
            own = [dataclasses.replace(c, name=c.name.replace(bot.platform, bot.key, 1)) for c in own]
        checks += own
    return checks
