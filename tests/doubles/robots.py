"""Group-robot webhooks as DingTalk, Feishu and WeCom run them, signature checks included.

DingTalk custom robot: `POST /robot/send?access_token=T[&timestamp=<ms>&sign=<urlencoded b64>]`,
sign = base64(HMAC-SHA256(key=secret, msg=f"{timestamp}\\n{secret}")); the server URL-decodes the
query like a servlet container (so a `+` left unencoded turns into a space and fails). Answers
`{"errcode": 0, "errmsg": "ok"}`, or 310000 for a bad/stale signature, 300001 for a bad token.
Feishu custom bot: `POST /open-apis/bot/v2/hook/<token>` with `timestamp` (s) and
sign = base64(HMAC-SHA256(key=f"{timestamp}\\n{secret}", msg=b"")) in the body. Answers
`{"code": 0, "msg": "success", "data": {}}`, or 19021 for a bad/stale signature. Markdown comes as
`msg_type: "interactive"`, a card whose markdown element holds the text.
WeCom group robot: `POST /cgi-bin/webhook/send?key=<key>`, `{"msgtype": "text"|"markdown", <type>:
{"content": ...}}`; answers `{"errcode": 0, "errmsg": "ok"}`, or 93000 for a bad key, 40058 for
content over 2,048 (text) / 4,096 (markdown) bytes, 45009 beyond 20 posts a minute.
Every refusal comes in an HTTP 200, as on the real platforms. `errcodes` makes a platform refuse
every post with a code, `next_errcodes` the next posts, one code each.
Written from the platforms' docs, independently of `handlers/robots/`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

# What the platforms say with these codes (as reported in the field).
ERRMSGS = {
    130101: "send too fast, exceed 20 times per minute",
    310000: "sign not match",
    9499: "Too Many Request",
    11232: "frequency limited",
    19024: "Key Words Not Found",
    93000: "invalid webhook url, hint: [1700000000_1_abc], from ip: 127.0.0.1, more info at "
    "https://open.work.weixin.qq.com/devtool/query?e=93000",
    45009: "api freq out of limit",
}


@dataclass
class RobotDouble:
    dingtalk_token: str = "dt-token"
    dingtalk_secret: str = "SECdingtalk-secret"
    feishu_token: str = "fs-token"
    feishu_secret: str = "feishu-secret"
    wecom_key: str = "wc-key"
    posts: list[tuple[str, str]] = field(default_factory=list)  # (platform, text), accepted only
    bodies: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (platform, body), accepted only
    refusals: list[tuple[str, int]] = field(default_factory=list)  # (platform, error code)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    errcodes: dict[str, int] = field(default_factory=dict)  # platform -> refuse every post with it
    next_errcodes: dict[str, list[int]] = field(default_factory=dict)  # platform -> refuse the next ones
    wecom_per_minute: int = 20
    _wecom_sent: deque[float] = field(default_factory=deque)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/robot/send", self.dingtalk)
        app.router.add_post("/open-apis/bot/v2/hook/{token}", self.feishu)
        app.router.add_post("/cgi-bin/webhook/send", self.wecom)
        return app

    def _switched(self, platform: str) -> int:
        """The error code a test switched on for this post, or 0."""
        queued = self.next_errcodes.get(platform)
        if queued:
            return queued.pop(0)
        return self.errcodes.get(platform, 0)

    def _accept(self, platform: str, text: str, body: dict[str, Any]) -> None:
        self.posts.append((platform, text))
        self.bodies.append((platform, body))
        self.changed.set()

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
        code = self._switched("dingtalk")
        if code:
            return self._refuse("dingtalk", code, {"errcode": code, "errmsg": ERRMSGS.get(code, "error")})
        body = await request.json()
        text = body["markdown"]["text"] if body["msgtype"] == "markdown" else body["text"]["content"]
        self._accept("dingtalk", text, body)
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
        code = self._switched("feishu")
        if code:
            return self._refuse("feishu", code, {"code": code, "msg": ERRMSGS.get(code, "error"), "data": {}})
        card = body["msg_type"] == "interactive"
        text = body["card"]["elements"][0]["content"] if card else body["content"]["text"]
        self._accept("feishu", text, body)
        return web.json_response({"code": 0, "msg": "success", "data": {}})

    async def wecom(self, request: web.Request) -> web.Response:
        if request.query.get("key") != self.wecom_key:
            return self._refuse("wecom", 93000, {"errcode": 93000, "errmsg": ERRMSGS[93000]})
        now = time.monotonic()
        while self._wecom_sent and now - self._wecom_sent[0] >= 60:
            self._wecom_sent.popleft()
        if len(self._wecom_sent) >= self.wecom_per_minute:
            return self._refuse("wecom", 45009, {"errcode": 45009, "errmsg": ERRMSGS[45009]})
        code = self._switched("wecom")
        if code:
            return self._refuse("wecom", code, {"errcode": code, "errmsg": ERRMSGS.get(code, "error")})
        body = await request.json()
        kind = body.get("msgtype")
        limit = {"text": 2048, "markdown": 4096}.get(kind)
        if limit is None:
            return self._refuse("wecom", 40008, {"errcode": 40008, "errmsg": "invalid message type"})
        content = body[kind]["content"]
        if len(content.encode()) > limit:
            errmsg = f"{kind}.content exceed max length {limit}"
            return self._refuse("wecom", 40058, {"errcode": 40058, "errmsg": errmsg})
        self._wecom_sent.append(now)
        self._accept("wecom", content, body)
        return web.json_response({"errcode": 0, "errmsg": "ok"})
