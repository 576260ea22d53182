"""The Coze backend (gateway/backends/coze.py) against the Coze double: DingTalk and Feishu messages
answered by a `[[agents]]` Coze bot end to end (user_id, the conversation kept and reused, an
unknown conversation recovered, 4016, only answers shown, thinking stripped, a failed chat
apologised for and nothing kept, /reset), the envelope errors classified, doctor's probe, and
cancel for /stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import doctor
from gateway.answer import MODEL_DOWN
from gateway.backends import BackendRequest, Completion, DeltaKind, create_backend
from gateway.backends.coze import CozeBackend
from gateway.config import Config, build
from gateway.errors import ModelError
from gateway.i18n import translator
from gateway.keys import DISPATCHER, STORE
from gateway.metrics import Metrics
from gateway.steps import RESET_DONE
from tests.conftest import make_config
from tests.doubles import feishu as fd
from tests.doubles.coze import BOT_ID, TOKEN, CozeDouble
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu_events import APP_ID, message_event
from tests.helpers import notice_start, sample, serve

Client = TestClient[web.Request, web.Application]
DM = "dingtalk/helpdesk:cid-dm-staff7"  # the context key of staff7's DM with the helpdesk bot


def apology(reason: str) -> str:
    """The model-down notice naming `reason`, in Chinese (DingTalk's and Feishu's default)."""
    return notice_start(MODEL_DOWN, reason=reason)


class World:
    """A DingTalk robot and a Feishu app, both called "helpdesk", answered by the agent "coze"."""

    def __init__(self, aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]) -> None:
        self._server, self._gateway = aiohttp_server, gateway
        self.ding = DingTalkDouble()
        self.coze = CozeDouble()
        self.feishu, self.coze_url, self.feishu_url = fd.FeishuDouble(), "", ""
        self.client: Client | None = None

    async def serve(self) -> None:
        await serve(self._server, self.ding)
        self.coze_url = str((await self._server(self.coze.app(), host="127.0.0.1")).make_url("")).rstrip("/")
        self.feishu, self.feishu_url = await fd.start(self._server)

    def config(self, feishu: bool = False, **agent: Any) -> Config:
        ding = self.ding
        data: dict[str, Any] = {
            "store": {"url": "memory://"},
            "cache": {"enabled": False},
            "agents": [
                {"name": "coze", "provider": "coze", "base_url": self.coze_url, "bot_id": BOT_ID,
                 "api_keys": [TOKEN], **agent},
            ],
            "dingtalk": {"bots": [{
                "name": "helpdesk", "client_id": ding.client_id, "client_secret": ding.client_secret,
                "api_base": ding.base, "oapi_base": ding.base, "reconnect_delay": 0.05, "agent": "coze",
            }]},
        }
        if feishu:
            data["feishu"] = {"bots": [{
                "name": "helpdesk", "app_id": APP_ID, "app_secret": fd.APP_SECRET, "domain": self.feishu_url,
                "agent": "coze",
            }]}
        return build(data, env={}, source="<test>")

    async def start(self, feishu: bool = False, **agent: Any) -> Client:
        self.client = await self._gateway(self.config(feishu, **agent))
        await self.ding.wait_for(lambda: self.ding.connected)
        if feishu:
            await self.feishu.wait_for(lambda: self.feishu.pings >= 1)
        return self.client

    async def ask(self, text: str, staff_id: str = "staff7", **extra: Any) -> str:
        """A DingTalk message; the one reply it gets, once the gateway is idle."""
        before = len(self.ding.session_posts)
        await self.ding.push(self.ding.message(text, staff_id=staff_id, **extra))
        await self.ding.wait_for(lambda: len(self.ding.session_posts) > before)
        assert self.client is not None
        await self.client.app[DISPATCHER].wait_idle()
        assert len(self.ding.session_posts) == before + 1
        return str(self.ding.session_posts[-1]["markdown"]["text"])

    async def session(self, key: str = DM) -> str | None:
        assert self.client is not None
        return await self.client.app[STORE].backend_session(key)

    def conversation_of(self, n: int) -> str:
        """The conversation the `n`-th accepted chat ran in."""
        return list(self.coze.chats.values())[n].conversation_id


@pytest.fixture
async def world(aiohttp_server: Callable[..., Any], gateway: Callable[..., Any]) -> AsyncIterator[World]:
    w = World(aiohttp_server, gateway)
    await w.serve()
    yield w
    w.coze.release()


# -- end to end -----------------------------------------------------------------------------------
async def test_a_dingtalk_message_is_answered_and_the_conversation_reused(world: World) -> None:
    world.coze.recall = True  # the double's answer shows the conversation's previous question
    await world.start()
    assert await world.ask("我的工号是 1024") == "echo: 我的工号是 1024"
    assert await world.ask("我的工号是多少?") == "echo: 我的工号是多少? [after: 我的工号是 1024]"
    first, second = world.coze.requests
    assert first.path == "/v3/chat" and first.query == {} and first.authorization == f"Bearer {TOKEN}"
    assert first.body == {
        "bot_id": BOT_ID,
        "user_id": "dingtalk:staff7",
        "stream": True,
        "auto_save_history": True,
        "additional_messages": [
            {"role": "user", "type": "question", "content": "我的工号是 1024", "content_type": "text"}
        ],
        "custom_variables": {"sender_name": "Alice", "platform": "dingtalk"},
    }
    conversation = world.conversation_of(0)
    assert second.query == {"conversation_id": conversation}  # only the new question: Coze keeps the rest
    assert second.body["additional_messages"][0]["content"] == "我的工号是多少?"
    assert await world.session() == conversation
    assert world.coze.cancels == []
    assert world.client is not None
    assert sample(world.client.app, "botgate_agent_answers_total", agent="coze") == 2


async def test_a_group_member_is_named_in_the_question(world: World) -> None:
    await world.start()
    answer = await world.ask("VPN?", staff_id="staff8", nick="Bob", group=True, conversation_id="cidTEAM")
    assert answer.endswith("echo: Bob: VPN?")
    (request,) = world.coze.requests
    assert request.body["user_id"] == "dingtalk:staff8"
    assert request.body["additional_messages"][0]["content"] == "Bob: VPN?"


async def test_a_feishu_message_is_answered_by_the_same_agent(world: World) -> None:
    world.coze.recall = True
    client = await world.start(feishu=True)
    feishu = world.feishu
    for n, text in enumerate(("打印机坏了", "还是不行"), 1):
        await feishu.push_event(message_event(text, message_id=f"om_{n}"))
        await feishu.wait_for(lambda m=f"om_{n}": feishu.answer(m) is not None)  # type: ignore[misc]
        await client.app[DISPATCHER].wait_idle()
    assert feishu.answer("om_1") == "echo: 打印机坏了"
    assert feishu.answer("om_2") == "echo: 还是不行 [after: 打印机坏了]"
    first, second = world.coze.requests
    assert first.body["user_id"] == "feishu:ou_user" and first.query == {}
    assert first.body["custom_variables"] == {"platform": "feishu"}  # Feishu's event names no sender
    assert second.query == {"conversation_id": world.conversation_of(0)}
    assert await world.session("feishu/helpdesk:oc_chat") == world.conversation_of(0)
    # Coze fails after the answer began streaming into the card: the card ends as one apology.
    await feishu.push_event(message_event("script:error 再试", message_id="om_3"))
    await feishu.wait_for(lambda: feishu.answer("om_3") is not None)
    await client.app[DISPATCHER].wait_idle()
    failed = feishu.answer("om_3") or ""
    assert failed.startswith(apology("server error")) and "echo" not in failed, failed
    assert len(feishu.replies_to("om_3")) == 1


async def test_a_conversation_coze_no_longer_knows_is_started_afresh(world: World) -> None:
    await world.start()
    await world.ask("one")
    gone = world.conversation_of(0)
    del world.coze.conversations[gone]  # expired or deleted on Coze's side
    assert await world.ask("two") == "echo: two"
    assert [r.query for r in world.coze.requests] == [{}, {"conversation_id": gone}, {}]
    fresh = world.conversation_of(1)
    assert fresh != gone and await world.session() == fresh


async def test_a_chat_still_running_4016_is_retried(world: World) -> None:
    world.coze.script = [4016]  # the conversation's previous chat had not ended yet
    await world.start()
    assert await world.ask("hello") == "echo: hello"
    assert len(world.coze.requests) == 2
    assert world.client is not None
    assert sample(world.client.app, "botgate_model_retries_total", reason="conversation_busy") == 1


async def test_a_chat_abandoned_mid_answer_is_cancelled_and_frees_its_conversation(world: World) -> None:
    await world.start(first_token_timeout=1.0)  # how long a silent Coze is waited for
    await world.ask("one")
    conversation = world.conversation_of(0)
    # Coze stops sending (the double holds the chat): botgate gives up and apologises ...
    assert (await world.ask("script:stall two")).startswith(apology("read timeout"))
    # ... and cancels that chat, so the conversation takes the next question (not 4016 until it ends).
    assert await world.ask("three") == "echo: three"
    assert world.coze.requests[-1].query == {"conversation_id": conversation}
    stalled = list(world.coze.chats.values())[1]
    assert [c.body for c in world.coze.cancels] == [{"conversation_id": conversation, "chat_id": stalled.id}]


async def test_only_answers_are_shown(world: World) -> None:
    coze = world.coze
    coze.tool_calls, coze.extra_answers, coze.follow_ups = True, ["第二个回答"], ["明天呢？", "还有吗？"]
    await world.start()
    # No function call, tool output, verbose finish signal nor suggested question; two answers.
    assert await world.ask("天气") == "echo: 天气\n第二个回答"


async def test_reasoning_is_stripped(world: World) -> None:
    world.coze.reasoning = "用户在问 天气"  # reasoning_content deltas
    world.coze.deltas = ["<think>inline ", "thought</think>", "晴天"]
    await world.start()
    assert await world.ask("天气") == "晴天"


@pytest.mark.parametrize(
    ("step", "reason"), [("failed", "server error"), ("error", "server error"), ("requires-action", "bad request")]
)
async def test_a_failed_chat_gets_one_apology_and_nothing_is_kept(world: World, step: str, reason: str) -> None:
    await world.start()
    reply = await world.ask(f"script:{step} hi")  # "error": after the answer began
    assert reply.startswith(apology(reason)) and "echo" not in reply, reply
    assert await world.session() is None  # the conversation that chat created is not kept
    assert await world.ask("again") == "echo: again"
    assert world.coze.requests[-1].query == {}
    assert len(world.ding.session_posts) == 2


async def test_reset_forgets_the_conversation(world: World) -> None:
    await world.start()
    await world.ask("one")
    assert await world.ask("/reset") == translator("zh-CN")(RESET_DONE)
    assert await world.session() is None
    assert await world.ask("two") == "echo: two"
    assert [r.query for r in world.coze.requests] == [{}, {}]
    assert await world.session() == world.conversation_of(1) != world.conversation_of(0)


# -- the backend on its own -----------------------------------------------------------------------
@pytest.fixture
async def coze(aiohttp_server: Callable[..., Any]) -> AsyncIterator[tuple[CozeDouble, str]]:
    double = CozeDouble()
    server = await aiohttp_server(double.app(), host="127.0.0.1")
    yield double, str(server.make_url("")).rstrip("/")
    double.release()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def backend(url: str, http: aiohttp.ClientSession, **model: Any) -> CozeBackend:
    cfg = make_config(model={"provider": "coze", "base_url": url, "bot_id": BOT_ID, "api_keys": [TOKEN], **model})
    made = create_backend(cfg.model, http, Metrics())
    assert isinstance(made, CozeBackend) and made.keeps_history
    return made


def ask(text: str = "hi", session: str | None = None) -> BackendRequest:
    return BackendRequest([], text, "web:s1", "Ann", "web", "c1", "web:c1", session)


async def answer(model: CozeBackend, request: BackendRequest, completion: Completion | None = None) -> list[Any]:
    completion = completion or Completion()
    async with aclosing(model.stream(request, completion)) as deltas:
        return [(d.kind, d.text) async for d in deltas]


async def failure(model: CozeBackend, request: BackendRequest | None = None) -> ModelError:
    with pytest.raises(ModelError) as err:
        await answer(model, request or ask())
    return err.value


async def test_the_stream_read_the_coze_way(coze: Any, http: Any) -> None:
    double, url = coze
    double.reasoning, double.extra_answers, double.fragment = "想想", ["二"], True
    model, completion = backend(url, http), Completion()
    deltas = await answer(model, ask("你好"), completion)
    thinking = "".join(t for k, t in deltas if k is DeltaKind.REASONING)
    text = "".join(t for k, t in deltas if k is DeltaKind.ANSWER)
    assert (thinking, text) == ("想想", "echo: 你好\n二")
    (chat,) = double.chats.values()
    assert (completion.session, completion.task_id) == (chat.conversation_id, chat.id)
    usage = chat.usage
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        usage["input_count"], usage["output_count"])
    assert model.name == f"coze bot {BOT_ID}"


async def raw_server(aiohttp_server: Callable[..., Any], events: list[tuple[str, Any]]) -> str:
    """A server answering /v3/chat with exactly these events (Coze's framing), then EOF."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for name, data in events:
            await resp.write(f"event:{name}\ndata:".encode() + orjson.dumps(data) + b"\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v3/chat", chat)
    return str((await aiohttp_server(app)).make_url("")).rstrip("/")


CREATED = ("conversation.chat.created", {"id": "7400000000000000002", "conversation_id": "7400000000000000001"})


def completed_answer(msg_id: str, text: str) -> tuple[str, Any]:
    return "conversation.message.completed", {"id": msg_id, "type": "answer", "content": text, "content_type": "text"}


async def test_an_answer_that_came_whole_is_shown_and_ends_are_told_apart(aiohttp_server: Any, http: Any) -> None:
    # An answer message without deltas (and Coze Studio's data-less end event) ...
    url = await raw_server(aiohttp_server, [CREATED, completed_answer("m1", "整段回答"),
                                            ("conversation.stream.done", "")])
    assert await answer(backend(url, http), ask()) == [(DeltaKind.ANSWER, "整段回答")]
    # ... but a stream that stops before the chat ends is no answer, even with text in it.
    url = await raw_server(aiohttp_server, [CREATED, completed_answer("m1", "半")])
    assert (await failure(backend(url, http, max_retries=0))).reason == "connection"


@pytest.mark.parametrize(
    ("token", "script", "auth_status", "reason", "said"),
    [
        ("unknown", "", 401, "auth", "4101 'The token you entered is incorrect"),
        ("unknown", "", 200, "auth", "4101 'The token you entered is incorrect"),  # the envelope at 200 too
        ("other site", "", 401, "auth", "4100 'authentication is invalid'"),
        ("ok", "rate-limit", 200, "rate_limited", "4013"),
        ("ok", 4015, 200, "bad_request", "publish it with the API channel"),
        ("ok", 4000, 200, "bad_request", "code 4000"),
        ("ok", 5000, 200, "server_error", "Coze server error (code 5000"),
        ("ok", 502, 200, "server_error", "502"),  # an edge proxy's bare status
        ("ok", 429, 200, "rate_limited", "429"),
    ],
)
async def test_refusals_are_classified(
    coze: Any, http: Any, token: str, script: int | str, auth_status: int, reason: str, said: str
) -> None:
    double, url = coze
    double.auth_status, double.retry_after = auth_status, "7"
    double.script = [script] if script else []
    if token != "ok":
        double.tokens = set()
        double.other_region_tokens = {TOKEN} if token == "other site" else set()
    err = await failure(backend(url, http, max_retries=0))
    assert err.reason == reason and said in str(err), str(err)
    if token == "other site":
        assert "a token of the other site?" in str(err)
    if isinstance(script, str) or script >= 1000:
        assert "logid 2" in str(err)  # the envelope's (Coze support asks for it)
    if script == "rate-limit":
        assert err.retry_after == 7.0


async def test_a_server_error_before_the_answer_is_retried(coze: Any, http: Any) -> None:
    double, url = coze
    double.script = [5000]
    assert await answer(backend(url, http), ask()) == [(DeltaKind.ANSWER, t) for t in ("echo:", " hi")]
    assert len(double.requests) == 2


async def test_stop_cancels_the_running_chat(coze: Any, http: Any) -> None:
    double, url = coze
    model, completion = backend(url, http), Completion()
    async with aclosing(model.stream(ask("script:stall"), completion)) as deltas:
        assert (await anext(deltas)).text == "echo:"  # the first piece; then Coze holds the chat
        await model.stop(completion)
        (cancel,) = double.cancels
        (chat,) = double.chats.values()
        assert cancel.path == "/v3/chat/cancel" and cancel.authorization == f"Bearer {TOKEN}"
        assert cancel.body == {"conversation_id": chat.conversation_id, "chat_id": chat.id}
        assert chat.status == "canceled"
    # Stopping a finished chat (Coze's 4104) or one never started is quietly nothing.
    done = Completion()
    await answer(model, ask(), done)
    await model.stop(done)
    await model.stop(Completion())
    async with asyncio.timeout(10):
        await double.wait_cancels(3)  # the stalled stream's own cancel on closing, and the 4104
    assert all(c.body.get("chat_id") for c in double.cancels)


# -- doctor ---------------------------------------------------------------------------------------
async def diagnose(config: Config) -> dict[str, str]:
    lines: list[str] = []
    await doctor.run(config, [], lines.append)
    return {line[6:].split(": ", 1)[0]: line for line in lines[1:-1]}


def coze_agent(url: str, **extra: Any) -> Config:
    agent = {"name": "coze", "provider": "coze", "base_url": url, "bot_id": BOT_ID, "api_keys": [TOKEN], **extra}
    return build({"store": {"url": "memory://"}, "agents": [agent]}, env={}, source="<test>")


async def test_doctor_creates_a_conversation_and_names_a_refused_key(coze: Any) -> None:
    double, url = coze
    line = (await diagnose(coze_agent(url)))["agent coze model"]
    assert line.startswith("PASS") and "accepted the token" in line, line
    assert [c.path for c in double.calls] == ["/v1/conversation/create"]  # no chat, no tokens
    assert double.calls[0].body == {"bot_id": BOT_ID}
    line = (await diagnose(coze_agent(url, api_keys=[TOKEN, "pat_revoked"])))["agent coze model"]
    assert line.startswith("FAIL") and "(key 2 of 2)" in line and "4101" in line, line
    assert "BOTGATE_AGENTS__COZE__API_KEYS" in line and "pat_revoked" not in line
    line = (await diagnose(coze_agent(url, bot_id="7000000000000000000")))["agent coze model"]
    assert line.startswith("FAIL") and "check [[agents]] coze bot_id" in line, line  # the double's 5000
    assert double.requests == []
