"""Group-robot webhooks for the built-in alert notifier: DingTalk and Feishu custom bots, signed the
way each platform requires, plus the background task (a `cleanup_ctx`) that runs the core monitor.

DingTalk custom robot ("加签"): sign = urlencode(base64(HMAC-SHA256(key=secret,
msg=f"{timestamp_ms}\\n{secret}"))), sent as `&timestamp=<ms>&sign=<sign>` query parameters; the
answer is `{"errcode": 0, "errmsg": "ok"}` (310000 = bad signature or keyword).
Feishu/Lark custom bot ("签名校验"): sign = base64(HMAC-SHA256(key=f"{timestamp_s}\\n{secret}",
msg=b"")), sent as `timestamp` and `sign` in the JSON body; the answer is `{"code": 0, ...}`
(older deployments answer `{"StatusCode": 0, ...}`; 19021 = bad signature or stale timestamp).
Both reject a timestamp more than an hour off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from yarl import URL

from gateway.alerts import Alert, AlertSink, Monitor
from gateway.config import AlertsConfig
from gateway.errors import PlatformError
from gateway.keys import ALERTS, CHANNELS, HTTP, LIVE, METRICS
from gateway.signing import hmac_sha256_base64
from gateway.tasks import stop_task

from .dingtalk.webhook import sign as dingtalk_sign

TIMEOUT = aiohttp.ClientTimeout(total=10)


def feishu_sign(timestamp_s: str, secret: str) -> str:
    return hmac_sha256_base64(f"{timestamp_s}\n{secret}", "")


async def _post_json(
    session: aiohttp.ClientSession, url: URL, body: dict[str, Any]
) -> dict[str, Any]:
    try:
        async with session.post(url, json=body, timeout=TIMEOUT) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200 or not isinstance(data, dict):
                raise PlatformError(f"robot webhook answered HTTP {resp.status}")
            return data
    except (aiohttp.ClientError, ValueError) as e:
        raise PlatformError(f"robot webhook unreachable: {type(e).__name__}") from e


class DingTalkRobot:
    name = "dingtalk"

    def __init__(self, session: aiohttp.ClientSession, webhook: str, secret: str) -> None:
        self._session = session
        self._webhook = webhook
        self._secret = secret

    def url(self, now: float) -> URL:
        if not self._secret:
            return URL(self._webhook)
        ts = str(int(now * 1000))
        sep = "&" if "?" in self._webhook else "?"
        sign = quote(dingtalk_sign(ts, self._secret), safe="")
        return URL(f"{self._webhook}{sep}timestamp={ts}&sign={sign}", encoded=True)

    async def post(self, alert: Alert) -> None:
        body = {"msgtype": "text", "text": {"content": alert.text()}}
        data = await _post_json(self._session, self.url(time.time()), body)
        if data.get("errcode") != 0:
            raise PlatformError(
                f"dingtalk robot refused: {data.get('errcode')} {data.get('errmsg')}"
            )


class FeishuRobot:
    name = "feishu"

    def __init__(self, session: aiohttp.ClientSession, webhook: str, secret: str) -> None:
        self._session = session
        self._webhook = webhook
        self._secret = secret

    def body(self, alert: Alert, now: float) -> dict[str, Any]:
        body: dict[str, Any] = {"msg_type": "text", "content": {"text": alert.text()}}
        if self._secret:
            ts = str(int(now))
            body.update(timestamp=ts, sign=feishu_sign(ts, self._secret))
        return body

    async def post(self, alert: Alert) -> None:
        data = await _post_json(self._session, URL(self._webhook), self.body(alert, time.time()))
        code = data.get("code", data.get("StatusCode"))
        if code != 0:
            raise PlatformError(
                f"feishu robot refused: {code} {data.get('msg') or data.get('StatusMessage')}"
            )


def configured_sinks(cfg: AlertsConfig) -> list[str]:
    return [
        name
        for name, url in (("dingtalk", cfg.dingtalk_webhook), ("feishu", cfg.feishu_webhook))
        if url
    ]


def robot_sinks(cfg: AlertsConfig, session: aiohttp.ClientSession) -> list[AlertSink]:
    sinks: list[AlertSink] = []
    if cfg.dingtalk_webhook:
        sinks.append(DingTalkRobot(session, cfg.dingtalk_webhook, cfg.dingtalk_secret))
    if cfg.feishu_webhook:
        sinks.append(FeishuRobot(session, cfg.feishu_webhook, cfg.feishu_secret))
    return sinks


async def _alerts_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(
        app[ALERTS].run(lambda: app[LIVE].config.alerts, lambda cfg: robot_sinks(cfg, app[HTTP])),
        name="alerts",
    )
    try:
        yield
    finally:
        await stop_task(task)


def setup(app: web.Application) -> None:
    channels = app[CHANNELS]
    app[ALERTS] = Monitor(app[METRICS].stats, lambda: [c.status() for c in channels.values()])
    app.cleanup_ctx.append(_alerts_ctx)
