"""Group-robot webhooks as DingTalk and Feishu run them, signature checks included.

DingTalk custom robot: `POST /robot/send?access_token=T[&timestamp=<ms>&sign=<urlencoded b64>]`,
sign = base64(HMAC-SHA256(key=secret, msg=f"{timestamp}\\n{secret}")); the server URL-decodes the
query like a servlet container (so a `+` left unencoded turns into a space and fails). Answers
`{"errcode": 0, "errmsg": "ok"}`, or 310000 for a bad/stale signature, 300001 for a bad token.
Feishu custom bot: `POST /open-apis/bot/v2/hook/<token>` with `timestamp` (s) and
sign = base64(HMAC-SHA256(key=f"{timestamp}\\n{secret}", msg=b"")) in the body. Answers
`{"code": 0, "msg": "success", "data": {}}`, or 19021 for a bad/stale signature.
Written from the platforms' docs, independently of `handlers/robots.py`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web


@dataclass
class RobotDouble:
    dingtalk_token: str = "dt-token"
    dingtalk_secret: str = "SECdingtalk-secret"
    feishu_token: str = "fs-token"
    feishu_secret: str = "feishu-secret"
    posts: list[tuple[str, str]] = field(default_factory=list)  # (platform, text), accepted only
    refusals: list[tuple[str, int]] = field(default_factory=list)  # (platform, error code)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/robot/send", self.dingtalk)
        app.router.add_post("/open-apis/bot/v2/hook/{token}", self.feishu)
        return app

    async def wait_posts(self, count: int, within: float = 10.0) -> list[tuple[str, str]]:
        async with asyncio.timeout(within):
            while len(self.posts) < count:
                self.changed.clear()
                await self.changed.wait()
        return list(self.posts)

    def _refuse(self, platform: str, code: int, body: dict[str, Any]) -> web.Response:
        self.refusals.append((platform, code))
        self.changed.set()
        return web.json_response(body)

    async def dingtalk(self, request: web.Request) -> web.Response:
        query = dict(parse_qsl(request.rel_url.raw_query_string))  # unquote_plus, like a servlet
        if query.get("access_token") != self.dingtalk_token:
            return self._refuse(
                "dingtalk", 300001, {"errcode": 300001, "errmsg": "token is not exist"}
            )
        if self.dingtalk_secret:
            ts = query.get("timestamp", "")
            expected = base64.b64encode(
                hmac.new(
                    self.dingtalk_secret.encode(),
                    f"{ts}\n{self.dingtalk_secret}".encode(),
                    hashlib.sha256,
                ).digest()
            ).decode()
            fresh = ts.isdigit() and abs(time.time() * 1000 - int(ts)) < 3_600_000
            if not fresh or query.get("sign") != expected:
                return self._refuse(
                    "dingtalk", 310000, {"errcode": 310000, "errmsg": "sign not match"}
                )
        body = await request.json()
        self.posts.append(("dingtalk", body["text"]["content"]))
        self.changed.set()
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def feishu(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.feishu_token:
            return self._refuse(
                "feishu",
                19001,
                {"code": 19001, "msg": "param invalid: incoming webhook access token invalid"},
            )
        body = await request.json()
        if self.feishu_secret:
            ts = str(body.get("timestamp", ""))
            key = f"{ts}\n{self.feishu_secret}".encode()
            expected = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
            fresh = ts.isdigit() and abs(time.time() - int(ts)) < 3600
            if not fresh or body.get("sign") != expected:
                return self._refuse(
                    "feishu",
                    19021,
                    {
                        "code": 19021,
                        "msg": "sign match fail or timestamp is not within one hour from current time",
                    },
                )
        self.posts.append(("feishu", body["content"]["text"]))
        self.changed.set()
        return web.json_response({"code": 0, "msg": "success", "data": {}})
