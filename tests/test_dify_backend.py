"""The Dify backend (gateway/backends/dify.py) against the Dify double (tests/doubles/dify.py): DingTalk and
Feishu messages answered by a Dify agent end to end (identity, conversations kept, lost and reset, sources,
images, replacements, agent thoughts, chatflow and workflow apps, thinking, failures), then the backend alone
(doctor's probe, stop, the HTTP errors, a stream that ends too soon)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import handlers
from gateway import doctor
from gateway.answer import MODEL_DOWN
from gateway.backends import BackendRequest, Completion, Delta, DeltaKind, Source, create_backend
from gateway.backends.dify import DifyBackend
from gateway.config import Config, build
from gateway.draft import IMAGE, MAX_SOURCES, SOURCES, Draft
from gateway.errors import ModelError
from gateway.i18n import translator
from gateway.keys import DISPATCHER
from gateway.metrics import Metrics
from gateway.steps import RESET_DONE
from tests.doubles import feishu as fd
from tests.doubles.dify import LEGACY_THINK_OPEN, DifyDouble
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu_events import APP_ID, message_event
from tests.helpers import dingtalk_section, notice_start, serve

KEY = "app-double"
Client = TestClient[web.Request, web.Application]
StartDify = Callable[..., Awaitable[tuple[DifyDouble, str]]]
# The inputs a Dify app declares to see who is asking (docs/backends.md, "Dify").
FORM = [
    {"text-input": {"label": "Sender", "variable": "sender_name", "required": False, "max_length": 48}},
    {"text-input": {"label": "Platform", "variable": "platform", "required": False, "max_length": 48}},
    {"text-input": {"label": "Chat", "variable": "conversation_id", "required": False, "max_length": 6}},
    {"select": {"label": "Department", "variable": "department", "required": True, "options": ["HR", "IT"]}},
]
APOLOGY = notice_start(MODEL_DOWN, reason="\0")  # the model-down notice up to its reason, in Chinese


@pytest.fixture
async def dify(aiohttp_server: Callable[..., Any]) -> AsyncIterator[StartDify]:
    """Start a Dify double (DifyDouble fields as keywords); returns it and its base URL `.../v1`."""
    started: list[DifyDouble] = []

    async def start(**fields: Any) -> tuple[DifyDouble, str]:
        double = DifyDouble(**fields)
        server = await aiohttp_server(double.app(), host="127.0.0.1")
        started.append(double)
        return double, str(server.make_url("/v1"))

    yield start
    for double in started:
        double.release()


def agent(base: str, **extra: Any) -> dict[str, Any]:
    return {"name": "kb", "provider": "dify", "base_url": base, "api_keys": [KEY], **extra}


def config(agent_entry: dict[str, Any], **sections: Any) -> Config:
    data: dict[str, Any] = {"store": {"url": "memory://"}, "cache": {"enabled": False}, **sections}
    data["agents"] = [agent_entry]
    return build(data, env={}, source="<test>")


class DingTalk:
    """A gateway whose DingTalk robot (bot "kb") is answered by the Dify agent "kb"."""

    def __init__(self, double: DingTalkDouble, client: Client) -> None:
        self.double, self.client = double, client

    @classmethod
    async def start(
        cls,
        aiohttp_server: Any,
        gateway: Any,
        entry: dict[str, Any],
        double: DingTalkDouble | None = None,
        **sections: Any,
    ) -> DingTalk:
        if double is None:
            double = DingTalkDouble()
            await serve(aiohttp_server, double)
        before = double.connections
        bot = {**dingtalk_section(double), "name": "kb", "agent": "kb"}
        client: Client = await gateway(config(entry, dingtalk={"bots": [bot]}, **sections))
        await double.wait_for(lambda: double.connections > before and double.connected)
        return cls(double, client)

    async def ask(self, text: str, **fields: Any) -> str:
        """One message (DingTalkDouble.message's keywords); its answer, once the gateway is idle."""
        count = len(self.double.session_posts)
        await self.double.push(self.double.message(text, **fields))
        await self.double.wait_for(lambda: len(self.double.session_posts) > count)
        async with asyncio.timeout(10):
            await self.client.app[DISPATCHER].wait_idle()
        (post,) = self.double.session_posts[count:]
        if "markdown" in post:
            return str(post["markdown"]["text"])
        return str(post["text"]["content"])


@pytest.fixture
def dingtalk(aiohttp_server: Any, gateway: Any) -> Callable[..., Awaitable[DingTalk]]:
    async def start(entry: dict[str, Any], **sections: Any) -> DingTalk:
        return await DingTalk.start(aiohttp_server, gateway, entry, **sections)

    return start


def conversation_ids(double: DifyDouble) -> list[str]:
    return [str(r.get("conversation_id")) for r in double.requests]


# -- end to end ------------------------------------------------------------------------------------------
async def test_a_dingtalk_message_is_answered_by_a_dify_agent(dify: StartDify, dingtalk: Any) -> None:
    double, base = await dify(user_input_form=FORM)
    ding = await dingtalk(agent(base, inputs={"department": "HR"}))
    assert await ding.ask("请假怎么申请", staff_id="u1", nick="Alice") == "echo: 请假怎么申请"
    first = double.requests[0]
    assert first["user"] == "dingtalk:u1" and first["query"] == "请假怎么申请"
    assert (first["response_mode"], first["conversation_id"], first["files"]) == ("streaming", "", [])
    # The identity, cut to the form's max_length (Dify refuses longer values), and the configured table.
    assert first["inputs"] == {
        "sender_id": "dingtalk:u1",
        "sender_name": "Alice",
        "platform": "dingtalk",
        "conversation_id": "cid-dm",
        "department": "HR",
    }
    assert double.turns[0].inputs == {k: v for k, v in first["inputs"].items() if k != "sender_id"}  # declared
    assert await ding.ask("年假几天", staff_id="u1", nick="Alice") == "echo: 年假几天"
    second = double.turns[1]
    assert second.conversation_id == double.turns[0].conversation_id and not second.new_conversation
    assert [m.query for m in second.history] == ["请假怎么申请"]  # Dify keeps the history: only the new text
    # The app is looked at once, before the first message; no other call but the messages.
    assert double.calls.count(("GET", "/v1/info")) == 1 and double.calls.count(("GET", "/v1/parameters")) == 1
    # A group: the query names the speaker, and the group is a conversation of its own.
    answer = await ding.ask("hi all", group=True, conversation_id="cidTEAM", staff_id="u2", nick="Bob")
    assert answer == "@u2 echo: Bob: hi all"  # the reply mentions the asker
    third = double.requests[2]
    assert (third["user"], third["inputs"]["sender_id"]) == ("dingtalk:group:cidTEAM", "dingtalk:u2")
    assert (third["conversation_id"], third["inputs"]["conversation_id"]) == ("", "cidTEA")


async def test_a_groups_members_share_one_dify_conversation(dify: StartDify, dingtalk: Any) -> None:
    """A Dify conversation belongs to the user who started it (another user's id is a 404): the members
    of a group sharing its context talk to Dify as the group, each named in the query and `sender_id`."""
    double, base = await dify()
    ding = await dingtalk(agent(base))
    for staff, nick in (("u1", "Alice"), ("u2", "Bob"), ("u1", "Alice")):
        assert await ding.ask("hi", group=True, conversation_id="cidTEAM", staff_id=staff, nick=nick) == (
            f"@{staff} echo: {nick}: hi"
        )
    assert {r["user"] for r in double.requests} == {"dingtalk:group:cidTEAM"}
    assert [r["inputs"]["sender_id"] for r in double.requests] == ["dingtalk:u1", "dingtalk:u2", "dingtalk:u1"]
    cid = str(double.turns[0].conversation_id)
    assert conversation_ids(double) == ["", cid, cid] and double.statuses == [200, 200, 200]
    # A `per_user` agent: each member's own context, so each member's own Dify conversation and user.
    double.requests.clear()
    await ding.client.close()
    own = await dingtalk(agent(base, group_context="per_user"))
    for staff in ("u1", "u2", "u1"):
        await own.ask("hi", group=True, conversation_id="cidTEAM", staff_id=staff)
    assert [r["user"] for r in double.requests] == ["dingtalk:u1", "dingtalk:u2", "dingtalk:u1"]
    assert conversation_ids(double) == ["", "", str(double.turns[3].conversation_id)]  # u1's own, again


async def test_a_feishu_message_is_answered_by_a_dify_agent(dify: StartDify, aiohttp_server: Any, gateway: Any) -> None:
    double, base = await dify()
    feishu, domain = await fd.start(aiohttp_server)
    bot = {"name": "kb", "app_id": APP_ID, "app_secret": fd.APP_SECRET, "domain": domain, "agent": "kb"}
    client: Client = await gateway(config(agent(base), feishu={"bots": [bot]}))
    await feishu.wait_for(lambda: feishu.pings >= 1)
    for n, text in enumerate(("hello", "and again")):
        await feishu.push_event(message_event(text, message_id=f"om_{n}", sender="ou_alice"))
        await feishu.wait_for(lambda k=n: feishu.answer(f"om_{k}") is not None)  # type: ignore[misc]
        async with asyncio.timeout(10):
            await client.app[DISPATCHER].wait_idle()
        assert feishu.answer(f"om_{n}") == f"echo: {text}"
    first, second = double.requests
    assert first["user"] == second["user"] == "feishu:ou_alice"
    # Feishu sends no display name: that input is left out (the app's default applies).
    assert first["inputs"] == {"sender_id": "feishu:ou_alice", "platform": "feishu", "conversation_id": "oc_chat"}
    assert first["conversation_id"] == "" and second["conversation_id"] == double.turns[0].conversation_id


async def test_the_conversation_survives_a_restart_on_sqlite(
    dify: StartDify, aiohttp_server: Any, gateway: Any, tmp_path: Path
) -> None:
    double, base = await dify()
    store = {"url": f"sqlite:///{tmp_path}/state/botgate.sqlite3"}
    ding = await DingTalk.start(aiohttp_server, gateway, agent(base), store=store)
    await ding.ask("one")
    await ding.client.close()
    again = await DingTalk.start(aiohttp_server, gateway, agent(base), double=ding.double, store=store)
    assert await again.ask("two") == "echo: two"
    assert conversation_ids(double) == ["", str(double.turns[0].conversation_id)]
    assert double.turns[1].history[0].query == "one"


async def test_a_conversation_dify_lost_is_started_anew_and_kept(dify: StartDify, dingtalk: Any) -> None:
    double, base = await dify()
    ding = await dingtalk(agent(base))
    await ding.ask("one")
    lost = str(double.turns[0].conversation_id)
    double.forget(lost)  # deleted on Dify's side: its id is now a 404 "Conversation Not Exists."
    assert await ding.ask("two") == "echo: two"  # asked once more, as a new conversation
    fresh = str(double.turns[1].conversation_id)
    assert fresh != lost and double.statuses == [200, 404, 200]
    assert await ding.ask("three") == "echo: three"
    assert conversation_ids(double) == [
        "",
        lost,
        "",
        fresh,
    ]
    assert double.turns[2].conversation_id == fresh  # the new conversation was kept


async def test_sources_are_listed_under_the_answer_unless_turned_off(dify: StartDify, dingtalk: Any) -> None:
    _double, base = await dify(script=["sources", "sources"])
    ding = await dingtalk(agent(base))
    listed = f"echo: leave?\n\n{SOURCES}:\n1. Leave policy.pdf\n2. Holidays 2025.md"
    assert await ding.ask("leave?") == listed
    quiet = await dingtalk(agent(base, sources=False))
    assert await quiet.ask("leave?") == "echo: leave?"


async def test_message_replace_replaces_the_answer(dify: StartDify, dingtalk: Any) -> None:
    _double, base = await dify(script=["replace"], replacement="这个问题我不能回答。")
    ding = await dingtalk(agent(base))
    assert await ding.ask("something rude") == "这个问题我不能回答。"


async def test_an_agents_thoughts_are_not_shown_its_image_is(dify: StartDify, dingtalk: Any) -> None:
    _double, base = await dify(mode="agent-chat", script=["file"], thought="unused")
    ding = await dingtalk(agent(base))
    answer = await ding.ask("draw a cat")
    # The image URL is on the double's host, not in [content] image_hosts: a link, not an inline image.
    text, image = answer.split("\n\n")
    assert text == "echo: draw a cat"  # once: the last thought repeats the answer, and is not shown
    assert image.startswith(f"[{IMAGE}]({base.removesuffix('/v1')}/files/tools/") and "dalle3" not in answer


async def test_a_relative_image_url_is_resolved_and_shown_from_an_allowed_host(dify: StartDify, dingtalk: Any) -> None:
    _double, base = await dify(script=["file-relative"])
    ding = await dingtalk(agent(base), content={"image_hosts": ["127.0.0.1"]})
    answer = await ding.ask("a picture")
    prefix = f"echo: a picture\n\n![{IMAGE}]({base.removesuffix('/v1')}/files/tools/"
    assert answer.startswith(prefix), answer
    url = answer[answer.index("](") + 2 : -1]
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"  # the file Dify signed


async def test_the_new_agents_closing_message_is_not_appended(dify: StartDify, dingtalk: Any) -> None:
    _double, base = await dify(mode="agent")
    ding = await dingtalk(agent(base))
    assert await ding.ask("hi you") == "echo: hi you"


async def test_a_chatflow_app_answers_and_keeps_its_conversation(dify: StartDify, dingtalk: Any) -> None:
    double, base = await dify(mode="advanced-chat", script=["reasoning+sources"], thought="I ponder deeply")
    ding = await dingtalk(agent(base))
    answer = await ding.ask("hi")
    assert answer.startswith("echo: hi\n\n" + SOURCES) and "ponder" not in answer  # reasoning_chunk: stripped
    assert await ding.ask("more") == "echo: more"
    assert double.turns[1].conversation_id == double.turns[0].conversation_id
    assert {p for _, p in double.calls if p.endswith("-messages") or p.endswith("/run")} == {"/v1/chat-messages"}


async def test_a_workflow_app_is_answered_from_its_outputs(dify: StartDify, dingtalk: Any) -> None:
    form = [{"paragraph": {"label": "Query", "variable": "query", "required": True, "max_length": 500}}]
    double, base = await dify(mode="workflow", user_input_form=form, script=["", "no-text-chunk"], output_key="result")
    ding = await dingtalk(agent(base))
    assert await ding.ask("translate this") == "echo: translate this"  # text_chunk deltas
    assert await ding.ask("and that") == "echo: and that"  # nothing streamed: outputs["result"]
    assert [p for m, p in double.calls if m == "POST"] == ["/v1/workflows/run"] * 2
    assert double.requests[0]["inputs"]["query"] == "translate this" and "conversation_id" not in double.requests[0]


async def test_inline_thinking_is_stripped_by_default(dify: StartDify, dingtalk: Any) -> None:
    double, base = await dify(script=["think", "think-unopened", "think-details"], thought="secret plans")
    ding = await dingtalk(agent(base))
    for text in ("one", "two", "three"):
        assert await ding.ask(text) == f"echo: {text}"
    assert double.turns[2].answer.startswith(LEGACY_THINK_OPEN)  # what the double sent


async def test_a_failure_mid_answer_is_one_apology_and_keeps_nothing(dify: StartDify, dingtalk: Any) -> None:
    double, base = await dify(script=["error", "", "drop", "error:completion_request_error"])
    ding = await dingtalk(agent(base))
    failed = await ding.ask("one")
    assert failed.startswith(notice_start(MODEL_DOWN, reason="server error")) and "echo" not in failed
    assert len(ding.double.session_posts) == 1  # one apology, no half answer before it
    assert await ding.ask("two") == "echo: two"
    assert conversation_ids(double)[1] == ""  # the failed answer's conversation was not kept
    kept = str(double.turns[1].conversation_id)
    assert (await ding.ask("three")).startswith(APOLOGY)  # the connection dropped: no message_end
    assert (await ding.ask("four")).startswith(APOLOGY)
    assert await ding.ask("five") == "echo: five"
    assert conversation_ids(double)[2:] == [kept] * 3  # the failures changed nothing
    assert len(double.requests) == 5  # nothing asked twice: each failure came after a delta or is final


async def test_reset_forgets_the_dify_conversation(dify: StartDify, dingtalk: Any) -> None:
    double, base = await dify()
    ding = await dingtalk(agent(base))
    await ding.ask("one")
    assert await ding.ask("/reset") == translator("zh-CN")(RESET_DONE)
    await ding.ask("two")
    assert conversation_ids(double) == ["", ""] and len(double.conversations) == 2


async def diagnose(cfg: Config) -> tuple[int, str]:
    lines: list[str] = []
    code = await doctor.run(cfg, [handlers.doctor], lines.append)
    assert not any("app-revoked" in line or KEY in line for line in lines)
    (line,) = [line for line in lines if "agent kb model" in line]
    return code, line


async def test_doctor_checks_the_app_without_sending_a_message(dify: StartDify) -> None:
    double, base = await dify(app_name="HR helper", mode="advanced-chat")
    code, line = await diagnose(config(agent(base)))
    assert code == 0 and line.startswith("PASS") and "dify at " in line
    assert "reached the app 'HR helper' (advanced-chat) with the key; no message sent" in line
    assert double.requests == [] and {m for m, _ in double.calls} == {"GET"}
    code, line = await diagnose(config(agent(base, api_keys=[KEY, "app-revoked"])))
    assert code == 1 and line.startswith("FAIL") and "(key 2 of 2)" in line and "Access token is invalid" in line
    assert "[[agents]] kb api_keys" in line and "API Access" in line
    double.user_input_form = [{"text-input": {"label": "Office", "variable": "office", "required": True}}]
    code, line = await diagnose(config(agent(base)))
    assert code == 1 and "requires inputs botgate does not send: office" in line and "[[agents]] kb inputs" in line
    code, line = await diagnose(config(agent(base, inputs={"office": "Berlin"})))
    assert code == 0, line
    double.mode, double.user_input_form = "workflow", []
    code, line = await diagnose(config(agent(base)))
    assert code == 1 and "a workflow app gets the message in its input 'query'" in line


# -- the backend alone -----------------------------------------------------------------------------------
@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def backend(http: aiohttp.ClientSession, base: str, **extra: Any) -> DifyBackend:
    cfg = config(agent(base, **extra)).agent("kb").model
    made = create_backend(cfg, http, Metrics())
    assert isinstance(made, DifyBackend)
    return made


def ask(text: str = "hi", session: str | None = None) -> BackendRequest:
    return BackendRequest([], text, "dingtalk:u1", "Alice", "dingtalk", "cid1", "dingtalk:cid1", session)


async def collect(made: DifyBackend, request: BackendRequest, completion: Completion) -> list[Delta]:
    async with aclosing(made.stream(request, completion)) as deltas:
        return [d async for d in deltas]


async def test_stop_reaches_difys_stop_api_as_the_asking_user(dify: StartDify, http: aiohttp.ClientSession) -> None:
    double, base = await dify(script=["stall"])
    made = backend(http, base)
    completion = Completion()
    async with aclosing(made.stream(ask("a long answer"), completion)) as deltas:
        texts = [(await anext(deltas)).text]  # the first delta, then Dify waits
        await double.wait_stalled()
        await made.stop(completion)
        texts += [d.text async for d in deltas]  # Dify ends a stopped answer with message_end
    assert "".join(texts) == "echo:"
    turn = double.turns[0]
    assert [(s.path, s.user, s.effective) for s in double.stops] == [
        (f"/v1/chat-messages/{turn.task_id}/stop", "dingtalk:u1", True)
    ]
    assert (turn.outcome, completion.task_id, completion.session) == ("stopped", turn.task_id, turn.conversation_id)
    await made.stop(completion)  # finished: nothing to stop
    assert len(double.stops) == 1


@pytest.mark.parametrize(
    ("step", "reason", "retryable", "said"),
    [
        (401, "auth", False, "401 unauthorized"),
        ("too_many_requests", "rate_limited", True, "maximum concurrent requests"),
        ("rate_limit_error", "rate_limited", False, "upgrade your plan"),
        ("provider_quota_exceeded", "bad_request", False, "quota for Dify Hosted Model Provider"),
        (502, "server_error", True, "HTML page (502 Bad Gateway)"),
        (500, "server_error", True, "500 internal_server_error"),
    ],
)
async def test_http_errors_are_classified(
    dify: StartDify, http: aiohttp.ClientSession, step: int | str, reason: str, retryable: bool, said: str
) -> None:
    _double, base = await dify(script=[step])
    with pytest.raises(ModelError) as failure:
        await collect(backend(http, base, max_retries=0), ask(), Completion())
    assert (failure.value.reason, failure.value.retryable) == (reason, retryable)
    assert said in str(failure.value)


async def test_a_completed_conversation_is_started_anew(dify: StartDify, http: aiohttp.ClientSession) -> None:
    double, base = await dify()
    made = backend(http, base)
    first = Completion()
    await collect(made, ask(), first)
    double.script = ["conversation_completed"]
    completion = Completion()
    deltas = await collect(made, ask(session=first.session), completion)
    assert "".join(d.text for d in deltas) == "echo: hi"
    assert conversation_ids(double) == ["", str(first.session), ""]
    assert completion.session not in (None, first.session)


async def test_a_stream_that_ends_without_message_end_is_a_failure(
    aiohttp_server: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A clean end of the body with no terminal event (a proxy's timeout, a killed worker)."""
    frames = [b'data: {"event":"message","conversation_id":"c1","task_id":"t1","answer":"Hel"}\n\n']

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for frame in frames:
            await resp.write(frame)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat-messages", chat)
    server = await aiohttp_server(app, host="127.0.0.1")
    made = backend(http, str(server.make_url("/v1")), max_retries=0)
    seen: list[Delta] = []
    with pytest.raises(ModelError) as failure:
        async with aclosing(made.stream(ask(), Completion())) as deltas:
            async for delta in deltas:
                seen.append(delta)
    assert seen == [Delta(DeltaKind.ANSWER, "Hel")]
    assert failure.value.reason == "connection" and "incomplete" in str(failure.value)
    frames[:] = [b": nothing yet\n\nevent: ping\n\n"]
    with pytest.raises(ModelError):  # nothing at all: the same, and worth a retry
        await collect(made, ask(), Completion())


def test_the_sources_list_is_short_one_line_each_and_links_only_urls() -> None:
    draft = Draft()
    draft.add(Delta(DeltaKind.ANSWER, "See below."))
    listed = [
        Source("Guide [v2]\nfinal", "https://wiki.example/a b"),
        Source("Guide [v2]\nfinal", "https://wiki.example/a b"),
    ]
    listed += [Source(f"Doc {n}") for n in range(1, 7)]
    draft.add(Delta(DeltaKind.SOURCES, sources=tuple(listed[:3])))
    draft.add(Delta(DeltaKind.SOURCES, sources=tuple(listed[2:])))  # Doc 1 again, and more
    draft.end()
    text, sources = draft.answer.split("\n\n")
    assert text == "See below."
    lines = sources.splitlines()
    assert lines[0] == f"{SOURCES}:" and len(lines) == 1 + MAX_SOURCES
    assert lines[1] == "1. [Guide (v2) final](https://wiki.example/a%20b)"  # the duplicate is gone
    assert lines[2:] == [f"{n}. Doc {n - 1}" for n in range(2, MAX_SOURCES + 1)]
