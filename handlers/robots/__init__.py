"""Group robots: the senders for DingTalk, Feishu and WeCom group robots (one module per platform,
the shared part in `sender`), the list of the configured ones, and the background task (a
`cleanup_ctx`) that runs the built-in alert notifier with them. The Alertmanager receiver
(`handlers/alertmanager.py`) posts through the same senders."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gateway.alerts import Monitor
from gateway.config import AlertsConfig
from gateway.keys import ALERTS, CHANNELS, HTTP, LIVE, METRICS, STORE
from gateway.store import Store
from gateway.tasks import stop_task

from .dingtalk import DingTalkRobot
from .feishu import FeishuRobot
from .sender import WebhookRobot
from .wecom import WeComRobot

__all__ = ["DingTalkRobot", "FeishuRobot", "WeComRobot", "WebhookRobot", "configured_sinks", "robot_senders"]


def configured_sinks(cfg: AlertsConfig) -> list[str]:
    """The platforms of the configured robots (for the status page): never their URLs."""
    webhooks = (("dingtalk", cfg.dingtalk_webhook), ("feishu", cfg.feishu_webhook), ("wecom", cfg.wecom_webhook))
    return [name for name, url in webhooks if url]


def robot_senders(cfg: AlertsConfig, session: aiohttp.ClientSession, store: Store) -> list[WebhookRobot]:
    senders: list[WebhookRobot] = []
    if cfg.dingtalk_webhook:
        senders.append(DingTalkRobot(session, store, cfg.dingtalk_webhook, cfg.dingtalk_secret))
    if cfg.feishu_webhook:
        senders.append(FeishuRobot(session, store, cfg.feishu_webhook, cfg.feishu_secret))
    if cfg.wecom_webhook:
        senders.append(WeComRobot(session, store, cfg.wecom_webhook))
    return senders


async def _alerts_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(
        app[ALERTS].run(lambda: app[LIVE].config.alerts, lambda cfg: robot_senders(cfg, app[HTTP], app[STORE])),
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
