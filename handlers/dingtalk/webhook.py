"""`POST /dingtalk/webhook`: the outgoing-robot HTTP callback, the fallback to Stream mode (§C.2).

DingTalk signs each callback: header `timestamp` (ms) must be within an hour of now and header
`sign` must equal base64(HmacSHA256(key=app secret, msg=timestamp + "\\n" + app secret)). The body
is the same robot message JSON as a Stream CALLBACK. The answer is 200 at once (the reply goes out
later through the sessionWebhook); bad signatures 401, malformed bodies 400, oversized 413, and 503
while the gateway cannot accept messages, so DingTalk retries. Never a 500 for bad input.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.admission import Admission

from ..http import json_error
from .parse import Dropped

MAX_BODY = 64 * 1024  # a robot message is a few KB; anything near this is not one
MAX_SKEW_MS = 3_600_000
# "Nothing to post now": the answer comes via the sessionWebhook. Encoded once, not per request.
ACCEPTED = orjson.dumps({"msgtype": "empty"})

Intake = Callable[[Any, str], Awaitable[Admission | Dropped]]


def sign(timestamp: str, secret: str) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def signature_problem(timestamp: str, signature: str, secret: str, now_ms: int) -> str:
    """Why the request is not from DingTalk, or "" when it is."""
    if not timestamp or not signature:
        return "missing timestamp or sign header"
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 15:
        return "malformed timestamp"  # (a thousand digits would make int() refuse: a 500)
    if abs(now_ms - int(timestamp)) > MAX_SKEW_MS:
        return "timestamp too old or in the future"
    # Header values arrive surrogate-escaped when they are not UTF-8; such a value is just wrong.
    if not hmac.compare_digest(sign(timestamp, secret).encode(), signature.encode(errors="surrogateescape")):
        return "bad signature"
    return ""


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it exceeds `limit` (never buffered beyond that)."""
    if request.content_length is not None:
        # Declared length: refuse early, else one read (aiohttp caps it at client_max_size too).
        return None if request.content_length > limit else await request.read()
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _accepted() -> web.Response:
    return web.Response(body=ACCEPTED, content_type="application/json")


def webhook_handler(secret: str, intake: Intake) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        problem = signature_problem(
            request.headers.get("timestamp", ""),
            request.headers.get("sign", ""),
            secret,
            int(time.time() * 1000),
        )
        if problem:
            return json_error(401, problem)
        raw = await _read_limited(request, MAX_BODY)
        if raw is None:
            return json_error(413, "request body too large", limit=MAX_BODY)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json_error(400, "body is not JSON")
        result = await intake(body, "webhook")
        if isinstance(result, Dropped):
            if result.reason == "malformed":
                return json_error(400, f"not a robot message: {result.detail}")
            return _accepted()
        if not result.acknowledge:
            return json_error(503, f"not accepted ({result.value}), retry later")
        return _accepted()

    return handle
