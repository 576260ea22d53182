"""The HMAC-SHA256 + base64 signature both platforms build their webhook and robot signatures on."""

from __future__ import annotations

import base64
import hashlib
import hmac


def hmac_sha256_base64(key: str, message: str) -> str:
    digest = hmac.new(key.encode(), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def same(given: str, expected: str) -> bool:
    """Constant-time comparison of two header values. A value that is not UTF-8 arrives
    surrogate-escaped from aiohttp; such a value is simply wrong, never an error."""
    return hmac.compare_digest(given.encode(errors="surrogateescape"), expected.encode(errors="surrogateescape"))
