"""The Dify double against the wire facts of docs/protocols/dify.md: plain aiohttp requests, and dify-client.

The official SDK (dify-client 0.1.10, a thin `requests` client) is the conformance oracle for what a real client
sends and accepts: paths, headers, bodies with `files: null`, blocking and streaming answers. It blocks, so it
runs in a thread while the double serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import dify_client
import orjson
import pytest

from tests.doubles.dify import SAMPLE_SOURCES, STOP_REASON, DifyDouble, Turn

KEY = "app-double"
AUTH = {"Authorization": f"Bearer {KEY}"}
Start = Callable[..., Awaitable[tuple[DifyDouble, str]]]
Event = dict[str, Any]
PING: Event = {"event": "ping"}  # stands for an `event: ping` frame in parsed streams

FORM = [
    {"text-input": {"label": "Name", "variable": "user_name", "required": False, "max_length": 8, "default": ""}},
    {"select": {"label": "Platform", "variable": "platform", "required": True, "options": ["dingtalk", "feishu"]}},
    {"number": {"label": "Age", "variable": "age", "required": False, "default": None}},
]


@pytest.fixture
async def dify(aiohttp_server: Callable[..., Any]) -> AsyncIterator[Start]:
    """Start a double (DifyDouble fields as keywords) on 127.0.0.1; returns it and its base URL `.../v1`."""
    started: list[DifyDouble] = []

    async def start(**fields: Any) -> tuple[DifyDouble, str]:
        double = DifyDouble(**fields)
        server = await aiohttp_server(double.app())
        started.append(double)
        return double, str(server.make_url("/v1"))

    yield start
    for double in started:
        double.release()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def frames(raw: bytes) -> list[bytes]:
    """Dify's frames: each ends with a blank line, and the stream ends right after its last frame."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    return raw[:-2].split(b"\n\n")


def parse(raw: bytes) -> list[Event]:
    out: list[Event] = []
    for frame in frames(raw):
        if frame == b"event: ping":
            out.append(PING)
            continue
        assert frame.startswith(b"data: ") and b"\n" not in frame, frame  # one data line, no event: line
        event = orjson.loads(frame[len(b"data: ") :])
        assert isinstance(event, dict)
        out.append(event)
    return out


def names(events: list[Event]) -> list[str]:
    return [str(e["event"]) for e in events]


def text_of(events: list[Event]) -> str:
    return "".join(e["answer"] for e in events if e["event"] in ("message", "agent_message"))


async def post(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, bytes, aiohttp.ClientResponse]:
    async with http.post(url, json=body, headers=AUTH if headers is None else headers) as resp:
        return resp.status, await resp.read(), resp


async def chat(http: aiohttp.ClientSession, base: str, **body: Any) -> tuple[int, bytes, aiohttp.ClientResponse]:
    body.setdefault("inputs", {})
    body.setdefault("user", "dingtalk:staff-1")
    body.setdefault("response_mode", "streaming")
    return await post(http, base + "/chat-messages", **body)


async def test_chat_stream_reproduces_transcript_a(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify()
    status, raw, resp = await chat(http, base, query="hi there, friend")
    assert status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert b"[DONE]" not in raw and b"\nevent: message" not in raw
    events = parse(raw)
    assert names(events) == ["message", "ping", "message", "message", "message", "message_end"]
    data = [e for e in events if e is not PING]
    conversation_id = data[0]["conversation_id"]
    assert str(uuid.UUID(conversation_id)) == conversation_id
    for event in data:  # the common fields on every event
        assert event["conversation_id"] == conversation_id
        assert event["message_id"] == data[0]["message_id"] == event["id"]
        assert event["task_id"] == data[0]["task_id"]
        assert isinstance(event["created_at"], int)
    assert text_of(events) == "echo: hi there, friend"
    usage = data[-1]["metadata"]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(usage["total_price"], str) and usage["currency"] == "USD"
    assert "retriever_resources" not in data[-1]["metadata"]
    (turn,) = double.turns
    assert (turn.conversation_id, turn.new_conversation, turn.outcome) == (conversation_id, True, "completed")
    assert turn.user == "dingtalk:staff-1" and double.auth_headers == [f"Bearer {KEY}"]


async def test_a_reused_conversation_id_carries_the_context(dify: Start, http: aiohttp.ClientSession) -> None:
    def reply(turn: Turn) -> str:
        return f"turn {len(turn.history) + 1}, before: {[m.query for m in turn.history]}"

    double, base = await dify(reply=reply)
    first = parse((await chat(http, base, query="one", conversation_id=""))[1])
    cid = first[0]["conversation_id"]
    second = parse((await chat(http, base, query="two", conversation_id=cid))[1])
    assert {e["conversation_id"] for e in second if e is not PING} == {cid}
    assert text_of(second) == "turn 2, before: ['one']"
    assert double.conversations[cid].queries == ["one", "two"]
    assert [m.status for m in double.conversations[cid].messages] == ["normal", "normal"]
    assert [t.new_conversation for t in double.turns] == [True, False]
    third = parse((await chat(http, base, query="three"))[1])  # no id: a new conversation
    assert third[0]["conversation_id"] != cid and len(double.conversations) == 2


async def test_an_unknown_or_foreign_conversation_is_404(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify()
    not_exists = {"code": "not_found", "message": "Conversation Not Exists.", "status": 404}
    status, raw, resp = await chat(http, base, query="x", conversation_id=str(uuid.uuid4()))
    assert status == 404 and orjson.loads(raw) == not_exists
    assert resp.headers["Content-Type"].startswith("application/json")
    cid = parse((await chat(http, base, query="mine"))[1])[0]["conversation_id"]
    status, raw, _ = await chat(http, base, query="x", conversation_id=cid, user="feishu:ou_other")
    assert status == 404 and orjson.loads(raw) == not_exists  # the lookup is per user
    double.forget(cid)
    status, raw, _ = await chat(http, base, query="x", conversation_id=cid)
    assert status == 404 and orjson.loads(raw) == not_exists
    status, raw, _ = await chat(http, base, query="x", conversation_id="not-a-uuid")
    assert status == 400 and orjson.loads(raw)["code"] == "invalid_param"
    assert double.statuses == [404, 200, 404, 404, 400]
    assert len(double.turns) == 1  # refused requests are not turns


async def test_wrong_or_missing_key_is_401_with_difys_envelope(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify()
    cases = [
        ({}, "Authorization header must be provided and start with 'Bearer'"),
        ({"Authorization": "Basic app-double"}, "Authorization scheme must be 'Bearer'"),
        ({"Authorization": "Bearer app-wrong"}, "Access token is invalid"),
    ]
    for headers, message in cases:
        body = {"query": "x", "inputs": {}, "user": "u", "response_mode": "streaming"}
        status, raw, _ = await post(http, base + "/chat-messages", headers=headers, **body)
        assert (status, orjson.loads(raw)) == (401, {"code": "unauthorized", "message": message, "status": 401})
    async with http.get(base + "/info", headers={"Authorization": "Bearer app-wrong"}) as resp:
        assert resp.status == 401
    assert double.turns == [] and double.statuses == [401, 401, 401]


async def test_user_is_required(dify: Start, http: aiohttp.ClientSession) -> None:
    _, base = await dify()
    status, raw, _ = await post(http, base + "/chat-messages", query="x", inputs={}, response_mode="streaming")
    assert status == 400
    assert orjson.loads(raw) == {"code": "invalid_param", "message": "Arg user must be provided.", "status": 400}


async def test_inputs_are_filtered_and_validated_like_dify(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(user_input_form=FORM)
    status, _, _ = await chat(http, base, query="x", inputs={"platform": "feishu", "conversation": "c-1", "age": "7"})
    assert status == 200
    assert double.turns[0].inputs == {"user_name": "", "platform": "feishu", "age": 7}  # undeclared key dropped
    refusals = [
        ({"user_name": "x"}, "platform is required in input form"),
        ({"platform": "feishu", "user_name": 5}, "(type 'text-input') user_name in input form must be a string"),
        ({"platform": "feishu", "user_name": "much too long"}, "user_name in input form must be less than 8"),
        ({"platform": "web"}, "platform in input form must be one of the following: ['dingtalk', 'feishu']"),
    ]
    for inputs, message in refusals:
        status, raw, _ = await chat(http, base, query="x", inputs=inputs)
        body = orjson.loads(raw)
        assert (status, body["code"], body["status"]) == (400, "invalid_param", 400)
        assert body["message"].startswith(message)
    async with http.get(base + "/parameters", params={"user": "u"}, headers=AUTH) as resp:
        assert resp.status == 200 and (await resp.json())["user_input_form"] == FORM


async def test_blocking_mode_answers_one_json_body(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(script=["sources"])
    status, raw, resp = await chat(http, base, query="hello", response_mode="blocking")
    body = orjson.loads(raw)
    assert status == 200 and resp.headers["Content-Type"].startswith("application/json")
    assert (body["event"], body["mode"], body["answer"]) == ("message", "chat", "echo: hello")
    assert body["id"] == body["message_id"] and body["conversation_id"] == double.turns[0].conversation_id
    assert body["metadata"]["retriever_resources"] == SAMPLE_SOURCES
    assert body["metadata"]["usage"]["completion_tokens"] == 2
    status, raw, _ = await post(http, base + "/chat-messages", query="again", inputs={}, user="dingtalk:staff-1")
    assert status == 200 and orjson.loads(raw)["answer"] == "echo: again"  # response_mode omitted: blocking
    _, agent_base = await dify(mode="agent-chat")
    status, raw, _ = await chat(http, agent_base, query="x", response_mode="blocking")
    assert (status, orjson.loads(raw)["message"]) == (400, "Agent Chat App does not support blocking mode")


async def test_error_mid_stream_reproduces_transcript_e(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(script=["error", "error:completion_request_error", "error"])
    status, raw, _ = await chat(http, base, query="hello world")
    events = parse(raw)
    assert status == 200 and names(events) == ["message", "ping", "error"]
    error = events[-1]
    assert "task_id" not in error and error["conversation_id"] == events[0]["conversation_id"]
    assert (error["code"], error["status"]) == ("internal_server_error", 500)
    assert error["message"] == "Internal Server Error, please contact support."
    status, raw, _ = await chat(http, base, query="hello world")
    assert status == 200 and parse(raw)[-1]["code"] == "completion_request_error" and parse(raw)[-1]["status"] == 400
    status, raw, _ = await chat(http, base, query="hello", response_mode="blocking")  # blocking raises it instead
    assert status == 500 and orjson.loads(raw)["code"] == "internal_server_error"
    assert [t.outcome for t in double.turns] == ["error", "error", "error"]
    cid = double.turns[0].conversation_id
    assert cid is not None and double.conversations[cid].messages[0].status == "error"


async def test_stop_ends_the_stream_with_message_end(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(script=["stall"])
    body = {"query": "a long answer", "inputs": {}, "user": "feishu:ou_1", "response_mode": "streaming"}
    async with http.post(base + "/chat-messages", json=body, headers=AUTH) as resp:
        first = orjson.loads((await resp.content.readuntil(b"\n\n"))[len(b"data: ") :])
        task_id = first["task_id"]
        await double.wait_stalled()
        stop_url = f"{base}/chat-messages/{task_id}/stop"
        status, raw, _ = await post(http, stop_url, user="feishu:ou_1")
        assert (status, orjson.loads(raw)) == (200, {"result": "success"})
        rest = parse(await resp.content.read())
    assert names(rest) == ["ping", "message_end"]  # not an error, not a cut: the answer so far, ended
    assert rest[-1]["task_id"] == task_id and rest[-1]["metadata"]["usage"]
    turn = double.turns[0]
    assert (turn.outcome, turn.answer) == ("stopped", "echo:")
    assert [(s.user, s.effective) for s in double.stops] == [("feishu:ou_1", True)]
    assert turn.conversation_id is not None
    assert double.conversations[turn.conversation_id].messages[0].status == "stopped"
    status, raw, _ = await post(http, f"{base}/chat-messages/{uuid.uuid4()}/stop", user="feishu:ou_1")
    assert status == 200 and not double.stops[-1].effective  # an unknown or finished task: success as well
    status, raw, _ = await post(http, stop_url)
    assert (status, orjson.loads(raw)["code"]) == (400, "invalid_param")


async def test_another_users_stop_succeeds_and_does_nothing(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(script=["stall"])
    body = {"query": "a long answer", "inputs": {}, "user": "feishu:ou_1", "response_mode": "streaming"}
    async with http.post(base + "/chat-messages", json=body, headers=AUTH) as resp:
        await double.wait_stalled()
        stop_url = f"{base}/chat-messages/{double.turns[0].task_id}/stop"
        status, raw, _ = await post(http, stop_url, user="feishu:ou_intruder")
        assert (status, orjson.loads(raw)) == (200, {"result": "success"})
        double.release()
        events = parse(await resp.read())
    assert text_of(events) == "echo: a long answer" and names(events)[-1] == "message_end"
    assert double.turns[0].outcome == "completed" and not double.stops[0].effective


async def test_a_dropped_connection_has_no_terminal_event(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(script=["drop"])
    received = b""
    body = {"query": "a b c", "inputs": {}, "user": "u", "response_mode": "streaming"}
    async with http.post(base + "/chat-messages", json=body, headers=AUTH) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            while chunk := await resp.content.readany():
                received += chunk
    assert names(parse(received)) == ["message", "ping"]
    assert double.turns[0].outcome == "dropped"


async def test_agent_chat_reproduces_transcript_b(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(mode="agent-chat", script=["file-relative", "file"])
    events = [e for e in parse((await chat(http, base, query="draw a cat"))[1]) if e is not PING]
    assert names(events) == [
        "agent_thought",
        "agent_thought",
        "message_file",
        "agent_thought",
        "agent_thought",
        "agent_message",
        "agent_message",
        "agent_message",
        "agent_message",
        "agent_thought",
        "message_end",
    ]
    assert events[0]["thought"] == "" and events[0]["tool"] == "" and events[0]["position"] == 1
    assert events[1]["tool"] == "dalle3" and "draw a cat" in events[1]["tool_input"]
    file = events[2]
    assert (file["type"], file["belongs_to"]) == ("image", "assistant")
    assert file["url"].startswith("/files/tools/") and "&sign=" in file["url"]
    assert events[3]["message_files"] == [file["id"]] and events[4]["position"] == 2
    assert text_of(events) == "echo: draw a cat" and events[-2]["thought"] == "echo: draw a cat"
    origin = base.removesuffix("/v1")  # self-hosted: prefix the base URL without /v1
    async with http.get(origin + file["url"]) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
    events = parse((await chat(http, base, query="again"))[1])
    absolute = next(e for e in events if e["event"] == "message_file")
    assert absolute["url"].startswith(origin + "/files/tools/")
    assert double.turns[1].outcome == "completed"


async def test_the_new_agent_closes_with_the_full_message(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(mode="agent")
    events = [e for e in parse((await chat(http, base, query="hi you"))[1]) if e is not PING]
    assert names(events)[-3:] == ["agent_thought", "message", "message_end"]
    assert events[-2]["answer"] == "echo: hi you"  # the whole answer again: not a delta to append
    assert double.turns[0].answer == "echo: hi you"


async def test_chatflow_reproduces_transcript_c(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(mode="advanced-chat", script=["reasoning"], thought="I should greet")
    events = [e for e in parse((await chat(http, base, query="hi"))[1]) if e is not PING]
    assert names(events) == [
        "workflow_started",
        "node_started",
        "node_finished",
        "node_started",
        "reasoning_chunk",
        "reasoning_chunk",
        "reasoning_chunk",
        "reasoning_chunk",
        "message",
        "message",
        "node_finished",
        "node_started",
        "node_finished",
        "message_end",
        "workflow_finished",  # after message_end, in a chatflow
    ]
    run_id = double.turns[0].workflow_run_id
    for event in events:
        assert event["conversation_id"] == events[0]["conversation_id"] and event["task_id"]
    for event in events:
        if event["event"].startswith(("workflow_", "node_")):
            assert event["workflow_run_id"] == run_id and isinstance(event["data"], dict)
    reasoning = [e["data"] for e in events if e["event"] == "reasoning_chunk"]
    assert "".join(r["reasoning"] for r in reasoning) == "I should greet"
    assert reasoning[-1] == {**reasoning[-1], "reasoning": "", "is_final": True}
    assert text_of(events) == "echo: hi" and "<think>" not in text_of(events)
    assert events[-1]["data"]["status"] == "succeeded" and events[-1]["data"]["outputs"] == {"answer": "echo: hi"}


async def test_chatflow_failure_reproduces_transcript_d(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(mode="advanced-chat", script=["error:completion_request_error"])
    status, raw, _ = await chat(http, base, query="hello there")
    events = [e for e in parse(raw) if e is not PING]
    assert status == 200
    assert names(events)[-3:] == ["node_finished", "workflow_finished", "error"]
    assert "message_end" not in names(events) and text_of(events) == "echo:"
    finished, error = events[-2], events[-1]
    assert finished["data"]["status"] == "failed" and finished["data"]["error"]
    assert error["message"] == f"Run failed: {finished['data']['error']}" and error["code"] == "invalid_param"
    assert "task_id" not in error and double.turns[0].outcome == "error"


async def test_chatflow_stop_finishes_the_run_as_stopped(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(mode="advanced-chat", script=["stall"])
    body = {"query": "a b", "inputs": {}, "user": "u", "response_mode": "streaming"}
    async with http.post(base + "/chat-messages", json=body, headers=AUTH) as resp:
        await double.wait_stalled()
        task_id = double.turns[0].task_id
        assert (await post(http, f"{base}/chat-messages/{task_id}/stop", user="u"))[0] == 200
        events = [e for e in parse(await resp.read()) if e is not PING]
    assert names(events)[-2:] == ["workflow_finished", "message_end"]
    assert (events[-2]["data"]["status"], events[-2]["data"]["error"]) == ("stopped", STOP_REASON)
    assert double.turns[0].outcome == "stopped"


async def test_a_workflow_app_is_answered_from_its_outputs(dify: Start, http: aiohttp.ClientSession) -> None:
    form = [{"paragraph": {"label": "Query", "variable": "query", "required": True}}]
    double, base = await dify(mode="workflow", user_input_form=form, output_key="result", script=["", "no-text-chunk"])
    inputs = {"query": "bonjour le monde", "sender": "x"}
    body: dict[str, Any] = {"inputs": inputs, "user": "web:s1", "response_mode": "streaming"}
    status, raw, _ = await post(http, base + "/workflows/run", **body)
    events = [e for e in parse(raw) if e is not PING]
    assert status == 200 and names(events)[0] == "workflow_started" and names(events)[-1] == "workflow_finished"
    assert "".join(e["data"]["text"] for e in events if e["event"] == "text_chunk") == "echo: bonjour le monde"
    assert events[-1]["data"]["outputs"] == {"result": "echo: bonjour le monde"}
    for event in events:
        assert event["workflow_run_id"] == double.turns[0].workflow_run_id and "conversation_id" not in event
    assert double.turns[0].inputs == {"query": "bonjour le monde"}
    events = parse((await post(http, base + "/workflows/run", **body))[1])
    assert "text_chunk" not in names(events) and events[-1]["data"]["outputs"]["result"] == "echo: bonjour le monde"
    status, raw, _ = await post(http, base + "/workflows/run", **{**body, "response_mode": "blocking"})
    data = orjson.loads(raw)["data"]
    assert status == 200 and (data["status"], data["outputs"]) == ("succeeded", {"result": "echo: bonjour le monde"})
    status, raw, _ = await chat(http, base, query="x")
    assert (status, orjson.loads(raw)["code"]) == (400, "not_chat_app")
    _, chat_base = await dify()
    status, raw, _ = await post(http, chat_base + "/workflows/run", **body)
    assert (status, orjson.loads(raw)["code"]) == (400, "not_workflow_app")


async def test_message_replace_replaces_the_answer(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(script=["replace"], replacement="[removed]")
    events = [e for e in parse((await chat(http, base, query="say something bad"))[1]) if e is not PING]
    assert names(events)[-2:] == ["message_replace", "message_end"]
    assert events[-2]["answer"] == "[removed]" and text_of(events) == "echo: say something bad"
    assert double.turns[0].answer == "[removed]"


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ("think", "<think>\nI think so\n</think>\n\necho: yo"),
        ("think-unopened", "I think so\n</think>\n\necho: yo"),
        ("think-details", "<details style=\"color:gray;background-color: #f8f8f8;padding: 8px;border-radius: 4px;\" "
         "open> <summary> Thinking... </summary>\nI think so</details>echo: yo"),
    ],
)
async def test_thinking_is_passed_through_inside_the_answer(
    dify: Start, http: aiohttp.ClientSession, behaviour: str, expected: str
) -> None:
    _, base = await dify(script=[behaviour], thought="I think so")
    events = parse((await chat(http, base, query="yo"))[1])
    assert text_of(events) == expected
    if behaviour == "think":  # the tags are split across deltas, as tokenizers split them
        deltas = [e["answer"] for e in events if e["event"] == "message"]
        assert not any("<think>" in d or "</think>" in d for d in deltas)


async def test_concurrency_and_quota_limits_are_429s(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(max_active=1, hold=True, script=["", "", "rate_limit_error", 503, 500])
    first = asyncio.create_task(chat(http, base, query="first"))
    await double.wait_requests(1)
    status, raw, resp = await chat(http, base, query="second")
    body = orjson.loads(raw)
    assert (status, body["code"], body["status"]) == (429, "too_many_requests", 429)
    assert f"maximum concurrent requests allowed for {double.app_id} is 1" in body["message"]
    assert "Retry-After" not in resp.headers  # Dify documents no rate-limit headers
    double.release()
    assert (await first)[0] == 200
    status, raw, _ = await chat(http, base, query="third")
    assert (status, orjson.loads(raw)["code"]) == (429, "rate_limit_error")
    status, raw, resp = await chat(http, base, query="fourth")
    assert status == 503 and resp.content_type == "text/html" and b"nginx" in raw
    status, raw, _ = await chat(http, base, query="fifth")
    assert status == 500 and orjson.loads(raw)["code"] == "internal_server_error"
    assert double.statuses == [429, 200, 429, 503, 500]


async def test_info_and_parameters_answer_the_doctor(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(mode="advanced-chat", app_name="HR bot")
    async with http.get(base + "/info", headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.json() == {
            "name": "HR bot",
            "description": "",
            "tags": [],
            "mode": "advanced-chat",
            "author_name": "botgate",
        }
    async with http.get(base + "/parameters", headers=AUTH) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["user_input_form"] == [] and body["system_parameters"]["file_size_limit"]
    assert double.calls == [("GET", "/v1/info"), ("GET", "/v1/parameters")] and double.turns == []


async def test_files_upload_answers_201(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify()
    form = aiohttp.FormData()
    form.add_field("user", "feishu:ou_1")
    form.add_field("file", b"\x89PNG fake", filename="cat.png", content_type="image/png")
    async with http.post(base + "/files/upload", data=form, headers=AUTH) as resp:
        assert resp.status == 201
        record = await resp.json()
    assert (record["name"], record["extension"], record["mime_type"]) == ("cat.png", "png", "image/png")
    assert double.uploads[0]["content"] == b"\x89PNG fake" and double.uploads[0]["created_by"] == "feishu:ou_1"


async def test_multibyte_characters_straddle_writes_and_legacy_json_parses(
    dify: Start, http: aiohttp.ClientSession
) -> None:
    double, base = await dify()
    events = parse((await chat(http, base, query="你好 世界"))[1])
    assert text_of(events) == "echo: 你好 世界" and double.split_frames >= 2
    _, legacy = await dify(legacy_json=True)
    raw = (await chat(http, legacy, query="你好"))[1]
    assert b'"event": "message"' in raw and b"\\u4f60\\u597d" in raw  # json.dumps: spaces and escapes
    assert text_of(parse(raw)) == "echo: 你好"


async def test_a_stalled_stream_pings_while_idle(dify: Start, http: aiohttp.ClientSession) -> None:
    double, base = await dify(script=["stall"], idle_ping=0.01)
    body = {"query": "slow answer", "inputs": {}, "user": "u", "response_mode": "streaming"}
    async with http.post(base + "/chat-messages", json=body, headers=AUTH) as resp:
        await double.wait_for(lambda: double.idle_pings >= 2)
        double.release()
        events = parse(await resp.read())
    assert names(events)[:4] == ["message", "ping", "ping", "ping"] and names(events)[-1] == "message_end"
    assert text_of(events) == "echo: slow answer"


# --- the official SDK as the oracle ----------------------------------------------------------------------


def sdk_chat(base: str, key: str = KEY) -> Any:
    client = dify_client.ChatClient(key)
    client.base_url = base
    return client


async def test_the_official_sdk_talks_to_the_double(dify: Start) -> None:
    double, base = await dify(user_input_form=FORM[:1])
    client = sdk_chat(base)

    def blocking() -> Any:
        return client.create_chat_message({"user_name": "张三"}, "hello", "web:s1").json()

    answer = await asyncio.to_thread(blocking)
    assert answer["answer"] == "echo: hello" and double.requests[0]["files"] is None  # the SDK sends files: null
    assert double.requests[0]["response_mode"] == "blocking" and "conversation_id" not in double.requests[0]

    def streaming(conversation_id: str) -> list[str]:
        resp = client.create_chat_message({}, "and now?", "web:s1", "streaming", conversation_id)
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        return [line for line in resp.iter_lines(decode_unicode=True)]

    lines = await asyncio.to_thread(streaming, answer["conversation_id"])
    assert "event: ping" in lines
    events = [orjson.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert text_of(events) == "echo: and now?" and events[-1]["event"] == "message_end"
    assert {e["conversation_id"] for e in events} == {answer["conversation_id"]}
    assert double.conversations[answer["conversation_id"]].queries == ["hello", "and now?"]
    assert double.turns[1].inputs == {"user_name": ""}  # this turn sent none: the declared default

    parameters = await asyncio.to_thread(lambda: client.get_application_parameters("web:s1").json())
    assert parameters["user_input_form"] == FORM[:1]
    upload = await asyncio.to_thread(
        lambda: client.file_upload("web:s1", {"file": ("cat.png", b"\x89PNG", "image/png")})
    )
    assert upload.status_code == 201 and upload.json()["created_by"] == "web:s1"
    refused = await asyncio.to_thread(lambda: sdk_chat(base, "app-wrong").create_chat_message({}, "x", "u"))
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"


async def test_the_official_sdk_runs_a_completion_app(dify: Start) -> None:
    form = [{"text-input": {"label": "Query", "variable": "query", "required": True}}]
    double, base = await dify(mode="completion", user_input_form=form)
    client = dify_client.CompletionClient(KEY)
    client.base_url = base
    body = await asyncio.to_thread(
        lambda: client.create_completion_message({"query": "translate me"}, "blocking", "web:s1").json()
    )
    assert (body["mode"], body["answer"]) == ("completion", "echo: translate me") and "conversation_id" not in body
    missing = await asyncio.to_thread(lambda: client.create_completion_message({}, "blocking", "web:s1"))
    assert missing.status_code == 400 and missing.json()["message"] == "query is required in input form"
    assert double.turns[0].conversation_id is None
