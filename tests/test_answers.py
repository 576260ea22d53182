"""What the user gets for an accepted message, end to end over web chat with the OpenAI double:
empty answers, model failures, the cache, and the overhead metric's meaning."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.backends import EchoBackend, create_backend
from gateway.errors import StoreError
from gateway.keys import DISPATCHER, METRICS
from gateway.messages import ConversationKind, InboundMessage, Reply
from gateway.metrics import Metrics
from gateway.responder import Responder
from gateway.store import MemoryStore
from tests.conftest import make_config
from tests.doubles.openai import OpenAIDouble


async def send(ws: Any, text: str, msg_id: str) -> dict[str, Any]:
    """Send one message and return its final frame (`done` or `notice`)."""
    await ws.send_json({"type": "message", "id": msg_id, "text": text})
    async with asyncio.timeout(10):
        while True:
            frame: dict[str, Any] = await ws.receive_json()
            if frame["type"] in ("done", "notice", "error"):
                return frame


def sample(
    client: TestClient[web.Request, web.Application], name: str, labels: dict[str, str] | None = None
) -> float:
    value = client.app[METRICS].registry.get_sample_value(name, labels or {})
    return value or 0.0


async def test_empty_model_answer_is_told_not_cached_not_remembered(
    gateway: Any, openai_double: Any
) -> None:
    double, url = openai_double
    double.answer = ""
    client = await gateway(make_config(model={"base_url": url}, chat={"locale": "en"}))  # notices in English
    async with client.ws_connect("/chat/ws?session=emptyanswer") as ws:
        await ws.receive_json()
        frame = await send(ws, "say nothing", "m1")
        assert "empty answer" in frame["text"] and "(ref " in frame["text"]
        double.answer = None
        frame = await send(ws, "say nothing", "m2")  # same question: asked again, not cached
        assert frame["text"] == "echo: say nothing"
    assert len(double.requests) == 2
    # The empty exchange was not kept as context.
    assert [m["content"] for m in double.requests[1]["messages"][1:]] == ["say nothing"]
    assert sample(client, "botgate_model_errors_total", {"reason": "empty"}) == 1


async def test_model_failure_gets_a_notice_with_the_reason(gateway: Any, openai_double: Any) -> None:
    double, url = openai_double
    double.script = [500] * 5
    client = await gateway(make_config(model={"base_url": url, "max_retries": 1}, chat={"locale": "en"}))
    async with client.ws_connect("/chat/ws?session=modelfails") as ws:
        await ws.receive_json()
        frame = await send(ws, "hello?", "m1")
    assert "not answering right now (server error)" in frame["text"]
    assert "(ref " in frame["text"]
    assert sample(client, "botgate_model_errors_total", {"reason": "server_error"}) == 1
    assert sample(client, "botgate_gateway_overhead_seconds_count") == 0  # nothing was answered


async def test_identical_request_in_the_same_conversation_is_answered_from_the_cache(
    gateway: Any, openai_double: Any
) -> None:
    double, url = openai_double
    client = await gateway(make_config(model={"base_url": url}))
    async with client.ws_connect("/chat/ws") as ws:
        await ws.receive_json()
        assert (await send(ws, "what is 2+2", "m1"))["text"] == "echo: what is 2+2"
        await send(ws, "/reset", "m2")  # the same context again: empty
        double.answer = "a different answer"
        assert (await send(ws, "what is 2+2", "m3"))["text"] == "echo: what is 2+2"
    assert len(double.requests) == 1
    assert sample(client, "botgate_cache_requests_total", {"result": "hit"}) == 1


async def test_another_conversation_never_gets_a_cached_answer(gateway: Any, openai_double: Any) -> None:
    """User B asking what user A asked, in a conversation of their own (same context: none) or in
    one with another context, gets the model's answer for B, never A's cached one: a hit would tell
    B what A had asked."""
    double, url = openai_double
    client = await gateway(make_config(model={"base_url": url}))
    answers = []
    for user, earlier in (("A", ""), ("B", ""), ("C", "hello first")):
        double.answer = f"answer for {user}"
        async with client.ws_connect("/chat/ws") as ws:
            await ws.receive_json()
            if earlier:
                await send(ws, earlier, "m0")
            answers.append((await send(ws, "what did the board decide?", "m1"))["text"])
    assert answers == ["answer for A", "answer for B", "answer for C"]
    assert sample(client, "botgate_cache_requests_total", {"result": "hit"}) == 0


async def test_overhead_excludes_model_time_and_waiting_behind_the_conversation(
    gateway: Any, openai_double: Any
) -> None:
    """Two messages in one conversation behind a slow model: neither the model's time nor the
    second message's wait for the first answer is gateway overhead."""
    double, url = openai_double
    double.hold = True
    client = await gateway(make_config(model={"base_url": url}, cache={"enabled": False}))
    model_time = 0.5
    async with client.ws_connect("/chat/ws") as ws:
        conversation = (await ws.receive_json())["session"].partition(".")[0]
        for msg_id in ("m1", "m2"):
            await ws.send_json({"type": "message", "id": msg_id, "text": f"question {msg_id}"})
        async with asyncio.timeout(10):
            await double.received.wait()
        await asyncio.sleep(model_time)  # the model takes its time (the behaviour under test)
        double.release()
        done: list[str] = []
        async with asyncio.timeout(10):
            while len(done) < 2:
                frame = await ws.receive_json()
                if frame["type"] == "done":
                    done.append(frame["reply_to"])
    assert done == [f"{conversation}:m1", f"{conversation}:m2"]
    await client.server.app[DISPATCHER].wait_idle()
    assert sample(client, "botgate_gateway_overhead_seconds_count") == 2
    assert sample(client, "botgate_model_request_duration_seconds_sum") >= model_time
    # Gateway work here is milliseconds; either wrong definition would add >= model_time.
    assert sample(client, "botgate_gateway_overhead_seconds_sum") < model_time / 2


async def test_deadline_mid_stream_finishes_the_stream_with_the_notice(
    gateway: Any, openai_double: Any
) -> None:
    """One answer, never two: the half-streamed reply is closed with the timeout notice instead
    of staying stuck next to a separate notice."""
    double, url = openai_double
    double.script = ["stall"]  # one word, then nothing
    client = await gateway(make_config(model={"base_url": url}, dispatcher={"deadline": 0.3}, chat={"locale": "en"}))
    async with client.ws_connect("/chat/ws?session=deadline01") as ws:
        await ws.receive_json()
        await ws.send_json({"type": "message", "id": "m1", "text": "tell me a long story"})
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while not frames or frames[-1]["type"] not in ("done", "notice"):
                frames.append(await ws.receive_json())
        await client.server.app[DISPATCHER].wait_idle()
    assert [f["type"] for f in frames] == ["accepted", "delta", "done"]
    assert frames[1]["text"] == "echo:"
    assert frames[2]["text"].startswith("Sorry, that took too long to answer.")


class ForgetfulStore(MemoryStore):
    async def append_turns(self, *args: Any, **kwargs: Any) -> None:
        raise StoreError("disk full")


class RecordingChannel:
    """A Channel without streaming that keeps what it was asked to send."""

    platform = "web"

    def __init__(self) -> None:
        self.sent: list[Reply] = []

    async def send(self, reply: Reply) -> None:
        self.sent.append(reply)

    async def open_stream(self, message: InboundMessage) -> None:
        return None


async def test_store_failure_after_delivery_is_not_an_apology(caplog: Any) -> None:
    channel = RecordingChannel()
    config = make_config()
    responder = Responder(config, ForgetfulStore(), EchoBackend(), {"web/default": channel}, Metrics())  # type: ignore[dict-item]
    message = InboundMessage(
        platform="web",
        transport="websocket",
        conversation_id="c1",
        conversation_kind=ConversationKind.DM,
        sender_id="u1",
        sender_name="web",
        text="remember me",
        mentioned=True,
        message_id="m1",
    )
    await responder.handle(message, time.time())  # does not raise: the dispatcher would apologise
    assert [r.text.splitlines()[0] for r in channel.sent] == ["> remember me"]
    assert any(r.message.startswith("answer delivered but not remembered") for r in caplog.records)


async def test_cache_is_per_endpoint(aiohttp_server: Any) -> None:
    """After switching providers (same model name, same shared store), the old provider's answers
    are not served from the cache."""
    store = MemoryStore()
    doubles = [OpenAIDouble(answer="from A"), OpenAIDouble(answer="from B")]
    async with aiohttp.ClientSession() as session:
        answers: list[str] = []
        for double in doubles:
            url = str((await aiohttp_server(double.app())).make_url("/v1"))
            config = make_config(model={"base_url": url})
            metrics = Metrics()
            channel = RecordingChannel()
            model = create_backend(config.model, session, metrics)
            responder = Responder(config, store, model, {"web/default": channel}, metrics)  # type: ignore[dict-item]
            message = InboundMessage(
                platform="web",
                transport="websocket",
                conversation_id=f"c-{len(answers)}",
                conversation_kind=ConversationKind.DM,
                sender_id="u1",
                sender_name="web",
                text="same question",
                mentioned=True,
                message_id=f"m{len(answers)}",
            )
            await responder.handle(message, time.time())
            answers.append(channel.sent[-1].text)
    assert answers == ["from A", "from B"]
    assert [len(d.requests) for d in doubles] == [1, 1]
