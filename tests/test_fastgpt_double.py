"""The FastGPT double against plain aiohttp requests: the transcripts of docs/protocols/fastgpt.md."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.doubles.fastgpt import KEY, PATH, FastGPTDouble, Turn, pieces

AUTH = {"Authorization": f"Bearer {KEY}"}
Event = tuple[str, str]  # (event name, data); the name is "" when the frame has no event line


def parse_sse(raw: bytes) -> list[Event]:
    """A WHATWG event-stream parser, small and strict enough to check the double's framing."""
    events: list[Event] = []
    name = ""
    data: list[str] = []
    for line in raw.decode().replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if data or name:
                events.append((name, "\n".join(data)))
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
    if data or name:
        events.append((name, "\n".join(data)))
    return events


def deltas(events: list[Event]) -> list[dict[str, Any]]:
    """The `delta` of each chunk, in order (skips [DONE] and non-chunk events)."""
    out = []
    for name, data in events:
        if name in ("", "answer") and data != "[DONE]":
            out.append(orjson.loads(data)["choices"][0]["delta"])
    return out


def answer_text(events: list[Event]) -> str:
    return "".join(d.get("content") or "" for d in deltas(events))


@pytest.fixture
async def served(aiohttp_server: Callable[..., Any]) -> AsyncIterator[tuple[FastGPTDouble, str]]:
    double = FastGPTDouble()
    server = await aiohttp_server(double.app(), host="127.0.0.1")
    yield double, str(server.make_url(PATH))
    double.release()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


Post = Callable[..., Any]


@pytest.fixture
def post(served: tuple[FastGPTDouble, str], http: aiohttp.ClientSession) -> Post:
    """POST a body; returns (status, headers, raw bytes)."""
    _, url = served

    async def send(body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
        async with http.post(url, json=body, headers=AUTH if headers is None else headers) as resp:
            return resp.status, resp.headers, await resp.read()

    return send


def ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


# -- framing -------------------------------------------------------------------------------------


async def test_detail_false_stream_is_the_documented_transcript(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.answer = "电影"
    status, headers, raw = await post(ask("导演是谁", stream=True))
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream;charset=utf-8"
    head = '{"id":"","object":"","created":0,"model":"","choices":[{"delta":'
    assert raw.decode() == (
        f'data: {head}{{"role":"assistant","content":"电"}},"index":0,"finish_reason":null}}]}}\n\n'
        f'data: {head}{{"role":"assistant","content":"影"}},"index":0,"finish_reason":null}}]}}\n\n'
        f'data: {head}{{"role":"assistant","content":null}},"index":0,"finish_reason":"stop"}}]}}\n\n'
        "data: [DONE]\n\n"
    )
    assert b"event:" not in raw


async def test_detail_true_names_every_frame_and_sends_flow_responses_after_done(
    served: tuple[FastGPTDouble, str], post: Post
) -> None:
    double, _ = served
    _, _, raw = await post(ask("hello there", stream=True, detail=True))
    events = parse_sse(raw)
    names = [name for name, _ in events]
    assert all(names), "with detail every frame has an event line"
    assert names[:2] == ["flowNodeStatus", "flowNodeStatus"]
    assert orjson.loads(events[0][1]) == {"status": "running", "name": "知识库搜索"}
    done = events.index(("answer", "[DONE]"))
    assert names[2:done] == ["answer"] * (done - 2)
    assert orjson.loads(events[done - 1][1])["choices"][0]["finish_reason"] == "stop"
    assert events[done + 1][0] == "flowResponses"  # the frame after [DONE]
    records = orjson.loads(events[-1][1])
    assert isinstance(records, list)
    assert [r["moduleType"] for r in records] == ["datasetSearchNode", "chatNode"]
    assert records[-1]["tokens"] == records[-1]["inputTokens"] + records[-1]["outputTokens"] > 0
    assert answer_text(events) == "echo: hello there"
    assert double.completed == 1


async def test_a_reader_stopping_at_done_misses_flow_responses(served: tuple[FastGPTDouble, str], http: Any) -> None:
    """What the stock OpenAI SDK does (§5): the double tolerates the early close."""
    double, url = served
    seen = b""
    async with http.post(url, json=ask("hi", stream=True, detail=True), headers=AUTH) as resp:
        async for line in resp.content:
            seen += line
            if line.strip() == b"data: [DONE]":
                break
    assert b"flowResponses" not in seen
    await double.wait_completed(1)


async def test_reasoning_deltas_come_first_without_content(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.script = ["reasoning"]
    _, _, raw = await post(ask("hi", stream=True))
    got = deltas(parse_sse(raw))
    thinking = [d for d in got if "reasoning_content" in d]
    assert thinking and got[: len(thinking)] == thinking
    assert all("content" not in d for d in thinking)
    assert "".join(d["reasoning_content"] for d in thinking) == double.thought
    assert "".join(d.get("content") or "" for d in got) == "echo: hi"
    _, _, raw = await post(ask("hi", detail=True))  # no reasoning field without streaming
    body = orjson.loads(raw)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo: hi"}
    assert body["responseData"][-1]["reasoningText"] == ""


async def test_inline_think_tags_are_forwarded_split(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.script = ["think", "think-unopened"]
    _, _, raw = await post(ask("hi", stream=True))
    got = [d["content"] for d in deltas(parse_sse(raw)) if d.get("content")]
    assert got[:2] == ["<th", "ink>\n"]
    assert "".join(got) == f"<think>\n{double.thought}\n</think>\n\necho: hi"
    _, _, raw = await post(ask("hi", stream=True))
    assert answer_text(parse_sse(raw)) == f"{double.thought}\n</think>\n\necho: hi"


async def test_frames_are_cut_inside_characters(served: tuple[FastGPTDouble, str], http: Any) -> None:
    double, url = served
    double.answer = "电影"
    cuts = []
    async with http.post(url, json=ask("q", stream=True), headers=AUTH) as resp:
        async for data, _ in resp.content.iter_chunks():
            cuts.append(data)
    assert double.split_frames == 2
    assert any(_cut_inside_a_character(c) for c in cuts)
    assert answer_text(parse_sse(b"".join(cuts))) == "电影"


def _cut_inside_a_character(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


async def test_keepalive_is_an_empty_answer_chunk(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.script = ["keepalive"]
    _, _, raw = await post(ask("hi", stream=True))
    assert deltas(parse_sse(raw))[0] == {"role": "assistant", "content": ""}


def test_pieces_are_lossless() -> None:
    for text in ["", "echo: one two  three ", "电影《铃芽之旅》的导演是新海诚。", "mixed 中文 text\n"]:
        assert "".join(pieces(text)) == text
    assert pieces("电影") == ["电", "影"]
    assert pieces("one two") == ["one", " two"]


# -- failures --------------------------------------------------------------------------------------


async def test_mid_stream_error_event_ends_without_done(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.script = ["error-event"]
    status, _, raw = await post(ask("hello world", stream=True, chatId="c1"))
    events = parse_sse(raw)
    assert status == 200
    assert events[-1] == ("error", '{"message":"scripted failure"}')
    assert ("", "[DONE]") not in events
    assert answer_text(events) == "echo:"  # one piece got out before the failure
    assert double.history("c1") == []  # the run threw: nothing saved
    assert double.completed == 0


async def test_mid_stream_error_with_detail_too(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.script = ["error-event"]
    _, _, raw = await post(ask("hello world", stream=True, detail=True))
    names = [name for name, _ in parse_sse(raw)]
    assert names[-1] == "error"
    assert "flowResponses" not in names


async def test_error_event_without_streaming_is_http_500(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.script = ["error-event"]
    status, _, raw = await post(ask("hi"))
    assert status == 500
    assert orjson.loads(raw) == {"code": 500, "statusText": "error", "message": "scripted failure", "data": None}


async def test_error_before_the_workflow_streams_one_error_frame(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.script = ["error-before"]
    status, headers, raw = await post(ask("hi", stream=True))
    assert status == 200
    assert not headers.get("Content-Type", "").startswith("text/event-stream")
    assert parse_sse(raw) == [("error", '{"message":"scripted failure"}')]


async def test_node_error_streams_an_empty_answer(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.script = ["node-error", "node-error"]
    _, _, raw = await post(ask("hi", stream=True))
    events = parse_sse(raw)
    assert answer_text(events) == "" and events[-1] == ("", "[DONE]")
    _, _, raw = await post(ask("hi", stream=True, detail=True))
    assert orjson.loads(parse_sse(raw)[-1][1])[-1]["error"] == "scripted failure"


async def test_node_error_without_streaming_is_http_200_with_error(
    served: tuple[FastGPTDouble, str], post: Post
) -> None:
    double, _ = served
    double.script = ["node-error"]
    status, _, raw = await post(ask("hi"))
    body = orjson.loads(raw)
    assert status == 200
    assert body["error"] == "scripted failure"
    assert body["choices"][0]["message"]["content"] == ""


async def test_truncated_and_dropped_streams(served: tuple[FastGPTDouble, str], post: Post, http: Any) -> None:
    double, url = served
    double.script = ["truncated", "drop"]
    _, _, raw = await post(ask("hello world", stream=True))
    assert parse_sse(raw) and ("", "[DONE]") not in parse_sse(raw)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(url, json=ask("hello world", stream=True), headers=AUTH) as resp:
            await resp.read()


async def test_scripted_status_uses_the_envelope(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.script = [502]
    status, _, raw = await post(ask("hi", stream=True))
    assert status == 502
    assert orjson.loads(raw)["code"] == 502


# -- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "code", "status_text"),
    [
        ("Bearer fastgpt-wrongkey", 514, "unAuthApiKey"),
        ("Bearer fastgpt-wrongkey-appid", 514, "unAuthApiKey"),
        ("Bearer not-a-fastgpt-key", 403, "unAuthorization"),
        (f"{KEY}", 403, "unAuthorization"),  # no "Bearer ": no second word
        ("", 403, "unAuthorization"),
    ],
)
async def test_a_refused_key_is_http_500_without_streaming(
    post: Post, header: str, code: int, status_text: str
) -> None:
    status, _, raw = await post(ask("hi"), headers={"Authorization": header} if header else {})
    body = orjson.loads(raw)
    assert status == 500
    assert (body["code"], body["statusText"], body["data"]) == (code, status_text, None)


async def test_a_wrong_key_with_streaming_is_an_error_frame_with_http_200(post: Post) -> None:
    status, _, raw = await post(ask("hi", stream=True), headers={"Authorization": "Bearer fastgpt-wrongkey"})
    assert status == 200
    [(name, data)] = parse_sse(raw)
    assert name == "error"
    assert orjson.loads(data) == {"code": 514, "statusText": "unAuthApiKey", "message": "Api Key 不合法", "data": None}


async def test_an_account_key_must_be_an_app_key(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.account_keys = {"fastgpt-accountkey"}
    status, _, raw = await post(ask("hi"), headers={"Authorization": "Bearer fastgpt-accountkey"})
    assert status == 500
    assert "app key" in orjson.loads(raw)["message"]
    status, _, _ = await post(ask("hi"), headers={"Authorization": "Bearer fastgpt-accountkey-app1"})
    assert status == 200  # the abandoned key-appId form names the app


async def test_the_doctor_probe_checks_auth_before_messages(post: Post) -> None:
    """`{"messages": []}` runs no workflow: a good key gets "messages is empty", a bad one 514."""
    status, _, raw = await post({"messages": [], "stream": False})
    assert (status, orjson.loads(raw)["message"]) == (500, "messages is empty")
    _, _, raw = await post({"messages": []}, headers={"Authorization": "Bearer fastgpt-wrongkey"})
    assert orjson.loads(raw)["code"] == 514
    _, _, raw = await post({"messages": "hi"}, headers={"Authorization": "Bearer fastgpt-wrongkey"})
    assert orjson.loads(raw)["message"] == "messages is not array"  # checked before auth


# -- non-streaming ---------------------------------------------------------------------------------


async def test_json_answer_shape(post: Post) -> None:
    status, headers, raw = await post(ask("ping", chatId="doc-1"))
    body = orjson.loads(raw)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body == {
        "id": "doc-1",
        "model": "",
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 1},
        "choices": [{"message": {"role": "assistant", "content": "echo: ping"}, "finish_reason": "stop", "index": 0}],
    }
    _, _, raw = await post(ask("ping"))
    assert orjson.loads(raw)["id"] == ""  # no chatId: no id


async def test_json_answer_with_detail(post: Post) -> None:
    _, _, raw = await post(ask("ping", detail=True, variables={"name": "张三"}))
    body = orjson.loads(raw)
    assert list(body)[:2] == ["responseData", "newVariables"]
    assert body["newVariables"] == {"name": "张三"}
    assert body["responseData"][-1]["query"] == "ping"
    assert "error" not in body


# -- chatId and variables --------------------------------------------------------------------------


async def test_a_stable_chat_id_carries_the_context(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.answer = lambda turn: f"{len(turn.history)} before: {turn.question}"
    await post(ask("first", stream=True, chatId="conv-1"))
    _, _, raw = await post(
        {
            "chatId": "conv-1",
            "stream": True,
            "messages": [{"role": "user", "content": "old"}, {"role": "user", "content": "second"}],
        }
    )
    assert answer_text(parse_sse(raw)) == "2 before: second"
    first, second = double.turns
    assert first.history == []
    assert second.history == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "0 before: first"}]
    assert second.ignored == 1  # "old" was sent but FastGPT uses only the last message
    assert len(double.history("conv-1")) == 4
    await post(ask("elsewhere", chatId="conv-2"))
    assert double.turns[-1].history == []


async def test_without_chat_id_the_messages_are_the_context(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    await post({"messages": [*history, {"role": "user", "content": [{"type": "text", "text": "c"}]}]})
    await post({"chatId": "", "messages": [*history, {"role": "user", "content": "d"}]})
    assert [(t.chat_id, t.history, t.question) for t in double.turns] == [(None, history, "c"), ("", history, "d")]
    assert double.chats == {}  # nothing the client could address later


async def test_variables_are_kept_per_chat_and_overridden(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    await post(ask("1", chatId="v", variables={"name": "张三", "platform": "dingtalk"}, customUid="dingtalk:u1"))
    await post(ask("2", chatId="v", variables={"name": "李四"}))
    first, second = double.turns
    assert first.custom_uid == "dingtalk:u1"
    assert second.variables == {"name": "李四", "platform": "dingtalk"}


async def test_interactive_node_then_resume(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.script = ["interactive", "interactive"]
    _, _, raw = await post(ask("start", stream=True, detail=True, chatId="i"))
    events = parse_sse(raw)
    names = [name for name, _ in events]
    assert orjson.loads(events[names.index("interactive")][1])["interactive"]["type"] == "userSelect"
    assert names.index("interactive") < events.index(("answer", "[DONE]")) < names.index("flowResponses")
    _, _, raw = await post(ask("start", stream=True))  # detail=false hides it: an empty answer
    assert answer_text(parse_sse(raw)) == "" and parse_sse(raw)[-1] == ("", "[DONE]")
    await post(ask("Confirm", stream=True, detail=True, chatId="i"))
    assert [t.resumed for t in double.turns] == [False, False, True]


# -- awaitables --------------------------------------------------------------------------------


async def test_hold_and_stall_wait_for_release(served: tuple[FastGPTDouble, str], http: Any) -> None:
    double, url = served
    double.hold = True
    held = asyncio.create_task(http.post(url, json=ask("hi"), headers=AUTH))
    await double.wait_requests(1)
    assert double.received.is_set() and double.completed == 0
    double.release()
    async with await held as resp:
        assert (await resp.json())["choices"][0]["message"]["content"] == "echo: hi"
    await double.wait_completed(1)


async def test_stall_sends_the_first_piece_then_waits(served: tuple[FastGPTDouble, str], http: Any) -> None:
    double, url = served
    double.script = ["stall"]
    async with http.post(url, json=ask("one two", stream=True), headers=AUTH) as resp:
        await double.wait_stalled()
        first = await resp.content.readuntil(b"\n\n")
        assert orjson.loads(first.removeprefix(b"data: "))["choices"][0]["delta"]["content"] == "echo:"
        assert (double.completed, double.turns[0].answer, double.turns[0].outcome) == (0, "echo:", "running")
        double.release()
        rest = await resp.read()
    assert answer_text(parse_sse(first + rest)) == "echo: one two"
    turn: Turn = double.turns[0]
    assert (turn.answer, turn.outcome) == ("echo: one two", "completed")


async def test_outcomes(served: tuple[FastGPTDouble, str], post: Post) -> None:
    double, _ = served
    double.script = ["error-event", "truncated", "node-error"]
    for _ in range(4):
        await post(ask("one two", stream=True))
    assert [t.outcome for t in double.turns] == ["error", "truncated", "error", "completed"]
    assert [t.answer for t in double.turns] == ["echo:", "echo:", "", "echo: one two"]
