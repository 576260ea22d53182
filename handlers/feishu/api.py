"""The Feishu/Lark Open API calls botgate makes, on the app's aiohttp session.

Every call is counted in `ApiBudget` under a short endpoint name. Authenticated calls carry a cached
`tenant_access_token`; an invalid-token answer evicts it and the call is retried once
(`TokenCache.call`). Responses are `{"code": 0, "msg": ..., ...}`; any other code is a
`PlatformError` naming the endpoint, code and message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from gateway.budget import ApiBudget
from gateway.errors import PlatformError, TokenRejected
from gateway.render import Part
from gateway.tokens import TokenCache
from gateway.upstream import API_TIMEOUT, read_capped, retryable_status

from .render import ELEMENT_ID, summary

log = logging.getLogger(__name__)

# 99991661: token missing or malformed, 99991663: tenant token invalid, 99991668: token expired
# (open.feishu.cn "通用错误码"). Each means "fetch a new token", not "give up".
INVALID_TOKEN_CODES = frozenset({99991661, 99991663, 99991668})
TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
WS_ENDPOINT_PATH = "/callback/ws/endpoint"
JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


def _q(segment: str) -> str:
    return quote(segment, safe="")


class FeishuApi:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        domain: str,
        app_id: str,
        app_secret: str,
        budget: ApiBudget,
    ) -> None:
        self._http = http
        self.domain = domain.rstrip("/")
        self.app_id = app_id
        self._app_secret = app_secret
        self._budget = budget
        self.tokens = TokenCache(self._fetch_token)
        self._bot_open_id = ""
        self._bot_lock = asyncio.Lock()

    # -- plumbing ------------------------------------------------------------------------------
    async def _send(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        body: object = None,
        params: dict[str, str] | None = None,
        token: str = "",
    ) -> dict[str, Any]:
        self._budget.record(endpoint)
        headers = dict(JSON_HEADERS)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self._http.request(
                method,
                self.domain + path,
                data=None if body is None else orjson.dumps(body),
                params=params,
                headers=headers,
                timeout=API_TIMEOUT,
            ) as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PlatformError(f"feishu {endpoint}: {type(e).__name__}: {e}") from e
        return _check(endpoint, status, raw)

    async def call(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        body: object = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """An authenticated call; returns the decoded JSON answer (code 0)."""

        async def attempt(token: str) -> dict[str, Any]:
            return await self._send(method, path, endpoint, body=body, params=params, token=token)

        return await self.tokens.call(attempt)

    async def ws_endpoint(self) -> dict[str, Any]:
        """The long connection's endpoint call: `{"URL": ..., "ClientConfig": {...}}`. It takes
        the app credentials, not a token (lark_oapi/ws/client.py `_get_conn_url`)."""
        data = await self._send(
            "POST", WS_ENDPOINT_PATH, "ws_endpoint", body={"AppID": self.app_id, "AppSecret": self._app_secret}
        )
        return _dict(data.get("data"))

    async def _fetch_token(self) -> tuple[str, float]:
        data = await self._send(
            "POST", TOKEN_PATH, "tenant_token", body={"app_id": self.app_id, "app_secret": self._app_secret}
        )
        token, expire = data.get("tenant_access_token"), data.get("expire")
        if not isinstance(token, str) or not token or not isinstance(expire, int | float):
            raise PlatformError("feishu tenant_token: answer without tenant_access_token/expire")
        return token, float(expire)

    # -- bot -----------------------------------------------------------------------------------
    async def bot_open_id(self) -> str:
        """The bot's own open_id, fetched once (mention checks and self-message filtering)."""
        if self._bot_open_id:
            return self._bot_open_id
        async with self._bot_lock:
            if not self._bot_open_id:
                data = await self.call("GET", "/open-apis/bot/v3/info", "bot_info")
                bot = data.get("bot")
                open_id = bot.get("open_id") if isinstance(bot, dict) else None
                if not isinstance(open_id, str) or not open_id:
                    raise PlatformError("feishu bot_info: answer without bot.open_id")
                self._bot_open_id = open_id
                log.info("bot identified", extra={"platform": "feishu", "open_id": open_id})
        return self._bot_open_id

    # -- messages ------------------------------------------------------------------------------
    async def reply(self, message_id: str, part: Part, uuid: str, in_thread: bool) -> str:
        """Reply under `message_id`; `uuid` makes a repeated request (e.g. after a restart)
        deliver nothing new (Feishu de-duplicates it for an hour). Returns the new message id."""
        data = await self.call(
            "POST",
            f"/open-apis/im/v1/messages/{_q(message_id)}/reply",
            "reply",
            body={
                "msg_type": part.msg_type,
                "content": orjson.dumps(part.content).decode(),
                "uuid": uuid,
                "reply_in_thread": in_thread,
            },
        )
        new_id = _dict(data.get("data")).get("message_id")
        return new_id if isinstance(new_id, str) else ""

    async def download(self, message_id: str, file_key: str, kind: str) -> tuple[bytes, str]:
        """A message's picture or file: (bytes, mime type)."""

        async def attempt(token: str) -> tuple[bytes, str]:
            self._budget.record("message_resource")
            path = f"/open-apis/im/v1/messages/{_q(message_id)}/resources/{_q(file_key)}"
            try:
                async with self._http.get(
                    self.domain + path,
                    params={"type": kind},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=API_TIMEOUT,
                ) as resp:
                    if resp.status != 200 or resp.content_type == "application/json":
                        _check("message_resource", resp.status, await resp.read())
                        raise PlatformError(f"feishu message_resource: HTTP {resp.status}, no file")
                    data = await read_capped(resp, "feishu message_resource")
                    return data, resp.content_type or "application/octet-stream"
            except (aiohttp.ClientError, TimeoutError) as e:
                raise PlatformError(f"feishu message_resource: {type(e).__name__}: {e}") from e

        return await self.tokens.call(attempt)

    # -- CardKit streaming cards -----------------------------------------------------------------
    async def create_card(self, card: dict[str, Any]) -> str:
        data = await self.call(
            "POST",
            "/open-apis/cardkit/v1/cards",
            "card_create",
            body={"type": "card_json", "data": orjson.dumps(card).decode()},
        )
        card_id = _dict(data.get("data")).get("card_id")
        if not isinstance(card_id, str) or not card_id:
            raise PlatformError("feishu card_create: answer without card_id")
        return card_id

    async def set_card_text(self, card_id: str, text: str, sequence: int) -> None:
        """Replace the streaming element's text; `sequence` must grow with every card operation."""
        await self.call(
            "PUT",
            f"/open-apis/cardkit/v1/cards/{_q(card_id)}/elements/{ELEMENT_ID}/content",
            "card_content",
            body={"content": text, "sequence": sequence},
        )

    async def close_card(self, card_id: str, text: str, sequence: int) -> None:
        """End streaming mode (the card stops showing "generating") with a chat-list summary."""
        settings = {"config": {"streaming_mode": False, "summary": {"content": summary(text)}}}
        await self.call(
            "PATCH",
            f"/open-apis/cardkit/v1/cards/{_q(card_id)}/settings",
            "card_settings",
            body={"settings": orjson.dumps(settings).decode(), "sequence": sequence},
        )


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _check(endpoint: str, status: int, raw: bytes) -> dict[str, Any]:
    """Decode a JSON answer; raise unless it is HTTP 200 with code 0."""
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise PlatformError(f"feishu {endpoint}: HTTP {status}, answer is not a JSON object")
    code, msg = data.get("code"), data.get("msg", "")
    if code in INVALID_TOKEN_CODES:
        raise TokenRejected(f"feishu {endpoint}: token rejected (code {code}: {msg})")
    if status != 200 or code != 0:
        raise PlatformError(f"feishu {endpoint}: HTTP {status}, code {code}: {msg}", retryable=retryable_status(status))
    return data
