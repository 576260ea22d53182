"""The WeCom double (tests/doubles/wecom.py) against the official SDK's client
(wecom-aibot-python-sdk 1.0.2, `aibot.WSClient`), the oracle that keeps the double honest: it
subscribes, gets pushed messages through its handlers, streams replies the double records, keeps
its heartbeat, finds a silent socket dead, is kicked by a second client, and meets the refusals
the platform answers (docs/protocols/wecom.md §2). The callback-mode helpers are checked against a
reference webhook built on handlers/wecom/crypto.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from handlers.wecom import frame as wf
from handlers.wecom.crypto import CallbackCrypto, CryptoError
from tests.doubles import wecom
from tests.doubles.wecom import WeComDouble
from tests.oracles.wecom import WSClient, WSClientOptions, sdk_ws

# The SDK pins every connection to a TLS context (`aibot/ws.py` `_SSL_CONTEXT`), which websockets
# refuses for a ws:// URL; the double is plain ws:// on loopback, so the SDK's setting is cleared.
pytestmark = pytest.mark.usefixtures("sdk_plain_ws")


@pytest.fixture
def sdk_plain_ws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdk_ws, "_SSL_CONTEXT", None)


class Quiet:
    def debug(self, *a: Any) -> None: ...
    def info(self, *a: Any) -> None: ...
    def warn(self, *a: Any) -> None: ...
    def error(self, *a: Any) -> None: ...


class Sdk:
    """One SDK client, with what it received and the errors it reported."""

    def __init__(self, double: WeComDouble, secret: str = wecom.SECRET) -> None:
        self.client = WSClient(WSClientOptions(
            bot_id=wecom.BOT_ID, secret=secret, ws_url=double.ws_url, logger=Quiet(),
            heartbeat_interval=50, max_reconnect_attempts=0,  # ms; no reconnects
        ))
        self.frames: list[dict[str, Any]] = []
        self.errors: list[Exception] = []
        self._changed = asyncio.Condition()
        self.client.on("error", lambda error: self._record(self.errors, error))
        self.client.on("message", lambda frame: self._record(self.frames, frame))
        self.client.on("event", lambda frame: self._record(self.frames, frame))

    async def _record(self, into: list[Any], item: Any) -> None:
        into.append(item)
        async with self._changed:
            self._changed.notify_all()

    async def wait(self, predicate: Callable[[], object], timeout: float = 5.0) -> None:
        """Until `predicate()` holds, woken by everything the client receives or reports."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)


@pytest.fixture
async def double(aiohttp_server: Callable[..., Any]) -> WeComDouble:
    return await wecom.start(aiohttp_server)


@pytest.fixture
async def sdk(double: WeComDouble) -> AsyncIterator[Callable[..., Any]]:
    started: list[Sdk] = []

    async def connect(secret: str = wecom.SECRET, subscribed: bool = True) -> Sdk:
        client = Sdk(double, secret)
        started.append(client)
        before = len(double.subscribes)
        await client.client.connect()
        await double.wait_for(lambda: len(double.subscribes) > before)
        if subscribed:
            await double.wait_for(lambda: double.live and double.live[-1].number == len(double.connections))
        return client

    yield connect
    for client in started:
        if client.client._started:
            client.client.disconnect()
    await double.wait_for(lambda: all(c.ws.closed for c in double.connections))


async def test_subscribe_push_and_stream_reply(double: WeComDouble, sdk: Callable[..., Any]) -> None:
    client = await sdk()
    assert double.subscribes == [{"bot_id": wecom.BOT_ID, "secret": wecom.SECRET}]

    async def answer(frame: dict[str, Any]) -> None:
        await client.client.reply_stream(frame, "s1", "思考中", finish=False)
        await client.client.reply_stream(frame, "s1", "思考中……答案是 42", finish=True)

    client.client.on("message.text", answer)
    req_id = await double.push(wecom.text("问题", group=wecom.GROUP))
    stream = await double.wait_stream(req_id)
    assert stream.snapshots == ["思考中", "思考中……答案是 42"] and stream.conversation == wecom.GROUP
    assert client.frames[0]["body"]["text"]["content"] == f"@{wecom.BOT_NAME} 问题"
    assert double.refused == []


async def test_heartbeat_then_a_silent_socket_is_found_dead(double: WeComDouble, sdk: Callable[..., Any]) -> None:
    client = await sdk()
    conn = double.live[-1]
    await double.wait_for(lambda: conn.pings >= 3)
    assert client.client._ws_manager._missed_pong_count <= 1  # every ping acknowledged
    double.go_silent()
    # The SDK gives up after 2 unanswered pings and closes the socket itself.
    await double.wait_for(lambda: conn.ws.closed)
    assert not client.client.is_connected


async def test_a_second_client_kicks_the_first(double: WeComDouble, sdk: Callable[..., Any]) -> None:
    first = await sdk()
    second = await sdk()
    await double.wait_for(lambda: double.connections[0].ws.closed)
    await first.wait(lambda: first.frames)
    kicked = [f for f in first.frames if f.get("cmd") == wf.EVENT_CALLBACK]
    assert [f["body"]["event"]["eventtype"] for f in kicked] == [wf.DISCONNECTED_EVENT]
    assert [c.number for c in double.live] == [2] and second.client.is_connected
    req_id = await double.push(wecom.text("hi"))  # goes to the newest connection only
    await second.wait(lambda: len(second.frames) == 1)
    assert second.frames[0]["headers"]["req_id"] == req_id and not [f for f in first.frames if f.get("cmd") ==
                                                                     wf.MSG_CALLBACK]


async def test_wrong_secret_and_subscribe_rate(double: WeComDouble, sdk: Callable[..., Any]) -> None:
    wrong = await sdk(secret="wrong", subscribed=False)
    await wrong.wait(lambda: wrong.errors)
    assert "853000" in str(wrong.errors[0]) and double.live == []
    double.subscribe_limit = 1  # the next subscribe within the window is over the limit
    limited = await sdk(subscribed=False)
    await limited.wait(lambda: limited.errors)
    assert "45009" in str(limited.errors[0]) and double.live == []


async def test_refusals_the_sdk_reports(double: WeComDouble, sdk: Callable[..., Any]) -> None:
    double.stream_lifetime = 0.0  # every refresh after the first frame is too late
    double.per_minute = 2
    client = await sdk()
    req_id = await double.push(wecom.text("hi"))
    await client.wait(lambda: client.frames)
    frame = client.frames[0]
    with pytest.raises(RuntimeError, match="40058"):  # over 20480 bytes
        await client.client.reply_stream(frame, "s1", "长" * 6827, finish=True)
    await client.client.reply_stream(frame, "s1", "first", finish=False)
    with pytest.raises(RuntimeError, match="846608"):
        await client.client.reply_stream(frame, "s1", "first and more", finish=True)
    await client.client.send_message(wecom.USER, {"msgtype": "markdown", "markdown": {"content": "push"}})
    with pytest.raises(RuntimeError, match="45009"):  # the stream and the push used the 2 a minute
        await client.client.send_message(wecom.USER, {"msgtype": "markdown", "markdown": {"content": "again"}})
    with pytest.raises(RuntimeError, match="40058"):  # nobody in that chat messaged the bot
        await client.client.send_message("wrOTHER", {"msgtype": "markdown", "markdown": {"content": "x"}})
    with pytest.raises(RuntimeError, match="846605"):
        await client.client.reply_stream({"headers": {"req_id": "made-up"}}, "s2", "x", finish=True)
    assert double.streams(req_id)[0].snapshots == ["first"]
    assert [s.body["markdown"]["content"] for s in double.sent] == ["push"]
    assert [code for _, _, code in double.refused] == [40058, 846608, 45009, 40058, 846605]


async def test_welcome_within_the_deadline_only(double: WeComDouble, sdk: Callable[..., Any]) -> None:
    client = await sdk()
    welcome = {"msgtype": "text", "text": {"content": "您好！"}}
    await double.push_event(wf.ENTER_CHAT)
    await client.wait(lambda: client.frames)
    await client.client.reply_welcome(client.frames[0], welcome)
    with pytest.raises(RuntimeError, match="846605"):  # a stream reply to an event
        await client.client.reply_stream(client.frames[0], "s", "x", finish=True)
    double.event_reply_deadline = 0.0
    await double.push_event(wf.ENTER_CHAT)
    await double.wait_for(lambda: len(client.frames) == 2)
    with pytest.raises(RuntimeError, match="846605"):
        await client.client.reply_welcome(client.frames[1], welcome)
    assert [(r.cmd, r.body) for r in double.replies] == [(wf.RESPOND_WELCOME, welcome)]


async def test_media_download_and_expiry(double: WeComDouble, sdk: Callable[..., Any]) -> None:
    client = await sdk()
    url, aeskey = double.host_media(b"%PDF-1.7 report", "报告.pdf")
    await double.push(wecom.file(url, aeskey))
    await client.wait(lambda: client.frames)
    body = client.frames[0]["body"]
    data, name = await client.client.download_file(body["file"]["url"], body["file"]["aeskey"])
    assert (data, name) == (b"%PDF-1.7 report", "报告.pdf")
    double.media_lifetime = 0.0
    expired, _ = double.host_media(b"late")
    with pytest.raises(Exception, match="403"):
        await client.client.download_file(expired, aeskey)


async def test_redelivery_keeps_the_msgid(double: WeComDouble, sdk: Callable[..., Any]) -> None:
    client = await sdk()
    first = await double.push(wecom.voice("语音转写", msgid="MSG-1"))
    again = await double.redeliver("MSG-1")
    await double.wait_for(lambda: len(client.frames) == 2)
    assert [f["body"]["msgid"] for f in client.frames] == ["MSG-1", "MSG-1"]
    assert [f["headers"]["req_id"] for f in client.frames] == [first, again] and first != again


async def test_unanswered_messages_are_redelivered_on_resubscribe(double: WeComDouble, sdk: Callable[..., Any]) -> None:
    double.redeliver_unanswered = True
    first = await sdk()
    await double.push(wecom.text("lost", msgid="MSG-LOST"))
    await first.wait(lambda: first.frames)
    second = await sdk()
    await second.wait(lambda: second.frames)
    assert second.frames[0]["body"]["msgid"] == "MSG-LOST"


# -- callback (URL) mode helpers, against a reference webhook on handlers/wecom/crypto.py -----------------
def reference_webhook() -> web.Application:
    crypto = CallbackCrypto.create(wecom.TOKEN, wecom.ENCODING_AES_KEY)
    polls: dict[str, int] = {}

    async def get(request: web.Request) -> web.Response:
        q = request.query
        try:
            return web.Response(text=crypto.verify_url(q["msg_signature"], q["timestamp"], q["nonce"], q["echostr"]))
        except CryptoError:
            return web.Response(status=401)

    async def post(request: web.Request) -> web.Response:
        q = request.query
        try:
            plain = wf.parse_message(orjson.loads(
                crypto.open(q["msg_signature"], q["timestamp"], q["nonce"], await request.read())))
        except CryptoError:
            return web.Response(status=401)
        n = polls[plain.stream_id] = polls.get(plain.stream_id, 0) + 1 if plain.stream_id else 0
        stream = {"id": plain.stream_id or "S1", "finish": n >= 2, "content": "答" * (n + 1)}
        sealed = crypto.seal(orjson.dumps({"msgtype": "stream", "stream": stream}), q["nonce"],
                             int(q["timestamp"]))
        return web.json_response(sealed, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/wecom/webhook", get)
    app.router.add_post("/wecom/webhook", post)
    return app


async def test_callback_mode_helpers(aiohttp_client: Callable[..., Any]) -> None:
    client: TestClient[Any, Any] = await aiohttp_client(reference_webhook())
    wecom_side = wecom.CallbackClient()
    query, echo = wecom_side.verification()
    async with client.get("/wecom/webhook", params=query) as response:
        assert (response.status, await response.text()) == (200, echo)
    forged = {**query, "timestamp": str(int(query["timestamp"]) + 1)}
    async with client.get("/wecom/webhook", params=forged) as response:
        assert response.status == 401
    streams = await wecom_side.converse(client, "/wecom/webhook", wecom.text("hi", group=wecom.GROUP))
    assert [s["content"] for s in streams] == ["答", "答答", "答答答"] and streams[-1]["finish"] is True
    with pytest.raises(AssertionError, match="nonce"):
        wecom_side.open_reply(orjson.dumps(wecom_side.crypto.seal("{}", "other", 1)), "mine")


async def test_response_url_takes_one_reply(double: WeComDouble, aiohttp_client: Callable[..., Any]) -> None:
    url = double.response_url()
    session = await aiohttp_client(web.Application())
    reply = {"msgtype": "markdown", "markdown": {"content": "later"}}
    for expected in (0, wf.INVALID_PARAMETER):
        async with session.session.post(url, json=reply) as response:
            assert (await response.json())["errcode"] == expected
    assert list(double.active_replies.values()) == [reply]


async def test_bounded(double: WeComDouble) -> None:
    with pytest.raises(TimeoutError):  # nobody connected: push waits, bounded
        async with asyncio.timeout(0.05):
            await double.push(wecom.text("x"))


async def test_upload_then_push_the_media(double: WeComDouble, aiohttp_client: Callable[..., Any]) -> None:
    """The upload commands (the Python SDK has none): our frame builders over a plain websocket."""
    session = (await aiohttp_client(web.Application())).session
    data = b"\x89PNG" + bytes(700_000)
    half = len(data) // 2
    async with session.ws_connect(double.ws_url) as ws:

        async def call(frame: wf.Frame) -> wf.Frame:
            await ws.send_str(frame.encode())
            answer = wf.decode(await ws.receive_str(timeout=5))
            assert answer.is_ack and answer.req_id == frame.req_id
            return answer

        assert (await call(wf.subscribe(wecom.BOT_ID, wecom.SECRET))).ok
        md5 = hashlib.md5(data).hexdigest()
        init = await call(wf.upload_init("image", "a.png", len(data), 2, md5))
        upload_id = (init.body or {})["upload_id"]
        for index, chunk in ((1, data[half:]), (0, data[:half])):  # chunks may arrive out of order
            assert (await call(wf.upload_chunk(upload_id, index, base64.b64encode(chunk).decode()))).ok
        finish = await call(wf.upload_finish(upload_id))
        media_id = (finish.body or {})["media_id"]
        assert double.media[media_id] == ("image", "a.png", data)
        push = wf.send_media(wecom.USER, "image", media_id)
        assert (await call(push)).errcode == wf.INVALID_PARAMETER  # nobody in that chat messaged the bot yet
        req_id = await double.push(wecom.text("图呢"))
        assert wf.decode(await ws.receive_str(timeout=5)).req_id == req_id
        assert (await call(wf.send_media(wecom.USER, "image", media_id))).ok
        assert (await call(wf.media_reply(req_id, "image", media_id))).ok
    assert [s.body["image"] for s in double.sent] == [{"media_id": media_id}]
    assert [r.body["image"] for r in double.replies] == [{"media_id": media_id}]
