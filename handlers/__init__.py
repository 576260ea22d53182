"""Platform adapters and HTTP routes; `setup(app)` plugs them into the core's app, `doctor` collects
the enabled platforms' `python run.py doctor` checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from gateway.config import DEFAULT_NAME, ENV_PREFIX, BotConfig, Config, DingTalkConfig, FeishuConfig, env_token
from gateway.doctor import Check, Result

from . import admin, alertmanager, api_v1, auth, dingtalk, feishu, robots, routes, status, webchat, wecom
from .dingtalk import doctor as dingtalk_doctor
from .feishu import doctor as feishu_doctor
from .wecom import doctor as wecom_doctor


def setup(app: web.Application) -> None:
    routes.setup(app)  # templates, JSON errors + request metrics (outermost middleware), ops routes
    auth.setup(app)  # admin login in front of everything below
    status.setup(app)
    admin.setup(app)
    api_v1.setup(app)  # the send API, behind its own tokens
    alertmanager.setup(app)  # Alertmanager's webhook receiver, behind the same tokens
    robots.setup(app)  # the alert notifier
    webchat.setup(app)
    dingtalk.setup(app)  # every enabled bot of each platform
    feishu.setup(app)
    wecom.setup(app)


def doctor(config: Config, http: aiohttp.ClientSession) -> list[Check]:
    """Every enabled bot's checks; a listed bot's are named by it ("dingtalk/hrbot credentials")."""
    checks: list[Check] = []
    contributors = {"dingtalk": dingtalk_doctor.checks, "feishu": feishu_doctor.checks, "wecom": wecom_doctor.checks}
    for bot in config.enabled_bots():
        one = as_section(config, bot)
        own = contributors[bot.platform](one, http)
        if bot.name != DEFAULT_NAME:
            own = [Check(c.name.replace(bot.platform, bot.key, 1), for_bot(c.run, bot)) for c in own]
        checks += own
    return checks


def as_section(config: Config, bot: BotConfig) -> Config:
    """`config` with `bot`'s settings as its platform's section: what the platform's checks read."""
    s = bot.settings
    if isinstance(s, DingTalkConfig):
        return dataclasses.replace(config, dingtalk=s)
    if isinstance(s, FeishuConfig):
        return dataclasses.replace(config, feishu=s)
    return dataclasses.replace(config, wecom=s)


def for_bot(run: Callable[[], Awaitable[Result]], bot: BotConfig) -> Callable[[], Awaitable[Result]]:
    """A platform check of a listed bot: its fix names the bot's own keys, not the section's
    (`[[dingtalk.bots]] hrbot client_secret`, `BOTGATE_DINGTALK__BOTS__HRBOT__CLIENT_SECRET`)."""
    section, env = f"[{bot.platform}]", f"{ENV_PREFIX}{bot.platform.upper()}__"

    async def checked() -> Result:
        result = await run()
        fix = result.fix.replace(section, f"[[{bot.platform}.bots]] {bot.name}")
        fix = fix.replace(env, f"{env}BOTS__{env_token(bot.name)}__")
        return dataclasses.replace(result, fix=fix)

    return checked
