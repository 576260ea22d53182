"""Admin login primitives: JWT HS256 by hand (hmac/hashlib), password checks, a failed-login limiter.

Only HS256 is accepted (a token naming any other algorithm, "none" included, is refused before its
signature is looked at). Tokens carry a fingerprint of the password they were issued for, so
changing `[admin] password` logs every session out. Every secret comparison is constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from .config import AdminConfig

log = logging.getLogger(__name__)

_HEADER = {"alg": "HS256", "typ": "JWT"}


class TokenError(Exception):
    """A token that must not be honoured; the message says why (malformed, signature, expired)."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise TokenError("malformed token") from e


def _sign(secret: bytes, signing_input: bytes) -> bytes:
    return hmac.new(secret, signing_input, hashlib.sha256).digest()


def encode(secret: bytes, claims: dict[str, Any]) -> str:
    head = _b64encode(orjson.dumps(_HEADER))
    body = _b64encode(orjson.dumps(claims))
    signing_input = f"{head}.{body}".encode("ascii")
    return f"{head}.{body}.{_b64encode(_sign(secret, signing_input))}"


def decode(secret: bytes, token: str, now: float | None = None) -> dict[str, Any]:
    """Verify signature and expiry; return the claims or raise `TokenError`."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise TokenError("malformed token")
    try:
        header = orjson.loads(_b64decode(parts[0]))
    except orjson.JSONDecodeError as e:
        raise TokenError("malformed token") from e
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise TokenError("unsupported token algorithm")
    expected = _b64encode(_sign(secret, f"{parts[0]}.{parts[1]}".encode("ascii")))
    # Compared as text: base64's spare bits would let several spellings decode to the same bytes.
    if not hmac.compare_digest(expected.encode(), parts[2].encode("utf-8", "replace")):
        raise TokenError("bad token signature")
    try:
        claims = orjson.loads(_b64decode(parts[1]))
    except orjson.JSONDecodeError as e:
        raise TokenError("malformed token") from e
    if not isinstance(claims, dict):
        raise TokenError("malformed token")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise TokenError("token has no expiry")
    if (time.time() if now is None else now) >= exp:
        raise TokenError("token expired")
    return claims


def password_matches(given: str, expected: str) -> bool:
    """Constant-time, also in the length: both sides are hashed to 32 bytes first."""
    if not expected:
        return False
    a = hashlib.sha256(given.encode("utf-8")).digest()
    b = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(a, b)


def bearer_matches(header: str, token: str) -> bool:
    """Does an `Authorization` header carry exactly `Bearer <token>`?"""
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and password_matches(value.strip(), token)


class LoginLimiter:
    """Failed logins per client address: `max_failures` within `window` seconds lock that address
    until the window has passed. Bounded: beyond `max_clients` the stalest entries are forgotten."""

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 300.0,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may try now."""
        entry = self._failures.get(client)
        if entry is None:
            return 0.0
        started, count = entry
        left = started + self.window - self._clock()
        if left <= 0:
            del self._failures[client]
            return 0.0
        return left if count >= self.max_failures else 0.0

    def failed(self, client: str) -> None:
        now = self._clock()
        started, count = self._failures.get(client, (now, 0))
        if now - started >= self.window:
            started, count = now, 0
        self._failures[client] = (started, count + 1)
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


class AdminAuth:
    """Issues and checks admin tokens against the admin config in force (it may be reloaded)."""

    def __init__(self, limiter: LoginLimiter | None = None) -> None:
        self.limiter = limiter or LoginLimiter()
        # Used when no `jwt_secret` is configured: valid for this process only.
        self._process_secret = secrets.token_bytes(32)

    def secret(self, cfg: AdminConfig) -> bytes:
        return cfg.jwt_secret.encode("utf-8") if cfg.jwt_secret else self._process_secret

    def _fingerprint(self, cfg: AdminConfig) -> str:
        digest = hmac.new(
            self.secret(cfg), b"password:" + cfg.password.encode("utf-8"), hashlib.sha256
        )
        return _b64encode(digest.digest()[:12])

    def issue(self, cfg: AdminConfig, now: float | None = None) -> tuple[str, float]:
        """A token for the admin; returns (token, expiry as a Unix time)."""
        issued = time.time() if now is None else now
        expires = issued + cfg.token_ttl
        claims = {
            "sub": "admin",
            "iat": int(issued),
            "exp": int(expires),
            "pwd": self._fingerprint(cfg),
            "jti": secrets.token_hex(8),
        }
        return encode(self.secret(cfg), claims), float(int(expires))

    def verify(self, cfg: AdminConfig, token: str, now: float | None = None) -> dict[str, Any]:
        claims = decode(self.secret(cfg), token, now)
        if not hmac.compare_digest(str(claims.get("pwd", "")), self._fingerprint(cfg)):
            raise TokenError("token was issued for another password")
        return claims

    @staticmethod
    def warn_if_ephemeral(cfg: AdminConfig) -> None:
        if cfg.password and not cfg.jwt_secret:
            log.warning(
                "admin jwt_secret is not set: using a random per-process secret, so logins do not "
                "survive a restart (set [admin] jwt_secret or BOTGATE_ADMIN__JWT_SECRET)"
            )
