"""DingTalk custom robot ("自定义机器人"): `POST <webhook>` where the webhook is
`https://oapi.dingtalk.com/robot/send?access_token=…`.

Signing ("加签"): sign = urlencode(base64(HMAC-SHA256(key=secret, msg=f"{timestamp_ms}\\n{secret}"))),
added as `&timestamp=<ms>&sign=<sign>`; a timestamp more than an hour off is refused.
Answer: `{"errcode": 0, "errmsg": "ok"}`, also for refusals, always in an HTTP 200.
Limits: 20 posts a minute per robot, beyond that the robot is blocked for 10 minutes (errcode
130101 "send too fast, exceed 20 times per minute"); the body at most 20,000 bytes ("body 大小不合法;
请保持大小在 20000bytes 以内"). Sources: DingTalk open platform, "自定义机器人接入" (调用频率限制);
the limits as seen in the field: ccfos/nightingale#369, ZhuLinsen/daily_stock_analysis#61.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

from yarl import URL

from gateway.robots import RobotMessage

from ..dingtalk.webhook import sign
from .sender import WebhookRobot

BODY_LIMIT = 20_000


class DingTalkRobot(WebhookRobot):
    name = "dingtalk"
    per_minute = 10
    body_limit = BODY_LIMIT
    throttled: ClassVar[Mapping[int, float]] = {130101: 600.0}  # blocked for ten minutes
    busy: ClassVar[frozenset[int]] = frozenset({-1})  # "system busy" (DingTalk's global error codes)
    refusals: ClassVar[Mapping[int, str]] = {
        310000: "signature, keyword or IP allow-list check failed (the robot's security settings)",
        300001: "the access_token in the webhook URL is missing or unknown",
    }

    def url(self, now: float) -> URL:
        if not self._secret:
            return URL(self._webhook)
        ts = str(int(now * 1000))
        sep = "&" if "?" in self._webhook else "?"
        signature = quote(sign(ts, self._secret), safe="")
        return URL(f"{self._webhook}{sep}timestamp={ts}&sign={signature}", encoded=True)

    def shape(self, message: RobotMessage, now: float) -> tuple[URL, dict[str, Any]]:
        if message.markdown:
            title = message.title or message.text.partition("\n")[0].lstrip("#").strip()
            body: dict[str, Any] = {"msgtype": "markdown", "markdown": {"title": title, "text": message.text}}
        else:
            body = {"msgtype": "text", "text": {"content": message.text}}
        return self.url(now), body

    @staticmethod
    def answer_code(data: Mapping[str, Any]) -> tuple[int | None, str]:
        code = data.get("errcode")
        return (code if isinstance(code, int) else None), str(data.get("errmsg") or "")
