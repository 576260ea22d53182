"""`POST /dingtalk/webhook`: the outgoing-robot HTTP callback, the fallback to Stream mode
(docs/protocols/dingtalk.md §C.2), on the shared webhook pattern (`handlers.webhook`).

DingTalk signs each callback: header `timestamp` (ms) must be within an hour of now and header
`sign` must equal base64(HmacSHA256(key=app secret, msg=timestamp + "\\n" + app secret)); the
same signature signs a custom group robot's messages (the alert notifier). The body is the same
robot message JSON as a Stream CALLBACK. The answer is 200 at once (the reply goes out later
through the sessionWebhook).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from gateway.adapter import Adapter
from gateway.signing import hmac_sha256_base64, same

from ..http import json_error
from ..webhook import Opener, Webhook

MAX_BODY = 64 * 1024  # a robot message is a few KB (a text is capped at 20,000 bytes)
MAX_SKEW_MS = 3_600_000
# "Nothing to post now": the answer comes via the sessionWebhook. Encoded once, not per request.
ACCEPTED = orjson.dumps({"msgtype": "empty"})


def sign(timestamp: str, secret: str) -> str:
    return hmac_sha256_base64(secret, f"{timestamp}\n{secret}")


def signature_problem(timestamp: str, signature: str, secret: str, now_ms: int) -> str:
    """Why the request is not from DingTalk, or "" when it is."""
    if not timestamp or not signature:
        return "missing timestamp or sign header"
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 15:
        return "malformed timestamp"  # (a thousand digits would make int() refuse: a 500)
    if abs(now_ms - int(timestamp)) > MAX_SKEW_MS:
        return "timestamp too old or in the future"
    if not same(signature, sign(timestamp, secret)):
        return "bad signature"
    return ""


def opener(secret: str) -> Opener:
    def open_request(request: web.Request, raw: bytes) -> object:
        headers = request.headers
        problem = signature_problem(
            headers.get("timestamp", ""), headers.get("sign", ""), secret, int(time.time() * 1000)
        )
        if problem:
            return json_error(401, problem)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json_error(400, "body is not JSON")

    return open_request


def _accepted() -> web.Response:
    return web.Response(body=ACCEPTED, content_type="application/json")


def webhook(adapter: Adapter[Any, Any], secret: str) -> Webhook:
    return Webhook(adapter, opener(secret), _accepted, MAX_BODY)
