"""DingTalk HTTP APIs on the gateway's shared session: access token, robot sends, sessionWebhook
replies, file download by download code and AI-card calls (docs/protocols/dingtalk.md §A.9).

Every call waits for its turn in the bot's rate limiter, is counted in the API budget under a short
fixed endpoint name (billable once it succeeded, unless the quota exempts it), has a timeout, and
maps transport failures to `PlatformError`; "token invalid" answers become `TokenRejected`, so the
token cache evicts the token and the call is retried once.

Answers are classified by their code (docs/protocols/dingtalk.md §A.9): a QPS limit is `Throttled`
(DingTalk: wait 1 s and go on), the monthly quota is `QuotaExhausted` (never retried), "system
busy" is retryable. The message sends (sessionWebhook, group and 1:1 sends) carry no idempotency
key, so they are retried only on answers that say the message was not accepted (those three, or a
connection that never opened); a timeout or another 5xx is `Unconfirmed`: neither repeated nor sent
another way, since the user may already have it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import aiohttp
import orjson

from gateway.budget import ApiBudget
from gateway.config import DingTalkConfig
from gateway.errors import PlatformError, QuotaExhausted, Throttled, TokenRejected
from gateway.ratelimit import RateLimiter
from gateway.tokens import TokenCache
from gateway.upstream import API_TIMEOUT, read_capped, retryable_status

log = logging.getLogger(__name__)

# The "token invalid/expired" answer of the v1.0 APIs (HTTP 401 or this code).
_TOKEN_CODES = frozenset({"InvalidAuthentication", "InvalidAccessToken"})
# Rate limits and the monthly quota ("调用频次与限流"): the v1.0 APIs answer HTTP 403 with these
# codes (prefixed "Forbidden.AccessDenied."), the old APIs the sessionWebhook belongs to an errcode.
THROTTLED_CODES = frozenset({"QpsLimitForAppkeyAndApi", "QpsLimitForApi"})
THROTTLED_ERRCODES = frozenset({90018, 90002})
QUOTA_CODE, QUOTA_ERRCODE = "ApiCountLimitForOrg", 90020
BUSY_ERRCODE = -1  # "system busy, retry later" (the global error codes): the call was not taken
THROTTLE_WAIT = 1.0  # the limits count per second: "sleep 1 s, then go on"
# Calls the monthly API quota does not count: the access token (exempt), the sessionWebhook
# (DingTalk bills webhook and Stream messaging as an allowance of its own).
UNBILLED = frozenset({"access_token", "session_webhook"})


class SessionWebhookRejected(PlatformError):
    """The sessionWebhook refused the message (expired, revoked): the OpenAPI may still deliver it."""


class Unconfirmed(PlatformError):
    """A send whose fate is unknown (timeout, dropped connection, a 5xx that is not "busy"): it
    may have arrived, so it is neither repeated nor sent another way."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class DingTalkApi:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        cfg: DingTalkConfig,
        budget: ApiBudget,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._http = http
        self._cfg = cfg
        self._base = cfg.api_base.rstrip("/")
        self._budget = budget
        self._limiter = limiter or RateLimiter()
        self.tokens = TokenCache(self._fetch_token)

    def use_secret(self, client_secret: str) -> None:
        """A reload's new app secret: the next token is fetched with it."""
        if client_secret != self._cfg.client_secret:
            self._cfg = replace(self._cfg, client_secret=client_secret)
            self.tokens.forget()

    # -- plumbing ------------------------------------------------------------------------------
    async def _request(
        self,
        endpoint: str,
        method: str,
        url: str,
        body: dict[str, Any] | None = None,
        token: str = "",
        *,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        """One JSON call. `endpoint` is the metric label and rate-limit key; `token` marks an
        authenticated OpenAPI call; `idempotent=False` a send that must not arrive twice."""
        await self._limiter.acquire(endpoint)
        self._budget.record(endpoint)
        headers = {"x-acs-dingtalk-access-token": token} if token else None
        try:
            async with self._http.request(method, url, json=body, headers=headers, timeout=API_TIMEOUT) as resp:
                status, raw, retry_after = resp.status, await resp.read(), resp.headers.get("Retry-After", "")
        except aiohttp.ClientConnectorError as e:  # no connection, so nothing was sent
            raise PlatformError(f"dingtalk {endpoint}: {type(e).__name__}: {e}") from e
        except (aiohttp.ClientError, TimeoutError) as e:
            message = f"dingtalk {endpoint}: {type(e).__name__}: {e}"
            raise (PlatformError(message) if idempotent else Unconfirmed(message)) from e
        data = _json_object(raw)
        code = str(data.get("code", ""))
        short_code = code.rsplit(".", 1)[-1]
        errcode = data.get("errcode") if isinstance(data.get("errcode"), int) else None
        if short_code in THROTTLED_CODES or errcode in THROTTLED_ERRCODES or status == 429:
            wait = _seconds(retry_after, THROTTLE_WAIT)
            self._limiter.hold(endpoint, wait)
            self._budget.throttled(endpoint)
            raise Throttled(f"dingtalk {endpoint}: throttled ({code or errcode or status})", retry_after=wait)
        if short_code == QUOTA_CODE or errcode == QUOTA_ERRCODE:
            detail = f"dingtalk {endpoint}: the org's monthly API quota is exhausted ({code or errcode})"
            self._budget.refuse(detail)
            raise QuotaExhausted(detail)
        if token and (status == 401 or code in _TOKEN_CODES):
            raise TokenRejected(f"dingtalk {endpoint}: access token rejected ({code or status})")
        if status >= 400:
            detail = data.get("message") or raw[:200].decode(errors="replace")
            message = f"dingtalk {endpoint}: HTTP {status} {code} {detail}".strip()
            if errcode == BUSY_ERRCODE:
                raise PlatformError(message)
            if retryable_status(status):
                raise PlatformError(message) if idempotent else Unconfirmed(message)
            raise PlatformError(message, retryable=False)
        if endpoint not in UNBILLED:
            self._budget.charge(endpoint)
        return data

    async def _openapi(
        self, endpoint: str, method: str, path: str, body: dict[str, Any], *, idempotent: bool = True
    ) -> dict[str, Any]:
        async def call(token: str) -> dict[str, Any]:
            return await self._request(endpoint, method, self._base + path, body, token, idempotent=idempotent)

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
            data = await self._request("session_webhook", "POST", url, message, idempotent=False)
        except PlatformError as e:
            # Retryable (not accepted), unconfirmed (it may have arrived) or the quota: no second route.
            if e.retryable or isinstance(e, Unconfirmed | QuotaExhausted):
                raise
            raise SessionWebhookRejected(str(e), retryable=False) from e
        if data.get("errcode", 0) == BUSY_ERRCODE:
            raise PlatformError(f"dingtalk session_webhook: errcode -1 {data.get('errmsg', '')}".strip())
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
            idempotent=False,
        )

    async def send_direct(self, robot_code: str, staff_id: str, msg_key: str, msg_param: str) -> None:
        data = await self._openapi(
            "direct_send",
            "POST",
            "/v1.0/robot/oToMessages/batchSend",
            {"robotCode": robot_code, "userIds": [staff_id], "msgKey": msg_key, "msgParam": msg_param},
            idempotent=False,
        )
        for field in ("invalidStaffIdList", "flowControlledStaffIdList", "filteredStaffIdList"):
            if staff_id in (data.get(field) or ()):
                raise PlatformError(
                    f"dingtalk direct_send: user in {field}", retryable=field == "flowControlledStaffIdList"
                )

    async def upload_media(self, data: bytes, mime: str, kind: str = "image", name: str = "") -> str:
        """Upload a media file (`POST {oapi_base}/media/upload?access_token=…&type=image` or
        `type=file`, multipart `media`, named `name`); returns its `media_id` (an image message's
        `photoURL`, a file message's `mediaId` take it)."""

        async def call(token: str) -> str:
            await self._limiter.acquire("media_upload")
            self._budget.record("media_upload")
            form = aiohttp.FormData()
            filename = name or f"{kind}.{mime.rsplit('/', 1)[-1]}"
            form.add_field("media", data, filename=filename, content_type=mime)
            url = self._cfg.oapi_base.rstrip("/") + "/media/upload"
            try:
                async with self._http.post(
                    url, params={"access_token": token, "type": kind}, data=form, timeout=API_TIMEOUT
                ) as resp:
                    status, raw = resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                raise PlatformError(f"dingtalk media_upload: {type(e).__name__}: {e}") from e
            answer = _json_object(raw)
            if status == 401 or answer.get("errcode") in (40014, 42001):  # invalid / expired token
                raise TokenRejected(f"dingtalk media_upload: access token rejected ({answer.get('errcode')})")
            media_id = answer.get("media_id")
            if status >= 400 or answer.get("errcode", 0) != 0 or not isinstance(media_id, str) or not media_id:
                detail = f"HTTP {status} errcode {answer.get('errcode')} {answer.get('errmsg', '')}".strip()
                raise PlatformError(f"dingtalk media_upload: {detail}", retryable=retryable_status(status))
            self._budget.charge("media_upload")
            return media_id

        return await self.tokens.call(call)

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
    async def card_create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create and deliver; the answer says per space whether the card arrived
        (`result.deliverResults[].success`, docs/protocols/dingtalk.md §A.9)."""
        return await self._openapi("card_create", "POST", "/v1.0/card/instances/createAndDeliver", body)

    async def card_stream(self, body: dict[str, Any]) -> None:
        await self._openapi("card_streaming", "PUT", "/v1.0/card/streaming", body)

    async def card_update(self, body: dict[str, Any]) -> None:
        await self._openapi("card_update", "PUT", "/v1.0/card/instances", body)


def _seconds(header: str, default: float) -> float:
    """A delay header in whole seconds (`Retry-After`), else `default`."""
    return float(header) if header.strip().isdigit() else default


def _json_object(raw: bytes) -> dict[str, Any]:
    """The answer as a JSON object; anything else (HTML error pages, empty bodies) as {}."""
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
