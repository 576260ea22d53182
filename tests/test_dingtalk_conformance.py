"""Conformance: the dingtalk-stream SDK's own client against our DingTalk double.

If the SDK connects, receives a robot message, ACKs it, replies on the sessionWebhook and drives the
token, file and AI-card APIs against the double, the double speaks the real protocol, and so the
adapter tests that run against it mean something. The SDK blocks its event loop with `requests`
(docs/protocols/testing.md §0.1), so the double runs in one thread and the SDK in another, each with its own loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import dingtalk_stream
import pytest
from aiohttp import web

from tests.doubles.dingtalk import DingTalkDouble

BOUND = 20.0  # seconds any step may take before the test fails instead of hanging


class ThreadedServer:
    """The double on 127.0.0.1 in its own thread and loop."""

    def __init__(self, double: DingTalkDouble) -> None:
        self.double = double
        self.loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(double.app())
        self._thread = threading.Thread(target=self.loop.run_forever, name="dingtalk-double", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.call(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.call(site.start())
        port = self._runner.addresses[0][1]
        self.double.base = f"http://127.0.0.1:{port}"

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(BOUND)

    def wait_for(self, predicate: Callable[[], object]) -> None:
        self.call(self.double.wait_for(predicate, timeout=BOUND))

    def stop(self) -> None:
        self.call(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(BOUND)
        self.loop.close()


class SdkClient:
    """`DingTalkStreamClient.start()` in its own thread. It swallows a cancel that arrives while a
    socket is open or closing (§0.2), so it is cancelled until it really ends."""

    def __init__(self, client: dingtalk_stream.DingTalkStreamClient) -> None:
        self._client = client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="sdk", daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        task = asyncio.create_task(self._client.start())
        await self._stop.wait()
        async with asyncio.timeout(BOUND):
            while not task.done():
                task.cancel()  # the last one lands in the 10 s sleep after the swallowed ones
                await asyncio.wait({task}, timeout=0.05)
        await asyncio.gather(task, return_exceptions=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(BOUND)

    def stop(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(BOUND)
        assert not self._thread.is_alive(), "the SDK client did not stop"


class EchoHandler(dingtalk_stream.ChatbotHandler):  # type: ignore[misc]  # the SDK is untyped
    """What an SDK user writes: answer on the sessionWebhook, plus the file and AI-card APIs."""

    def __init__(self) -> None:
        super().__init__()
        self.download_urls: list[str | None] = []

    async def process(self, callback: dingtalk_stream.CallbackMessage) -> tuple[int, str]:
        incoming = dingtalk_stream.ChatbotMessage.from_dict(callback.data)
        self.reply_text("pong: " + incoming.text.content.strip(), incoming)
        self.download_urls.append(self.get_image_download_url("dc-1"))
        card = dingtalk_stream.AICardReplier(self.dingtalk_client, incoming)
        track_id = card.create_and_deliver_card("tpl.schema", {"flowStatus": "2", "msgContent": ""})
        card.streaming(track_id, "msgContent", "pong", append=False, finished=True, failed=False)
        card.put_card_data(track_id, {"flowStatus": "3", "msgContent": "pong"})
        return dingtalk_stream.AckMessage.STATUS_OK, "OK"


@pytest.fixture
def double_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedServer]:
    server = ThreadedServer(DingTalkDouble())
    server.double.add_file("dc-1", b"png bytes")
    server.start()
    base = server.double.base
    # The SDK fixes its endpoint at import time: patch every copy (docs/protocols/dingtalk.md §A.2).
    for module in ("utils", "stream", "chatbot", "card_replier"):
        monkeypatch.setattr(f"dingtalk_stream.{module}.DINGTALK_OPENAPI_ENDPOINT", base)
    monkeypatch.setattr(
        dingtalk_stream.DingTalkStreamClient, "OPEN_CONNECTION_API", base + "/v1.0/gateway/connections/open"
    )
    # It would otherwise route a UDP socket towards 8.8.8.8 to learn its address.
    monkeypatch.setattr(dingtalk_stream.DingTalkStreamClient, "get_host_ip", lambda self: "127.0.0.1")
    try:
        yield server
    finally:
        server.stop()


def test_sdk_client_gets_a_message_acks_it_and_replies(double_server: ThreadedServer) -> None:
    double = double_server.double
    client = dingtalk_stream.DingTalkStreamClient(
        dingtalk_stream.Credential(double.client_id, double.client_secret)
    )
    handler = EchoHandler()
    client.register_callback_handler(dingtalk_stream.ChatbotMessage.TOPIC, handler)
    sdk = SdkClient(client)
    sdk.start()
    try:
        double_server.wait_for(lambda: double.connected)
        frame_id = double_server.call(double.push(double.message("ping from the double")))
        ping_id = double_server.call(double.system("ping", {"opaque": "abc-123"}))
        double_server.wait_for(lambda: double.acked(frame_id) and double.acked(ping_id))
    finally:
        sdk.stop()

    assert double.opens[0]["subscriptions"] == [
        {"type": "CALLBACK", "topic": dingtalk_stream.ChatbotMessage.TOPIC}
    ]
    ack = double.acked(frame_id)
    assert ack is not None and (ack.code, ack.data) == (200, {"response": "OK"})
    ping = double.acked(ping_id)
    assert ping is not None and (ping.code, ping.data) == (200, {"opaque": "abc-123"})
    assert double.ack_errors == []
    [reply] = double.session_posts
    assert reply["text"] == {"content": "pong: ping from the double"} and reply["at"] == {
        "atUserIds": ["staff1"]
    }
    assert handler.download_urls == [f"{double.base}/files/dc-1"]
    paths = [path for _, path, _ in double.api_calls]
    assert paths == [
        "/v1.0/robot/messageFiles/download",
        "/v1.0/card/instances/createAndDeliver",
        "/v1.0/card/streaming",
        "/v1.0/card/instances",
    ]
    assert double.tokens_issued == ["AT-1"]
