"""WeCom group robot ("群机器人", now "消息推送"): `POST https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=<key>`.

The key is the robot's only credential and sits in the URL: registered as a runtime secret, so no
log line shows it, and never put in an error. No signature.
Answer: `{"errcode": 0, "errmsg": "ok"}`, refusals too in an HTTP 200 (93000 = invalid webhook key,
e.g. the key pasted where the URL belongs; 40058 = content too long; 45009 = frequency limit).
Limits: text content at most 2,048 bytes, markdown 4,096 bytes; 20 posts a minute per robot.
Source: WeCom developer docs, "消息推送配置说明" (developer.work.weixin.qq.com/document/path/91770).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

import aiohttp
from yarl import URL

from gateway.logs import register_secret
from gateway.robots import BUCKET_WAIT, RobotMessage
from gateway.store import Store

from .sender import WebhookRobot

TEXT_LIMIT, MARKDOWN_LIMIT = 2_048, 4_096


class WeComRobot(WebhookRobot):
    name = "wecom"
    per_minute = 10
    throttled: ClassVar[Mapping[int, float]] = {45009: 60.0}
    refusals: ClassVar[Mapping[int, str]] = {
        93000: "invalid webhook key (configure the robot's whole webhook URL, key included)",
        40058: "the content is longer than WeCom takes",
    }

    def __init__(self, session: aiohttp.ClientSession, store: Store, webhook: str, wait: float = BUCKET_WAIT) -> None:
        super().__init__(session, store, webhook, wait=wait)
        try:
            query = parse_qsl(urlsplit(webhook).query)
        except ValueError:
            query = []
        for name, value in query:
            if name == "key":
                register_secret(value)  # the log masker does not know a bare `key=` is a credential

    def content_limit(self, markdown: bool) -> int:
        return MARKDOWN_LIMIT if markdown else TEXT_LIMIT

    def shape(self, message: RobotMessage, now: float) -> tuple[URL, dict[str, Any]]:
        kind = "markdown" if message.markdown else "text"
        return URL(self._webhook), {"msgtype": kind, kind: {"content": message.text}}

    @staticmethod
    def answer_code(data: Mapping[str, Any]) -> tuple[int | None, str]:
        code = data.get("errcode")
        return (code if isinstance(code, int) else None), str(data.get("errmsg") or "")
