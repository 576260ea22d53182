"""Feishu/Lark custom bot ("自定义机器人"): `POST https://open.feishu.cn/open-apis/bot/v2/hook/<token>`.

Signing ("签名校验"): sign = base64(HMAC-SHA256(key=f"{timestamp_s}\\n{secret}", msg=b"")), sent as
`timestamp` and `sign` in the JSON body; a timestamp more than an hour off is refused.
Answer: `{"code": 0, "msg": "success", "data": {}}` (older deployments: `{"StatusCode": 0, ...}`),
refusals too in an HTTP 200. Limits: 100 posts a minute and 5 a second per robot (11232 when
exceeded), the body at most 20 KB. Source: Feishu open platform, "自定义机器人使用指南" (注意事项)
and "频控策略".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from yarl import URL

from gateway.robots import RobotMessage
from gateway.signing import hmac_sha256_base64

from .sender import WebhookRobot

BODY_LIMIT = 20_000  # "20 KB", read as the smaller of 20,000 and 20,480


def feishu_sign(timestamp_s: str, secret: str) -> str:
    return hmac_sha256_base64(f"{timestamp_s}\n{secret}", "")


class FeishuRobot(WebhookRobot):
    name = "feishu"
    per_minute = 5  # a full bucket is a burst: 5 keeps it within the 5-a-second limit
    body_limit = BODY_LIMIT
    throttled: ClassVar[Mapping[int, float]] = {9499: 60.0, 11232: 60.0}
    refusals: ClassVar[Mapping[int, str]] = {
        19001: "the webhook token is invalid, or the body malformed",
        19021: "signature mismatch, or the timestamp is more than an hour off (check the secret and the clock)",
        19022: "the gateway's IP address is not on the robot's allow-list",
        19024: "the message lacks the robot's keyword (the robot's security settings)",
    }

    def shape(self, message: RobotMessage, now: float) -> tuple[URL, dict[str, Any]]:
        return URL(self._webhook), self.body(message, now)

    def body(self, message: RobotMessage, now: float) -> dict[str, Any]:
        body: dict[str, Any]
        if message.markdown:  # a card with one markdown element: the custom bot's way to markdown
            card: dict[str, Any] = {"elements": [{"tag": "markdown", "content": message.text}]}
            if message.title:
                card["header"] = {"title": {"tag": "plain_text", "content": message.title}}
            body = {"msg_type": "interactive", "card": card}
        else:
            body = {"msg_type": "text", "content": {"text": message.text}}
        if self._secret:
            ts = str(int(now))
            body.update(timestamp=ts, sign=feishu_sign(ts, self._secret))
        return body

    @staticmethod
    def answer_code(data: Mapping[str, Any]) -> tuple[int | None, str]:
        code = data.get("code", data.get("StatusCode"))
        return (code if isinstance(code, int) else None), str(data.get("msg") or data.get("StatusMessage") or "")
