"""`POST /api/v1/alertmanager`: Prometheus Alertmanager's webhook receiver (docs/status.md "Alert
routing"). Authentication, the per-token rate limit and the audit record are the `/api/v1/` guard's
(`handlers/api_v1.py`).

One payload = one group = one message, worded by `gateway.alertmanager`, delivered synchronously to
every configured alert robot through the senders the built-in notifier uses, and to `[alerts]
conversation` / `user` of a bot through the durable outbox. The answer tells Alertmanager the
truth, so its `alertmanager_notifications_failed_total` counts what did not arrive. Alertmanager's
webhook notifier (`notify/webhook`, `notify.Retrier`) treats 2xx as sent, retries 5xx with
exponential backoff until the group's notification deadline, and gives up on anything else at once:
- 200: every target took it (or had taken it on an earlier attempt);
- 502: a robot refused it (bad signature, key or keyword): Alertmanager retries, so a fixed
  `[alerts]` secret (reloaded live) lets the next attempt through, and logs our answer's text;
- 503 with Retry-After: a robot throttled it, was unreachable, or the store failed: retried.

An attempt after a partial failure must not post twice where it already arrived: each target
that took a payload is remembered, by the payload's digest, for `DELIVERED_TTL` in the store (not
per process: with several instances behind one URL, the retry may reach another one, and a
restart between two attempts must not forget). The outbox also gets an idempotency key, for the
window between its queueing and that mark.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import zoneinfo
from dataclasses import dataclass

import orjson
from aiohttp import hdrs, web

from gateway.alertmanager import Notification, PayloadError, parse, render
from gateway.config import AlertsConfig
from gateway.errors import PlatformError, StoreError, Throttled
from gateway.keys import HTTP, LIVE, OUTBOX, STORE
from gateway.outbox import SendRefused, SendRequest
from gateway.robots import RobotRefused
from gateway.store import Store

from .api_v1 import API_AUDIT, bad_request
from .http import json_error
from .robots import WebhookRobot, robot_senders

log = logging.getLogger(__name__)

ROUTE = "/api/v1/alertmanager"
ORIGIN = "alertmanager"
# How long a target that took a payload is remembered. Longer than Alertmanager keeps retrying one
# notification (its group_interval, at least 10 s; 5 min by default), shorter than a repeat
# (repeat_interval, 4 h by default): an identical payload within this window is a retry.
DELIVERED_TTL = 600.0
CONVERSATION_LIMIT = 4_096  # the message size when the bot named does not say its own
RETRY_AFTER = 10  # seconds, when no target said how long to wait


@dataclass(frozen=True, slots=True)
class Outcome:
    target: str  # "dingtalk" | "feishu" | "wecom" (a robot) | "dingtalk/default/conversation" (a bot's)
    state: str  # "delivered" | "already" | "refused" | "retry"
    why: str = ""
    retry_after: float = 0.0
    queued: str = ""  # the outbox entry's id (a bot's conversation: `GET /api/v1/messages/<id>`)


def payload_digest(data: object) -> str:
    """The same payload gives the same digest, however its keys were ordered."""
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def _taken(store: Store, key: str) -> bool:
    try:
        return await store.cache_get(key) is not None
    except StoreError as e:  # cannot tell: post (a duplicate beats a lost alert)
        log.warning("alertmanager: delivery record unreadable, posting: %s", e)
        return False


async def _remember(store: Store, key: str) -> None:
    try:
        await store.cache_put(key, "1", DELIVERED_TTL)
    except StoreError as e:
        log.warning("alertmanager: delivery not recorded (a retry may post again): %s", e)


async def _to_robot(robot: WebhookRobot, n: Notification, cfg: AlertsConfig, store: Store, digest: str) -> Outcome:
    key = f"alertmanager:{robot.name}:{digest}"
    if await _taken(store, key):
        return Outcome(robot.name, "already")
    message = render(n, cfg.locale or None, zoneinfo.ZoneInfo(cfg.timezone), robot.content_limit(True))
    try:
        await robot.send(message)
    except Throttled as e:
        return Outcome(robot.name, "retry", str(e), e.retry_after)
    except RobotRefused as e:
        return Outcome(robot.name, "refused", str(e))
    except PlatformError as e:
        return Outcome(robot.name, "retry" if e.retryable else "refused", str(e))
    await _remember(store, key)
    return Outcome(robot.name, "delivered")


async def _to_conversation(request: web.Request, n: Notification, cfg: AlertsConfig, digest: str) -> Outcome:
    kind, to = ("conversation", cfg.conversation) if cfg.conversation else ("user", cfg.user)
    target = f"{cfg.platform}/{cfg.bot}/{kind}"
    store, outbox = request.app[STORE], request.app[OUTBOX]
    key = f"alertmanager:{target}/{to}:{digest}"
    if await _taken(store, key):
        return Outcome(target, "already")
    pusher = outbox.pusher(cfg.platform, cfg.bot)
    limit = pusher.push_limit(True) if pusher is not None else CONVERSATION_LIMIT
    message = render(n, cfg.locale or None, zoneinfo.ZoneInfo(cfg.timezone), limit)
    send = SendRequest(
        platform=cfg.platform,
        bot=cfg.bot,
        to_kind=kind,
        to=to,
        text=message.text,
        markdown=True,
        origin=ORIGIN,
        # the digest within this window of time: a retry is the same, a repeat hours later is not
        idempotency_key=f"{digest}:{int(time.time() // DELIVERED_TTL)}",
    )
    try:
        entry, _ = await outbox.enqueue(send)
    except SendRefused as e:
        return Outcome(target, "refused", f"[alerts] {target}: {e.field}: {e.why}")
    except StoreError as e:
        return Outcome(target, "retry", f"not queued, the store is unavailable: {e}")
    await _remember(store, key)
    return Outcome(target, "delivered", queued=entry.id)


def _answer(outcomes: list[Outcome]) -> web.Response:
    refused = [o for o in outcomes if o.state == "refused"]
    retry = [o for o in outcomes if o.state == "retry"]
    targets = {o.target: o.state for o in outcomes}
    if refused or retry:
        error = "; ".join(o.why for o in refused + retry)
        log.warning("alertmanager notification not delivered: %s", error, extra={"targets": targets})
        if refused:
            return json_error(502, error, targets=targets)
        wait = max((o.retry_after for o in retry), default=0) or RETRY_AFTER
        response = json_error(503, error, targets=targets)
        response.headers[hdrs.RETRY_AFTER] = str(math.ceil(wait))
        return response
    queued = {o.target: o.queued for o in outcomes if o.queued}
    return web.json_response({"targets": targets, **({"queued": queued} if queued else {})})


async def receive(request: web.Request) -> web.Response:
    try:
        data = orjson.loads(await request.read())
        n = parse(data)
    except orjson.JSONDecodeError as e:
        return bad_request(None, f"the body is not JSON: {e}")
    except PayloadError as e:
        return bad_request(e.field, e.why)
    cfg = request.app[LIVE].in_force.alerts
    store = request.app[STORE]
    robots = robot_senders(cfg, request.app[HTTP], store)
    to_bot = bool(cfg.conversation or cfg.user)
    if not robots and not to_bot:
        return json_error(
            503,
            "nowhere to deliver alerts: set [alerts] dingtalk_webhook, feishu_webhook, wecom_webhook, "
            "or conversation / user of a bot",
        )
    digest = payload_digest(data)
    request[API_AUDIT] = {"group_key": n.group_key[:200], "alert_status": n.status, "alerts": len(n.alerts)}
    jobs = [_to_robot(robot, n, cfg, store, digest) for robot in robots]
    if to_bot:
        jobs.append(_to_conversation(request, n, cfg, digest))
    return _answer(list(await asyncio.gather(*jobs)))


def setup(app: web.Application) -> None:
    app.router.add_post(ROUTE, receive)
