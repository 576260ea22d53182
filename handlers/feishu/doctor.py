"""Feishu/Lark's `python run.py doctor` checks, on the adapter's own API client."""

from __future__ import annotations

import aiohttp

from gateway import doctor
from gateway.budget import ApiBudget
from gateway.config import Config, FeishuConfig
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
FREE_PLAN_CALLS = 10_000  # API calls a month of a tenant on the free plan ("自建应用 API 调用量上限调整说明")


def checks(config: Config, http: aiohttp.ClientSession) -> list[doctor.Check]:
    cfg = config.feishu
    api = FeishuApi(http, cfg.domain, cfg.app_id, cfg.app_secret, ApiBudget(PLATFORM, 0, Metrics()))
    credentials = doctor.CredentialsCheck(
        "Feishu", cfg.app_id, api.tokens, cfg.domain, CREDENTIALS_FIX, "a tenant access token"
    )

    async def ws_endpoint() -> doctor.Result:
        try:
            url = (await api.ws_endpoint()).get("URL")
        except PlatformError as e:
            return doctor.failed(str(e), doctor.reach_fix(cfg.domain) if e.retryable else WS_FIX)
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            return doctor.failed("the endpoint call answered without a websocket URL", WS_FIX)
        return await doctor.endpoint_reachable(url, "got a websocket URL", "endpoint call answered")

    async def identity() -> doctor.Result:
        if (skip := credentials.needs_token()) is not None:
            return skip
        try:
            open_id = await api.bot_open_id()
        except PlatformError as e:
            unreachable, rejected = "cannot ask for the bot's identity", "the app has no bot identity"
            return doctor.refused(e, unreachable, cfg.domain, rejected, BOT_FIX)
        return doctor.passed(f"bot open_id {open_id}")

    async def clock() -> doctor.Result:
        # Our clock ahead makes every event look old; past max_message_age it is dropped as a replay.
        why = "events look older than [feishu] max_message_age and are dropped as replays"
        return await doctor.check_clock(http, cfg.domain, "Feishu", why, ahead_limit=cfg.max_message_age)

    async def api_budget() -> doctor.Result:
        cost = answer_cost(cfg)
        return doctor.check_budget("feishu", cfg.monthly_api_budget, cost, "Feishu's free plan", FREE_PLAN_CALLS)

    connection = ("ws endpoint", ws_endpoint) if cfg.mode in ("ws", "both") else None
    return doctor.platform_checks("feishu", credentials, connection, ("bot identity", identity), clock, api_budget)


def answer_cost(cfg: FeishuConfig) -> doctor.AnswerCost:
    """Billable calls of one streamed answer: the CardKit card is created, sent as a reply, its text
    replaced every `stream_interval`, and closed."""
    return doctor.card_answer_cost("a streaming card", cfg.stream_interval)
