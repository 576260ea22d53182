"""DingTalk HTTP APIs on the gateway's shared session: access token, robot sends, sessionWebhook
replies, file download by download code and AI-card calls (docs/protocols/dingtalk.md §A.9).

Every call is counted in the API budget under a short fixed endpoint name, has a timeout, and maps
transport failures to `PlatformError`; "token invalid" answers become `TokenRejected`, so the token
cache evicts the token and the call is retried once.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import orjson

from gateway.budget import ApiBudget
from gateway.config import DingTalkConfig
from gateway.errors import PlatformError, TokenRejected
from gateway.tokens import TokenCache
from gateway.upstream import API_TIMEOUT, read_capped, retryable_status

log = logging.getLogger(__name__)

# The "token invalid/expired" answer of the v1.0 APIs (HTTP 401 or this code).
_TOKEN_CODES = frozenset({"InvalidAuthentication", "InvalidAccessToken"})


class SessionWebhookRejected(PlatformError):
    """The sessionWebhook refused the message (expired, revoked): the OpenAPI may still deliver it."""


class DingTalkApi:
    def __init__(self, http: aiohttp.ClientSession, cfg: DingTalkConfig, budget: ApiBudget) -> None:
        self._http = http
        self._cfg = cfg
        self._base = cfg.api_base.rstrip("/")
        self._budget = budget
        self.tokens = TokenCache(self._fetch_token)

    # -- plumbing ------------------------------------------------------------------------------
    async def _request(
        self,
        endpoint: str,
        method: str,
        url: str,
        body: dict[str, Any] | None = None,
        token: str = "",
    ) -> dict[str, Any]:
        """One JSON call. `endpoint` is the metric label; `token` marks an authenticated OpenAPI call."""
        self._budget.record(endpoint)
        headers = {"x-acs-dingtalk-access-token": token} if token else None
        try:
            async with self._http.request(method, url, json=body, headers=headers, timeout=API_TIMEOUT) as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PlatformError(f"dingtalk {endpoint}: {type(e).__name__}: {e}") from e
        data = _json_object(raw)
        code = str(data.get("code", ""))
        if token and (status == 401 or code in _TOKEN_CODES):
            raise TokenRejected(f"dingtalk {endpoint}: access token rejected ({code or status})")
        if status >= 400:
            detail = data.get("message") or raw[:200].decode(errors="replace")
            raise PlatformError(
                f"dingtalk {endpoint}: HTTP {status} {code} {detail}".strip(),
                retryable=retryable_status(status),
            )
        return data

    async def _openapi(self, endpoint: str, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async def call(token: str) -> dict[str, Any]:
            return await self._request(endpoint, method, self._base + path, body, token)

        return await self.tokens.call(call)

    async def _fetch_token(self) -> tuple[str, float]:
        data = await self._request(
            "access_token",
            "POST",
            f"{self._base}/v1.0/oauth2/accessToken",
            {"appKey": self._cfg.client_id, "appSecret": self._cfg.client_secret},
        )
        token, lifetime = data.get("accessToken"), data.get("expireIn")
        if not isinstance(token, str) or not token or not isinstance(lifetime, int | float):
            raise PlatformError("dingtalk access_token: answer without accessToken/expireIn")
        return token, float(lifetime)

    # -- messages ------------------------------------------------------------------------------
    async def send_session(self, url: str, message: dict[str, Any]) -> None:
        """POST a message to the sessionWebhook of the conversation (no token needed)."""
        try:
            data = await self._request("session_webhook", "POST", url, message)
        except PlatformError as e:
            if e.retryable:  # network trouble or 5xx: it may have arrived, so no second route
                raise
            raise SessionWebhookRejected(str(e), retryable=False) from e
        if data.get("errcode", 0) != 0:
            raise SessionWebhookRejected(
                f"dingtalk session_webhook: errcode {data.get('errcode')} {data.get('errmsg', '')}",
                retryable=False,
            )

    async def send_group(self, robot_code: str, conversation_id: str, msg_key: str, msg_param: str) -> None:
        await self._openapi(
            "group_send",
            "POST",
            "/v1.0/robot/groupMessages/send",
            {
                "robotCode": robot_code,
                "openConversationId": conversation_id,
                "msgKey": msg_key,
                "msgParam": msg_param,
            },
        )

    async def send_direct(self, robot_code: str, staff_id: str, msg_key: str, msg_param: str) -> None:
        data = await self._openapi(
            "direct_send",
            "POST",
            "/v1.0/robot/oToMessages/batchSend",
            {"robotCode": robot_code, "userIds": [staff_id], "msgKey": msg_key, "msgParam": msg_param},
        )
        for field in ("invalidStaffIdList", "flowControlledStaffIdList", "filteredStaffIdList"):
            if staff_id in (data.get(field) or ()):
                raise PlatformError(
                    f"dingtalk direct_send: user in {field}", retryable=field == "flowControlledStaffIdList"
                )

    # -- robot ---------------------------------------------------------------------------------
    async def query_robot(self, robot_code: str) -> dict[str, Any]:
        """The robot's 1:1 chat shortcuts. DingTalk has no "who am I" call for a robot; this
        read-only call names the robot code and is refused for one that is not this app's
        (`python run.py doctor` uses it; needs the Robot.SingleChat.ReadWrite permission)."""
        body = {"robotCode": robot_code}
        return await self._openapi("robot_query", "POST", "/v1.0/robot/plugins/query", body)

    # -- files ---------------------------------------------------------------------------------
    async def download(self, robot_code: str, download_code: str) -> tuple[bytes, str]:
        """A received file's bytes and mime type, via its short-lived download URL."""
        data = await self._openapi(
            "file_download",
            "POST",
            "/v1.0/robot/messageFiles/download",
            {"robotCode": robot_code, "downloadCode": download_code},
        )
        url = data.get("downloadUrl")
        if not isinstance(url, str) or not url:
            raise PlatformError("dingtalk file_download: answer without downloadUrl", retryable=False)
        self._budget.record("file_content")
        try:
            async with self._http.get(url, timeout=API_TIMEOUT) as resp:
                if resp.status >= 400:
                    raise PlatformError(f"dingtalk file_content: HTTP {resp.status}")
                payload = await read_capped(resp, "dingtalk file_content")
                return payload, resp.content_type or "application/octet-stream"
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PlatformError(f"dingtalk file_content: {type(e).__name__}: {e}") from e

    # -- AI cards ------------------------------------------------------------------------------
    async def card_create(self, body: dict[str, Any]) -> None:
        await self._openapi("card_create", "POST", "/v1.0/card/instances/createAndDeliver", body)

    async def card_stream(self, body: dict[str, Any]) -> None:
        await self._openapi("card_streaming", "PUT", "/v1.0/card/streaming", body)

    async def card_update(self, body: dict[str, Any]) -> None:
        await self._openapi("card_update", "PUT", "/v1.0/card/instances", body)


def _json_object(raw: bytes) -> dict[str, Any]:
    """The answer as a JSON object; anything else (HTML error pages, empty bodies) as {}."""
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
