"""Feishu/Lark's `python run.py doctor` checks, on the adapter's own API client."""

from __future__ import annotations

import aiohttp

from gateway.budget import ApiBudget
from gateway.config import Config
from gateway.doctor import (
    Check,
    CredentialsCheck,
    Result,
    check_clock,
    endpoint_reachable,
    failed,
    passed,
    reach_fix,
    refused,
)
from gateway.errors import PlatformError
from gateway.metrics import Metrics

from .api import FeishuApi
from .parse import PLATFORM

CREDENTIALS_FIX = (
    "set [feishu] app_id and app_secret to the app's App ID and App Secret (developer console > "
    "Credentials & Basic Info; env BOTGATE_FEISHU__APP_ID, BOTGATE_FEISHU__APP_SECRET); a Lark app "
    'needs [feishu] domain = "https://open.larksuite.com"'
)
WS_FIX = (
    "in the developer console, subscribe to events through the long connection (Events & Callbacks > "
    "receive events through persistent connection), publish the app version, check app_id/app_secret"
)
BOT_FIX = "enable the app's Bot feature (developer console > Features > Bot) and publish a new version"


def checks(config: Config, http: aiohttp.ClientSession) -> list[Check]:
    cfg = config.feishu
    api = FeishuApi(http, cfg.domain, cfg.app_id, cfg.app_secret, ApiBudget(PLATFORM, 0, Metrics()))
    credentials = CredentialsCheck(
        "Feishu", cfg.app_id, api.tokens, cfg.domain, CREDENTIALS_FIX, "a tenant access token"
    )

    async def ws_endpoint() -> Result:
        try:
            url = (await api.ws_endpoint()).get("URL")
        except PlatformError as e:
            return failed(str(e), reach_fix(cfg.domain) if e.retryable else WS_FIX)
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            return failed("the endpoint call answered without a websocket URL", WS_FIX)
        return await endpoint_reachable(url, "got a websocket URL", "endpoint call answered")

    async def identity() -> Result:
        if (skip := credentials.needs_token()) is not None:
            return skip
        try:
            open_id = await api.bot_open_id()
        except PlatformError as e:
            return refused(e, "cannot ask for the bot's identity", cfg.domain, "the app has no bot identity", BOT_FIX)
        return passed(f"bot open_id {open_id}")

    async def clock() -> Result:
        # Our clock ahead makes every event look old; past max_message_age it is dropped as a replay.
        why = "events look older than [feishu] max_message_age and are dropped as replays"
        return await check_clock(http, cfg.domain, "Feishu", why, ahead_limit=cfg.max_message_age)

    out = [Check("feishu credentials", credentials)]
    if cfg.mode in ("ws", "both"):
        out.append(Check("feishu ws endpoint", ws_endpoint))
    out += [Check("feishu bot identity", identity), Check("feishu clock", clock)]
    return out
