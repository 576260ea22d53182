"""`POST /dingtalk/webhook`: the outgoing-robot HTTP callback, the fallback to Stream mode
(docs/protocols/dingtalk.md §C.2), on the shared webhook pattern (`handlers.webhook`).

DingTalk signs each callback: header `timestamp` (ms) must be within an hour of now and header
`sign` must equal base64(HmacSHA256(key=app secret, msg=timestamp + "\\n" + app secret)); the
same signature signs a custom group robot's messages (the alert notifier). The body is the same
robot message JSON as a Stream CALLBACK. The answer is 200 at once (the reply goes out later
through the sessionWebhook).

The signature covers the timestamp only, never the body: whoever captures one header pair can post
any body with it while the timestamp is accepted. So the timestamp is accepted for
`[dingtalk] max_message_age` (if shorter than DingTalk's hour: DingTalk signs as it posts), the
body's `createAt` must be as recent (`stale`, checked by the adapter, which drops the message), and
the dedup keys outlive both (config validation). Every refusal is the same 401 (`Refusals`).
The secret is read from the adapter's config on every request, so a reload's new one applies at
once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.adapter import Adapter
from gateway.config import DingTalkConfig
from gateway.signing import hmac_sha256_base64, same

from ..http import json_error
from ..webhook import Opener, Refusals, Webhook

MAX_BODY = 64 * 1024  # a robot message is a few KB (a text is capped at 20,000 bytes)
MAX_SKEW_MS = 3_600_000
# "Nothing to post now": the answer comes via the sessionWebhook. Encoded once, not per request.
ACCEPTED = orjson.dumps({"msgtype": "empty"})


def sign(timestamp: str, secret: str) -> str:
    return hmac_sha256_base64(secret, f"{timestamp}\n{secret}")


def signature_problem(
    timestamp: str, signature: str, secret: str, now_ms: int, max_skew_ms: int = MAX_SKEW_MS
) -> str:
    """Why the request is not from DingTalk, or "" when it is."""
    if not timestamp or not signature:
        return "missing timestamp or sign header"
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 15:
        return "malformed timestamp"  # (a thousand digits would make int() refuse: a 500)
    if abs(now_ms - int(timestamp)) > min(MAX_SKEW_MS, max_skew_ms):
        return "timestamp too old or in the future"
    if not same(signature, sign(timestamp, secret)):
        return "bad signature"
    return ""


def stale(body: object, max_age: float, now: float, required: bool) -> str:
    """Why a robot message is too old to answer (by its `createAt`, ms), or "" when it is not.
    `required`: a message without one is stale too (a webhook body is not signed: the field could
    simply have been removed from a replayed or forged one)."""
    created = body.get("createAt") if isinstance(body, dict) else None
    if isinstance(created, str) and created.isascii() and created.isdigit() and len(created) <= 15:
        created = int(created)  # the field is a number (§A.8); a digit string is read as one too
    if not isinstance(created, int | float) or isinstance(created, bool) or created != created:
        return "no createAt" if required else ""
    try:
        age = now - created / 1000.0
    except OverflowError:  # an integer no float can hold
        age = -math.inf
    if abs(age) > 1e10:  # beyond three centuries: no clock, just a made-up number
        return "createAt out of range"
    if age > max_age:
        return f"{age:.0f} s old"
    if age < -max_age:
        return f"createAt {-age:.0f} s in the future"
    return ""


def opener(config: Callable[[], DingTalkConfig]) -> Opener:
    """Checks requests against the app secret and `max_message_age` of `config()`, the bot's
    config in force."""
    refuse = Refusals("dingtalk")

    def open_request(request: web.Request, raw: bytes) -> object:
        headers, cfg = request.headers, config()
        problem = signature_problem(
            headers.get("timestamp", ""),
            headers.get("sign", ""),
            cfg.client_secret,
            int(time.time() * 1000),
            int(cfg.max_message_age * 1000),
        )
        if problem:
            return refuse(problem)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json_error(400, "body is not JSON")

    return open_request


def _accepted() -> web.Response:
    return web.Response(body=ACCEPTED, content_type="application/json")


def webhook(adapter: Adapter[DingTalkConfig, Any]) -> Webhook:
    return Webhook(adapter, opener(lambda: adapter.cfg), _accepted, MAX_BODY)
