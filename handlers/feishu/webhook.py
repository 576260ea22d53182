"""`POST /feishu/webhook`: Feishu's HTTP event delivery, the fallback (or twin) of the long
connection, on the shared webhook pattern (`handlers.webhook`: read capped, verify, parse, submit).

Checks, in lark-oapi's order (`EventDispatcherHandler.do`, docs/protocols/feishu.md §C.1) but stricter:
1. With an encrypt key, `X-Lark-Signature` = hex SHA-256(timestamp + nonce + encrypt key + raw body)
   is compared in constant time before the body is decoded; only Feishu's `url_verification` may
   come unsigned. A signed request whose `X-Lark-Request-Timestamp` (seconds) is further than
   `max(1 h, max_message_age)` from now is refused too: a replayed capture, and its message would be
   dropped as stale anyway (the SDK checks no timestamp).
2. `{"encrypt": ...}` bodies: AES-256-CBC, key = SHA-256(encrypt key), IV = the first 16 bytes of
   the base64-decoded blob, PKCS#7 padding.
3. The verification token (top-level `token`, or `header.token` in schema 2.0) must match.
Errors are JSON: 400 unreadable, 401 unauthenticated, 413 too large, 503 while not accepting; never
500. Everything else is answered 200 at once: the answer is produced later by the dispatcher
(Feishu retries after 3 s without a 200).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from typing import Any

import orjson
from aiohttp import web
from Crypto.Cipher import AES

from gateway.adapter import Adapter
from gateway.config import FeishuConfig
from gateway.jsonvalues import as_str
from gateway.signing import same

from ..http import json_error
from ..webhook import Webhook

# An event is a few KB; a text message may reach 150 KB, and encryption adds a third in base64.
MAX_BODY = 256 * 1024
TIMESTAMP, NONCE, SIGNATURE = "X-Lark-Request-Timestamp", "X-Lark-Request-Nonce", "X-Lark-Signature"
MAX_SKEW = 3600.0  # seconds, as DingTalk allows for its webhook timestamps


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


def _token(body: dict[str, Any]) -> str:
    header = body.get("header")
    return as_str(header.get("token") if isinstance(header, dict) else body.get("token"))


class FeishuOpener:
    """Verifies and decodes one request body for the webhook pattern."""

    def __init__(self, cfg: FeishuConfig) -> None:
        self._cfg = cfg

    def _signature_problem(self, request: web.Request, raw: bytes) -> str | None:
        """None when unsigned, "" when signed correctly and recently, else what is wrong."""
        given = request.headers.get(SIGNATURE)
        if given is None:
            return None
        timestamp = request.headers.get(TIMESTAMP, "")
        expected = signature(timestamp, request.headers.get(NONCE, ""), self._cfg.encrypt_key, raw)
        if not same(given, expected):
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

    def __call__(self, request: web.Request, raw: bytes) -> object:
        problem = self._signature_problem(request, raw) if self._cfg.encrypt_key else None
        if problem:
            return json_error(401, problem)
        body = self._plain(raw)
        if isinstance(body, web.Response):
            return body
        # An unset token must not make a token-less body pass (config validation requires one).
        if not self._cfg.verification_token or not same(_token(body), self._cfg.verification_token):
            return json_error(401, "bad verification token")
        if body.get("type") == "url_verification":
            return web.json_response({"challenge": body.get("challenge", "")})
        if self._cfg.encrypt_key and problem is None:
            return json_error(401, "missing signature")
        return body


def _accepted() -> web.Response:
    return web.json_response({"msg": "success"})


def webhook(adapter: Adapter[Any, Any], cfg: FeishuConfig) -> Webhook:
    return Webhook(adapter, FeishuOpener(cfg), _accepted, MAX_BODY)
