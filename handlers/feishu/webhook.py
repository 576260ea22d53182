"""`POST /feishu/webhook`: Feishu's HTTP event delivery, the fallback (or twin) of the long connection.

Order of checks, as lark-oapi's `EventDispatcherHandler.do` (protocols.md §C.1), but stricter:
1. With an encrypt key, `X-Lark-Signature` = hex SHA-256(timestamp + nonce + encrypt key + raw body)
   is compared in constant time before the body is parsed; only Feishu's `url_verification` may
   come unsigned. A signed request whose `X-Lark-Request-Timestamp` (seconds) is further than
   `max(1 h, max_message_age)` from now is refused too: a replayed capture, and its message would be
   dropped as stale anyway (the SDK checks no timestamp).
2. `{"encrypt": ...}` bodies: AES-256-CBC, key = SHA-256(encrypt key), IV = the first 16 bytes of
   the base64-decoded blob, PKCS#7 padding.
3. The verification token (top-level `token`, or `header.token` in schema 2.0) must match.
Errors are JSON: 400 unreadable, 401 unauthenticated, 413 too large (aiohttp's body limit), 503
while not accepting; never 500. Everything else is answered 200 at once: the answer is produced
later by the dispatcher (Feishu retries after 3 s without a 200).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from Crypto.Cipher import AES

from gateway.config import FeishuConfig
from gateway.keys import DISPATCHER
from handlers.http import json_error

log = logging.getLogger(__name__)

PATH = "/feishu/webhook"
TIMESTAMP, NONCE, SIGNATURE = "X-Lark-Request-Timestamp", "X-Lark-Request-Nonce", "X-Lark-Signature"
MAX_SKEW = 3600.0  # seconds, as DingTalk allows for its webhook timestamps

# The adapter's intake: (event body, transport) -> True when the event may be acknowledged.
Intake = Callable[[dict[str, Any], str], Awaitable[bool]]


class DecryptError(ValueError):
    """The `encrypt` field is not something our key produced."""


def decrypt(encrypted: str, encrypt_key: str) -> bytes:
    try:
        raw = base64.b64decode(encrypted, validate=True)
    except (binascii.Error, ValueError):
        raise DecryptError("not base64") from None
    if len(raw) < 32 or len(raw) % 16:
        raise DecryptError("wrong length")
    key = hashlib.sha256(encrypt_key.encode()).digest()
    plain = AES.new(key, AES.MODE_CBC, raw[:16]).decrypt(raw[16:])
    pad = plain[-1]
    if not 1 <= pad <= 16 or plain[-pad:] != bytes([pad]) * pad:
        raise DecryptError("bad padding")
    return plain[:-pad]


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode() + body).hexdigest()


def _same(a: str, b: str) -> bool:
    # Header values arrive surrogate-escaped when they are not UTF-8; such a value is just wrong.
    return hmac.compare_digest(a.encode(errors="surrogateescape"), b.encode(errors="surrogateescape"))


def _token(body: dict[str, Any]) -> str:
    header = body.get("header")
    token = header.get("token") if isinstance(header, dict) else body.get("token")
    return token if isinstance(token, str) else ""


class FeishuWebhook:
    def __init__(self, cfg: FeishuConfig, intake: Intake) -> None:
        self._cfg = cfg
        self._intake = intake

    def _signature_problem(self, request: web.Request, raw: bytes) -> str | None:
        """None when unsigned, "" when signed correctly and recently, else what is wrong."""
        given = request.headers.get(SIGNATURE)
        if given is None:
            return None
        timestamp = request.headers.get(TIMESTAMP, "")
        expected = signature(timestamp, request.headers.get(NONCE, ""), self._cfg.encrypt_key, raw)
        if not _same(expected, given):
            return "bad signature"
        window = max(MAX_SKEW, self._cfg.max_message_age)
        fresh = timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12
        if not fresh or abs(time.time() - int(timestamp)) > window:
            return "timestamp too old or in the future"
        return ""

    def _plain(self, raw: bytes) -> dict[str, Any] | web.Response:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json_error(400, "body is not JSON")
        if not isinstance(body, dict):
            return json_error(400, "body is not a JSON object")
        encrypted = body.get("encrypt")
        if encrypted is None:
            return body
        if not self._cfg.encrypt_key:
            return json_error(400, "encrypted body, but no encrypt_key is configured")
        try:
            body = orjson.loads(decrypt(str(encrypted), self._cfg.encrypt_key))
        except (DecryptError, orjson.JSONDecodeError):
            return json_error(400, "encrypted body cannot be decrypted with the configured encrypt_key")
        return body if isinstance(body, dict) else json_error(400, "decrypted body is not a JSON object")

    async def handle(self, request: web.Request) -> web.Response:
        if not request.app[DISPATCHER].accepting:
            return json_error(503, "shutting down, retry later")
        raw = await request.read()
        problem = self._signature_problem(request, raw) if self._cfg.encrypt_key else None
        if problem:
            return json_error(401, problem)
        body = self._plain(raw)
        if isinstance(body, web.Response):
            return body
        # An unset token must not make a token-less body pass (config validation requires one).
        if not self._cfg.verification_token or not _same(_token(body), self._cfg.verification_token):
            return json_error(401, "bad verification token")
        if body.get("type") == "url_verification":
            return web.json_response({"challenge": body.get("challenge", "")})
        if self._cfg.encrypt_key and problem is None:
            return json_error(401, "missing signature")
        if not await self._intake(body, "webhook"):
            return json_error(503, "not accepted, retry later")
        return web.json_response({"msg": "success"})


def setup(app: web.Application, cfg: FeishuConfig, intake: Intake) -> None:
    app.router.add_post(PATH, FeishuWebhook(cfg, intake).handle)
