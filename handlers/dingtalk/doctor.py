"""DingTalk's `python run.py doctor` checks, on the adapter's own API client and open-connection call."""

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
    warned,
)
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


def checks(config: Config, http: aiohttp.ClientSession) -> list[Check]:
    cfg = config.dingtalk
    budget = ApiBudget(PLATFORM, 0, Metrics())  # doctor's calls count nowhere that matters
    api = DingTalkApi(http, cfg, budget)
    robot_code = cfg.robot_code or cfg.client_id
    credentials = CredentialsCheck(
        "DingTalk", cfg.client_id, api.tokens, cfg.api_base, CREDENTIALS_FIX, "an access token"
    )

    async def stream_endpoint() -> Result:
        try:
            endpoint, _ = await open_connection(http, cfg, budget)
        except PlatformError as e:
            fix = reach_fix(cfg.api_base) if e.retryable else STREAM_FIX
            return failed(str(e), fix)
        # The ticket is left unused (it expires).
        return await endpoint_reachable(endpoint, f"got endpoint {endpoint}", "open-connection answered")

    async def identity() -> Result:
        if (skip := credentials.needs_token()) is not None:
            return skip
        try:
            await api.query_robot(robot_code)
        except PlatformError as e:
            if PERMISSION_DENIED in str(e):
                return warned(
                    f"robot code {robot_code} not verified: DingTalk has no identity call for robots, and "
                    "the query that names a robot code needs the Robot.SingleChat.ReadWrite permission",
                    "grant the permission to check it here; otherwise make sure [dingtalk] robot_code is "
                    "empty (internal-app robots use client_id) or the robot's RobotCode",
                )
            unknown = f"DingTalk does not know robot code {robot_code} for this app"
            return refused(e, f"cannot query robot {robot_code}", cfg.api_base, unknown, ROBOT_FIX)
        return passed(f"robot code {robot_code} belongs to this app")

    async def clock() -> Result:
        why = "DingTalk refuses signed requests (webhook callbacks, alert robots)"
        limit = MAX_SKEW_MS / 1000  # the webhook's window, either way
        return await check_clock(http, cfg.api_base, "DingTalk", why, limit, limit)

    out = [Check("dingtalk credentials", credentials)]
    if cfg.mode in ("stream", "both"):
        out.append(Check("dingtalk stream endpoint", stream_endpoint))
    out += [Check("dingtalk robot identity", identity), Check("dingtalk clock", clock)]
    return out
