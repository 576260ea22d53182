"""`POST /feishu/webhook`: Feishu's HTTP event delivery, the fallback (or twin) of the long
connection, on the shared webhook pattern (`handlers.webhook`: read capped, verify, parse, submit).

Checks, stricter than lark-oapi's (`EventDispatcherHandler.do`, docs/protocols/feishu.md §C.1):
1. An encrypt key is required (config validation): the verification token is the same in every
   delivery, so alone it authenticates nothing.
2. `X-Lark-Signature` = hex SHA-256(timestamp + nonce + encrypt key + raw body) is compared in
   constant time before anything else is done with the body: nothing is decrypted before it is
   known to come from Feishu. A signed request whose `X-Lark-Request-Timestamp` (seconds) is further
   than `max(1 h, max_message_age)` from now is refused too: a replayed capture, and its message
   would be dropped as stale anyway (the SDK checks no timestamp).
3. Only Feishu's `url_verification` may come unsigned (the docs exempt it): an unsigned body is
   decoded only to see whether it is one, with the right token and a short string challenge.
4. `{"encrypt": ...}` bodies: AES-256-CBC, key = SHA-256(encrypt key), IV = the first 16 bytes of
   the base64-decoded blob, PKCS#7 padding.
5. The verification token (top-level `token`, or `header.token` in schema 2.0) must match.
Every refusal is the same 401 (`handlers.webhook.Refusals`: no oracle for which check failed).
The encrypt key and token are read from the adapter's config per request: a reload's new ones
apply at once.
A correctly signed body that cannot be read is 400, too large 413, 503 while not accepting; never
500. Everything else is answered 200 at once: the answer is produced later by the dispatcher
(Feishu retries after 3 s without a 200).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from Crypto.Cipher import AES

from gateway.adapter import Adapter
from gateway.config import FeishuConfig
from gateway.jsonvalues import as_str
from gateway.signing import same

from ..http import json_error
from ..webhook import Refusals, Webhook

# An event is a few KB; a text message may reach 150 KB, and encryption adds a third in base64.
MAX_BODY = 256 * 1024
TIMESTAMP, NONCE, SIGNATURE = "X-Lark-Request-Timestamp", "X-Lark-Request-Nonce", "X-Lark-Signature"
MAX_SKEW = 3600.0  # seconds, as DingTalk allows for its webhook timestamps
MAX_CHALLENGE = 256  # characters of a url_verification challenge echoed back
MAX_UNSIGNED = 4096  # bytes: an unsigned body can only be a url_verification, a few hundred bytes


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
    """Verifies and decodes one request body for the webhook pattern, with the keys of
    `config()`, the bot's config in force."""

    def __init__(self, config: Callable[[], FeishuConfig]) -> None:
        self._config = config
        self._refuse = Refusals("feishu")

    @property
    def _cfg(self) -> FeishuConfig:
        return self._config()

    def _signature_problem(self, request: web.Request, given: str, raw: bytes) -> str:
        """"" when signed correctly and recently, else what is wrong."""
        timestamp = request.headers.get(TIMESTAMP, "")
        expected = signature(timestamp, request.headers.get(NONCE, ""), self._cfg.encrypt_key, raw)
        if not same(given, expected):
            return "bad signature"
        window = max(MAX_SKEW, self._cfg.max_message_age)
        fresh = timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12
        if not fresh or abs(time.time() - int(timestamp)) > window:
            return "timestamp too old or in the future"
        return ""

    def _plain(self, raw: bytes) -> dict[str, Any] | str:
        """The event as a JSON object (decrypted if it came encrypted), or why it is none."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return "body is not JSON"
        if not isinstance(body, dict):
            return "body is not a JSON object"
        encrypted = body.get("encrypt")
        if encrypted is None:
            return body
        try:
            body = orjson.loads(decrypt(str(encrypted), self._cfg.encrypt_key))
        except (DecryptError, orjson.JSONDecodeError):
            return "encrypted body cannot be decrypted with the configured encrypt_key"
        return body if isinstance(body, dict) else "decrypted body is not a JSON object"

    def _token_ok(self, body: dict[str, Any]) -> bool:
        # An unset token must not make a token-less body pass (config validation requires one).
        return bool(self._cfg.verification_token) and same(_token(body), self._cfg.verification_token)

    def _challenge(self, body: dict[str, Any]) -> web.Response | None:
        """The answer to a well-formed url_verification, else None."""
        challenge = body.get("challenge")
        if body.get("type") != "url_verification" or not isinstance(challenge, str):
            return None
        if not challenge or len(challenge) > MAX_CHALLENGE:
            return None
        return web.json_response({"challenge": challenge})

    def _unsigned(self, raw: bytes) -> web.Response:
        """An unsigned request: Feishu's url_verification, or refused (the same 401 whatever is
        wrong with it: undecryptable, not an object, wrong token, not a url_verification). A body
        too large to be one is not even decrypted."""
        if len(raw) > MAX_UNSIGNED:
            return self._refuse("unsigned, too large for a url_verification")
        body = self._plain(raw)
        if isinstance(body, str):
            return self._refuse(f"unsigned, {body}")
        if not self._token_ok(body):
            return self._refuse("unsigned, bad verification token")
        return self._challenge(body) or self._refuse("missing signature")

    def __call__(self, request: web.Request, raw: bytes) -> object:
        if not self._cfg.encrypt_key:
            return self._refuse("no encrypt_key configured")  # config validation prevents this
        given = request.headers.get(SIGNATURE)
        if given is None:
            return self._unsigned(raw)
        problem = self._signature_problem(request, given, raw)
        if problem:
            return self._refuse(problem)
        body = self._plain(raw)
        if isinstance(body, str):
            return json_error(400, body)  # Feishu's own delivery: not a forgery, a broken body
        if not self._token_ok(body):
            return self._refuse("bad verification token")
        if body.get("type") == "url_verification":
            return self._challenge(body) or json_error(400, "malformed url_verification")
        return body


def _accepted() -> web.Response:
    return web.json_response({"msg": "success"})


def webhook(adapter: Adapter[FeishuConfig, Any]) -> Webhook:
    return Webhook(adapter, FeishuOpener(lambda: adapter.cfg), _accepted, MAX_BODY)
