"""DingTalk's `python run.py doctor` checks, on the adapter's own API client and open-connection call."""

from __future__ import annotations

import aiohttp

from gateway import doctor
from gateway.budget import ApiBudget
from gateway.config import Config, DingTalkConfig
from gateway.errors import PlatformError
from gateway.metrics import Metrics

from .api import DingTalkApi
from .parse import PLATFORM
from .stream import open_connection
from .webhook import MAX_SKEW_MS

CREDENTIALS_FIX = (
    "set [dingtalk] client_id to the app's AppKey and client_secret to its AppSecret "
    "(developer console > your app > Credentials; env BOTGATE_DINGTALK__CLIENT_ID, "
    "BOTGATE_DINGTALK__CLIENT_SECRET)"
)
STREAM_FIX = (
    "in the developer console, set the robot's message receiving mode to Stream, "
    "and check client_id/client_secret"
)
ROBOT_FIX = (
    "set [dingtalk] robot_code to the robot's RobotCode (developer console > your app > Robot), "
    "or leave it empty to use client_id, as internal-app robots do"
)
PERMISSION_DENIED = "AccessTokenPermissionDenied"  # the v1.0 APIs' code for a missing app permission
STANDARD_ORG_CALLS = 5000  # API calls a month of a standard org ("计费模型说明", since 2025-11-19)


def checks(config: Config, http: aiohttp.ClientSession) -> list[doctor.Check]:
    cfg = config.dingtalk
    budget = ApiBudget(PLATFORM, 0, Metrics())  # doctor's calls count nowhere that matters
    api = DingTalkApi(http, cfg, budget)
    robot_code = cfg.robot_code or cfg.client_id
    credentials = doctor.CredentialsCheck(
        "DingTalk", cfg.client_id, api.tokens, cfg.api_base, CREDENTIALS_FIX, "an access token"
    )

    async def stream_endpoint() -> doctor.Result:
        try:
            endpoint, _ = await open_connection(http, cfg, budget)
        except PlatformError as e:
            fix = doctor.reach_fix(cfg.api_base) if e.retryable else STREAM_FIX
            return doctor.failed(str(e), fix)
        # The ticket is left unused (it expires).
        return await doctor.endpoint_reachable(endpoint, f"got endpoint {endpoint}", "open-connection answered")

    async def identity() -> doctor.Result:
        if (skip := credentials.needs_token()) is not None:
            return skip
        try:
            await api.query_robot(robot_code)
        except PlatformError as e:
            if PERMISSION_DENIED in str(e):
                return doctor.warned(
                    f"robot code {robot_code} not verified: DingTalk has no identity call for robots, and "
                    "the query that names a robot code needs the Robot.SingleChat.ReadWrite permission",
                    "grant the permission to check it here; otherwise make sure [dingtalk] robot_code is "
                    "empty (internal-app robots use client_id) or the robot's RobotCode",
                )
            unknown = f"DingTalk does not know robot code {robot_code} for this app"
            return doctor.refused(e, f"cannot query robot {robot_code}", cfg.api_base, unknown, ROBOT_FIX)
        return doctor.passed(f"robot code {robot_code} belongs to this app")

    async def clock() -> doctor.Result:
        why = "messages look older than max_message_age and are dropped as stale (webhook callbacks refused)"
        # createAt must be within max_message_age either way, and a webhook's timestamp too.
        limit = min(MAX_SKEW_MS / 1000, cfg.max_message_age)
        return await doctor.check_clock(http, cfg.api_base, "DingTalk", why, limit, limit)

    async def api_budget() -> doctor.Result:
        return doctor.check_budget(
            "dingtalk", cfg.monthly_api_budget, answer_cost(cfg), "a standard DingTalk org", STANDARD_ORG_CALLS
        )

    connection = ("stream endpoint", stream_endpoint) if cfg.mode in ("stream", "both") else None
    return doctor.platform_checks("dingtalk", credentials, connection, ("robot identity", identity), clock, api_budget)


def answer_cost(cfg: DingTalkConfig) -> doctor.AnswerCost:
    """Billable calls of one answer: an AI card is created, streamed into every `stream_interval`
    and finished (two calls); without a card the sessionWebhook replies, which the quota does not
    count (the OpenAPI, one call a part, only once a sessionWebhook expired)."""
    if not cfg.card_template_id:
        return doctor.AnswerCost(0, "sessionWebhook replies, no card")
    return doctor.card_answer_cost("an AI card", cfg.stream_interval)
