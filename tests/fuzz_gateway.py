"""The live gateway the fuzz tests abuse: `python run.py` with DingTalk and Feishu enabled (webhooks and
long connections, `mode = "both"`) against their doubles, which are served from a thread so the
synchronous hypothesis tests can block on sockets while the doubles keep talking.

`Live.assert_healthy()` is every fuzz test's final oracle: the process is up, stderr is empty, no
ERROR line was logged, metric labels stayed bounded, and each channel (web chat, DingTalk Stream,
Feishu ws) still answers a message end to end.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson

from handlers.dingtalk.webhook import sign
from handlers.feishu.webhook import signature
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu import APP_SECRET, FeishuDouble
from tests.doubles.feishu_events import APP_ID, message_event
from tests.fuzzing import OP_CLOSE, OP_TEXT, ROUTES, WebSocket, request, ws_connect
from tests.process import GatewayProcess
from tests.threaded import ThreadedServer

ENCRYPT_KEY = "fuzz-encrypt-key"
VERIFICATION_TOKEN = "vtoken"  # what the Feishu event builders put in their header


@dataclass
class Live:
    gw: GatewayProcess
    dingtalk: DingTalkDouble
    dingtalk_server: ThreadedServer
    feishu: FeishuDouble
    feishu_server: ThreadedServer

    @property
    def port(self) -> int:
        return self.gw.port

    # -- signing as the platforms do -------------------------------------------------------------
    def dingtalk_headers(
        self, timestamp_ms: int | None = None, secret: str | None = None
    ) -> list[tuple[str, str]]:
        ts = str(int(time.time() * 1000) if timestamp_ms is None else timestamp_ms)
        return [("timestamp", ts), ("sign", sign(ts, secret or self.dingtalk.client_secret))]

    @staticmethod
    def feishu_headers(
        body: bytes, timestamp: int | str | None = None, key: str = ENCRYPT_KEY
    ) -> list[tuple[str, str]]:
        ts, nonce = str(int(time.time()) if timestamp is None else timestamp), uuid.uuid4().hex
        return [
            ("X-Lark-Request-Timestamp", ts),
            ("X-Lark-Request-Nonce", nonce),
            ("X-Lark-Signature", signature(ts, nonce, key, body)),
        ]

    # -- the final oracle ------------------------------------------------------------------------
    def assert_healthy(self) -> None:
        assert self.gw.proc is not None and self.gw.proc.poll() is None, self.gw.output()
        assert "still there?" in self.web_chat_answer("still there?")
        assert "still there?" in self.dingtalk_answer("still there?")
        assert "still there?" in self.feishu_answer("still there?")
        problems = [line for line in self.gw.log_lines() if line["level"] in ("ERROR", "CRITICAL")]
        assert not problems, problems
        assert self.gw.stderr() == ""
        # Route labels stay bounded: no fuzzed path becomes a metric series.
        raw = request(self.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").body
        routes = set(re.findall(r'botgate_http_requests_total\{route="([^"]*)"', raw.decode()))
        assert routes <= {r.path for r in ROUTES} | {"unmatched"}, routes

    def web_chat_answer(self, text: str) -> str:
        ws = chat_session(self, "afterfuzz01")
        try:
            ws.send_text(orjson.dumps({"type": "message", "id": uuid.uuid4().hex, "text": text}).decode())
            reply = read_json_until(ws, ("done", "notice", "error"))
        finally:
            ws.close()
        assert reply is not None and reply["type"] == "done", reply
        return str(reply["text"])

    def dingtalk_answer(self, text: str) -> str:
        """A message over the Stream connection (reconnected first, if a fuzzed frame ended it)."""
        double = self.dingtalk
        body = double.message(text, staff_id=f"after{uuid.uuid4().hex[:6]}")
        session = body["sessionWebhook"].partition("session=")[2]
        self.dingtalk_server.run(double.push(body))

        def answers() -> list[str]:
            return [str(p["markdown"]["text"]) for p in double.session_posts if p["session"] == session]

        self.dingtalk_server.run(double.wait_for(answers))
        [answer] = answers()
        return answer

    def feishu_answer(self, text: str) -> str:
        double, message_id = self.feishu, f"om_after_{uuid.uuid4().hex[:8]}"
        self.feishu_server.run(double.push_event(message_event(text, message_id=message_id)))
        self.feishu_server.run(double.wait_for(lambda: double.answer(message_id) is not None))
        return str(double.answer(message_id))


@contextmanager
def live_gateway(workdir: Path, limit: int) -> Iterator[Live]:
    dingtalk, feishu = DingTalkDouble(), FeishuDouble()
    dingtalk_server = ThreadedServer(dingtalk.app()).start()
    feishu_server = ThreadedServer(feishu.app()).start()
    dingtalk.base = dingtalk_server.base
    config = f"""
[server]
max_body_bytes = {limit}
[limits]
# Hundreds of fuzzed messages from one sender: the rate limits would silence the checks after them.
per_user_per_minute = 0
per_conversation_per_minute = 0
[dingtalk]
enabled = true
mode = "both"
client_id = "{dingtalk.client_id}"
api_base = "{dingtalk.base}"
oapi_base = "{dingtalk.base}"
reconnect_delay = 0.05
[feishu]
enabled = true
mode = "both"
app_id = "{APP_ID}"
domain = "{feishu_server.base}"
"""
    secrets = {
        "BOTGATE_DINGTALK__CLIENT_SECRET": dingtalk.client_secret,
        "BOTGATE_FEISHU__APP_SECRET": APP_SECRET,
        "BOTGATE_FEISHU__ENCRYPT_KEY": ENCRYPT_KEY,
        "BOTGATE_FEISHU__VERIFICATION_TOKEN": VERIFICATION_TOKEN,
    }
    gw = GatewayProcess(workdir, config, secrets)
    try:
        gw.start()
        dingtalk_server.run(dingtalk.wait_for(lambda: dingtalk.connected, timeout=20))
        feishu_server.run(feishu.wait_for(lambda: feishu.pings >= 1, timeout=20))
        yield Live(gw, dingtalk, dingtalk_server, feishu, feishu_server)
        assert gw.stop() == 0
    finally:
        gw.kill()
        dingtalk_server.stop()
        feishu_server.stop()


# -- web chat --------------------------------------------------------------------------------------
def chat_session(live: Live, session: str) -> WebSocket:
    ws = ws_connect(live.port, f"/chat/ws?session={session}", live.gw.login_token())
    hello = ws.read()
    assert hello is not None and orjson.loads(hello[1])["type"] == "hello"
    return ws


def read_json_until(ws: WebSocket, types: tuple[str, ...]) -> dict[str, object] | None:
    """Text frames until one of `types` (returned); None when the server closed the connection."""
    while (got := ws.read()) is not None:
        opcode, data = got
        if opcode == OP_CLOSE:
            return None
        if opcode == OP_TEXT:
            body = orjson.loads(data)
            if body["type"] in types:
                return dict(body)
    return None
