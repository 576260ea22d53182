"""The Feishu/Lark Open API calls botgate makes, on the app's aiohttp session.

Every call waits for its turn in the bot's rate limiter (per API, and per chat for replies) and is
counted in `ApiBudget` under a short endpoint name (billable once it succeeded, unless the quota
exempts it). Authenticated calls carry a cached `tenant_access_token`; an invalid-token answer
evicts it and the call is retried once (`TokenCache.call`). Responses are
`{"code": 0, "msg": ..., ...}`; any other code is a `PlatformError` naming the endpoint, code and
message, classified by its code (docs/protocols/feishu.md §B.13): a rate limit (HTTP 429, or a
business code such as 230020 under HTTP 400) is `Throttled` for the `x-ogw-ratelimit-reset` the
answer suggests; 99991403, the tenant's monthly quota, is `QuotaExhausted` (also under HTTP 429).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from gateway.budget import ApiBudget
from gateway.errors import PlatformError, QuotaExhausted, Throttled, TokenRejected
from gateway.ratelimit import RateLimiter
from gateway.render import Part
from gateway.tokens import TokenCache
from gateway.upstream import API_TIMEOUT, read_capped, retryable_status

from .render import ELEMENT_ID, defuse, summary

log = logging.getLogger(__name__)

# 99991661: token missing or malformed, 99991663: tenant token invalid, 99991668: token expired
# (open.feishu.cn "通用错误码"). Each means "fetch a new token", not "give up".
INVALID_TOKEN_CODES = frozenset({99991661, 99991663, 99991668})
# Rate limits ("频控策略"): 99991400 with HTTP 429 (older APIs: 400), IM's 230020 and 11232 under
# HTTP 400; the answer's x-ogw-ratelimit-reset says how many seconds to wait.
THROTTLED_CODES = frozenset({99991400, 230020, 11232})
QUOTA_CODE = 99991403  # "This month's API call quota has been exceeded" (HTTP 429)
THROTTLE_WAIT = 1.0  # when the answer suggests no wait
RESET_HEADER = "x-ogw-ratelimit-reset"
# Calls the monthly quota does not count: authentication (the tenant token).
UNBILLED = frozenset({"tenant_token"})
TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
WS_ENDPOINT_PATH = "/callback/ws/endpoint"
JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}
# lark-oapi 1.7.5 sends `locale: zh` and its User-Agent on the endpoint call (`_get_conn_url`); ours has
# the form the SDK builds for an integrator's `source`, naming the protocol version we follow
# (docs/protocols/feishu.md §B.2). The long connection's websocket upgrade sends the same agent.
SDK_USER_AGENT = "oapi-sdk-python/v1.7.5 source/botgate"
ENDPOINT_HEADERS = {"locale": "zh", "User-Agent": SDK_USER_AGENT}


def _q(segment: str) -> str:
    return quote(segment, safe="")


# One multipart field: name, value, filename and content type (None for a plain form field).
FormPart = tuple[str, str | bytes, str | None, str | None]


class FeishuApi:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        domain: str,
        app_id: str,
        app_secret: str,
        budget: ApiBudget,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._http = http
        self.domain = domain.rstrip("/")
        self.app_id = app_id
        self._app_secret = app_secret
        self._budget = budget
        self._limiter = limiter or RateLimiter()
        self.tokens = TokenCache(self._fetch_token)
        self._bot_open_id = ""
        self._bot_lock = asyncio.Lock()

    def use_secret(self, app_secret: str) -> None:
        """A reload's new app secret: the next token (and long-connection endpoint) uses it."""
        if app_secret != self._app_secret:
            self._app_secret = app_secret
            self.tokens.forget()

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
        extra_headers: dict[str, str] | None = None,
        scope: str = "",
    ) -> dict[str, Any]:
        await self._limiter.acquire(endpoint, scope)
        self._budget.record(endpoint)
        headers = {**JSON_HEADERS, **(extra_headers or {})}
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
                status, raw, reset = resp.status, await resp.read(), resp.headers.get(RESET_HEADER, "")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PlatformError(f"feishu {endpoint}: {type(e).__name__}: {e}") from e
        data = self._checked(endpoint, status, raw, reset, scope)
        if endpoint not in UNBILLED:
            self._budget.charge(endpoint)
        return data

    def _checked(self, endpoint: str, status: int, raw: bytes, reset: str, scope: str = "") -> dict[str, Any]:
        """`_check`, and what a refusal means for this bot: a throttled API (in this chat) waits
        for everyone, an exhausted quota spends the budget."""
        try:
            return _check(endpoint, status, raw, reset)
        except Throttled as e:
            self._limiter.hold(endpoint, e.retry_after, scope)
            self._budget.throttled(endpoint)
            raise
        except QuotaExhausted as e:
            self._budget.refuse(str(e))
            raise

    async def call(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        body: object = None,
        params: dict[str, str] | None = None,
        scope: str = "",
    ) -> dict[str, Any]:
        """An authenticated call; returns the decoded JSON answer (code 0). `scope` (a chat id)
        puts it under that chat's rate limit too."""

        async def attempt(token: str) -> dict[str, Any]:
            return await self._send(method, path, endpoint, body=body, params=params, token=token, scope=scope)

        return await self.tokens.call(attempt)

    async def ws_endpoint(self) -> dict[str, Any]:
        """The long connection's endpoint call: `{"URL": ..., "ClientConfig": {...}}`. It takes
        the app credentials, not a token (lark_oapi/ws/client.py `_get_conn_url`)."""
        data = await self._send(
            "POST",
            WS_ENDPOINT_PATH,
            "ws_endpoint",
            body={"AppID": self.app_id, "AppSecret": self._app_secret},
            extra_headers=ENDPOINT_HEADERS,
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
    async def reply(self, message_id: str, part: Part, uuid: str, in_thread: bool, chat_id: str = "") -> str:
        """Reply under `message_id`; `uuid` makes a repeated request (e.g. after a restart)
        deliver nothing new (Feishu de-duplicates it for an hour), so a reply may be retried after
        any failure. `chat_id` puts it under that chat's rate limit. Returns the new message id."""
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
            scope=chat_id,
        )
        new_id = _dict(data.get("data")).get("message_id")
        return new_id if isinstance(new_id, str) else ""

    async def create_message(self, receive_id_type: str, receive_id: str, part: Part, uuid: str) -> str:
        """A new message in a chat (`chat_id`) or to a user (`open_id`), not a reply: the send API.
        `uuid` makes a repeated request deliver nothing new (Feishu keeps it an hour)."""
        data = await self.call(
            "POST",
            "/open-apis/im/v1/messages",
            "create_message",
            params={"receive_id_type": receive_id_type},
            body={
                "receive_id": receive_id,
                "msg_type": part.msg_type,
                "content": orjson.dumps(part.content).decode(),
                "uuid": uuid,
            },
            scope=receive_id,
        )
        new_id = _dict(data.get("data")).get("message_id")
        return new_id if isinstance(new_id, str) else ""

    async def download(self, message_id: str, file_key: str, kind: str) -> tuple[bytes, str]:
        """A message's picture or file: (bytes, mime type)."""

        async def attempt(token: str) -> tuple[bytes, str]:
            await self._limiter.acquire("message_resource")
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
                        reset = resp.headers.get(RESET_HEADER, "")
                        self._checked("message_resource", resp.status, await resp.read(), reset)
                        raise PlatformError(f"feishu message_resource: HTTP {resp.status}, no file")
                    data = await read_capped(resp, "feishu message_resource")
                    self._budget.charge("message_resource")
                    return data, resp.content_type or "application/octet-stream"
            except (aiohttp.ClientError, TimeoutError) as e:
                raise PlatformError(f"feishu message_resource: {type(e).__name__}: {e}") from e

        return await self.tokens.call(attempt)

    async def upload_image(self, data: bytes, mime: str) -> str:
        """Upload an image for a message (`POST /open-apis/im/v1/images`, multipart
        `image_type=message` and `image`); returns its `image_key`."""
        fields: list[FormPart] = [("image_type", "message", None, None), ("image", data, "image", mime)]
        return await self._upload("image_upload", "/open-apis/im/v1/images", fields, "image_key")

    async def upload_file(self, data: bytes, name: str, file_type: str) -> str:
        """Upload a file for a message (`POST /open-apis/im/v1/files`, multipart `file_type`
        (pdf, doc, xls, ppt or stream), `file_name` and `file`); returns its `file_key`."""
        fields: list[FormPart] = [
            ("file_type", file_type, None, None),
            ("file_name", name, None, None),
            ("file", data, name, "application/octet-stream"),
        ]
        return await self._upload("file_upload", "/open-apis/im/v1/files", fields, "file_key")

    async def _upload(
        self, endpoint: str, path: str, fields: list[FormPart], key: str
    ) -> str:
        """A multipart upload (paced, metered, token retried like every call); returns `data.<key>`."""

        async def attempt(token: str) -> str:
            await self._limiter.acquire(endpoint)
            self._budget.record(endpoint)
            form = aiohttp.FormData()
            for name, content, filename, content_type in fields:
                form.add_field(name, content, filename=filename, content_type=content_type)
            try:
                async with self._http.post(
                    self.domain + path,
                    data=form,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=API_TIMEOUT,
                ) as resp:
                    status, raw, reset = resp.status, await resp.read(), resp.headers.get(RESET_HEADER, "")
            except (aiohttp.ClientError, TimeoutError) as e:
                raise PlatformError(f"feishu {endpoint}: {type(e).__name__}: {e}") from e
            answer = self._checked(endpoint, status, raw, reset)
            self._budget.charge(endpoint)
            value = _dict(answer.get("data")).get(key)
            if not isinstance(value, str) or not value:
                raise PlatformError(f"feishu {endpoint}: answer without {key}", retryable=False)
            return value

        return await self.tokens.call(attempt)

    async def get_message(self, message_id: str) -> dict[str, Any]:
        """One message by id (a quoted reply's `parent_id`): `data.items[0]` of `GET
        /open-apis/im/v1/messages/{message_id}` (`msg_type`, `body.content`, `sender`, ...)."""
        data = await self.call("GET", f"/open-apis/im/v1/messages/{_q(message_id)}", "message_get")
        items = _dict(data.get("data")).get("items")
        if not isinstance(items, list) or not items or not isinstance(items[0], dict):
            raise PlatformError("feishu message_get: answer without data.items", retryable=False)
        return items[0]

    # -- reactions: the working indicator without a card -------------------------------------------
    async def add_reaction(self, message_id: str, emoji_type: str) -> str:
        """Put a reaction (`emoji_type`, e.g. "OnIt") on a message; returns its reaction_id."""
        data = await self.call(
            "POST",
            f"/open-apis/im/v1/messages/{_q(message_id)}/reactions",
            "reaction_add",
            body={"reaction_type": {"emoji_type": emoji_type}},
        )
        reaction_id = _dict(data.get("data")).get("reaction_id")
        return reaction_id if isinstance(reaction_id, str) else ""

    async def remove_reaction(self, message_id: str, reaction_id: str) -> None:
        await self.call(
            "DELETE", f"/open-apis/im/v1/messages/{_q(message_id)}/reactions/{_q(reaction_id)}", "reaction_remove"
        )

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

    async def set_card_text(self, card_id: str, text: str, sequence: int, element: str = ELEMENT_ID) -> None:
        """Replace a streaming element's text (the answer's unless `element` names another);
        `sequence` must grow with every card operation. Mentions in model text are defused, as in
        every card and post (`render.defuse`)."""
        await self.call(
            "PUT",
            f"/open-apis/cardkit/v1/cards/{_q(card_id)}/elements/{_q(element)}/content",
            "card_content",
            body={"content": defuse(text), "sequence": sequence},
        )

    async def append_card_elements(
        self, card_id: str, elements: list[dict[str, Any]], uuid: str, sequence: int
    ) -> None:
        """Add `elements` at the end of the card's body (CardKit "create elements", `type:
        append`); `uuid` makes a repeat that did arrive add nothing again."""
        await self.call(
            "POST",
            f"/open-apis/cardkit/v1/cards/{_q(card_id)}/elements",
            "card_elements",
            body={"type": "append", "elements": orjson.dumps(elements).decode(), "uuid": uuid, "sequence": sequence},
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


# CardKit ends a card's streaming mode by itself about 10 minutes after it was turned on: 200850
# ("card streaming timeout") answers the first call after that, 300309 ("streaming mode is closed")
# every later one (docs/protocols/feishu.md §B.13).
STREAMING_CLOSED_CODES = frozenset({200850, 300309})


class StreamingClosed(PlatformError):
    """The card's streaming mode is closed: the card takes no more text."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _check(endpoint: str, status: int, raw: bytes, reset: str = "") -> dict[str, Any]:
    """Decode a JSON answer; raise unless it is HTTP 200 with code 0. `reset`: the answer's
    x-ogw-ratelimit-reset header (seconds until the rate limit lets calls through again)."""
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        data = None
    code, msg = (data.get("code"), data.get("msg", "")) if isinstance(data, dict) else (None, "")
    if not isinstance(code, int):  # a code must be a number to mean anything (and to be hashed)
        code = None
    if code == QUOTA_CODE:
        raise QuotaExhausted(f"feishu {endpoint}: the tenant's monthly API quota is exhausted (code {code}: {msg})")
    if code in THROTTLED_CODES or status == 429:
        wait = float(reset) if reset.strip().isdigit() else THROTTLE_WAIT
        raise Throttled(f"feishu {endpoint}: throttled (HTTP {status}, code {code}: {msg})", retry_after=wait)
    if not isinstance(data, dict):
        raise PlatformError(f"feishu {endpoint}: HTTP {status}, answer is not a JSON object")
    if code in INVALID_TOKEN_CODES:
        raise TokenRejected(f"feishu {endpoint}: token rejected (code {code}: {msg})")
    if code in STREAMING_CLOSED_CODES:
        raise StreamingClosed(f"feishu {endpoint}: the card's streaming mode is closed (code {code}: {msg})")
    if status != 200 or code != 0:
        raise PlatformError(f"feishu {endpoint}: HTTP {status}, code {code}: {msg}", retryable=retryable_status(status))
    return data
