"""The Coze double against the transcripts of docs/protocols/coze.md, with plain aiohttp requests.

cozepy (the official SDK) cannot be the oracle here: cozepy 0.20.0 requires websockets<15 and the
project pins websockets 15.0.1 (lark-oapi, dingtalk-stream), so the shapes are checked against the
captured transcripts of docs/protocols/coze.md §CZ.3 instead."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.doubles.coze import BOT_ID, TOKEN, CozeDouble

AUTH = {"Authorization": f"Bearer {TOKEN}"}
Event = tuple[str, Any]


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


def chat_body(text: str = "2024年10月1日是星期几", **extra: Any) -> dict[str, Any]:
    return {
        "bot_id": BOT_ID,
        "user_id": "u_9f2c",
        "stream": True,
        "additional_messages": [{"role": "user", "type": "question", "content": text, "content_type": "text"}],
        **extra,
    }


def parse(raw: str) -> list[Event]:
    """Coze's framing, strictly: `event:X` then `data:Y` then a blank line, no spaces, nothing else."""
    events: list[Event] = []
    blocks = raw.split("\n\n")
    assert blocks[-1] == "", f"stream does not end with a blank line: {raw[-40:]!r}"
    for block in blocks[:-1]:
        lines = block.split("\n")
        assert len(lines) == 2, block
        assert lines[0].startswith("event:") and not lines[0].startswith("event: "), lines[0]
        assert lines[1].startswith("data:") and not lines[1].startswith("data: "), lines[1]
        events.append((lines[0].removeprefix("event:"), orjson.loads(lines[1].removeprefix("data:"))))
    return events


async def stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any], query: str = "") -> list[Event]:
    async with http.post(f"{url}/v3/chat{query}", json=body, headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["x-tt-logid"]
        return parse((await resp.read()).decode())


async def envelope(
    http: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any] | None = None, **kw: Any
) -> tuple[int, dict[str, Any]]:
    """A non-streamed answer: HTTP status and Coze's `{code, msg, data, detail}` envelope."""
    kw.setdefault("headers", AUTH)
    async with http.post(f"{url}{path}", json=body, **kw) as resp:
        assert resp.content_type == "application/json"
        data: dict[str, Any] = await resp.json()
        assert data["detail"]["logid"] == resp.headers["x-tt-logid"]
        return resp.status, data


class Reader:
    """Read a stream event by event, to act while the chat is still running."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.events: list[Event] = []

    async def until(self, name: str) -> list[Event]:
        while True:
            block = b""
            while not block.endswith(b"\n\n"):
                line = await self.resp.content.readline()
                if not line:
                    return self.events
                block += line
            self.events += parse(block.decode())
            if self.events[-1][0] == name:
                return self.events


def names(events: list[Event]) -> list[str]:
    return [e for e, _ in events]


def shown(events: list[Event]) -> str:
    """The user-visible answer by the notes' rule: completed `answer` messages, joined with newlines."""
    return "\n".join(d["content"] for e, d in events if e == "conversation.message.completed" and d["type"] == "answer")


async def test_a_streamed_chat_is_the_captured_transcript(coze: tuple[CozeDouble, str], http: Any) -> None:
    double, url = coze
    events = await stream(http, url, chat_body())
    deltas = [d for e, d in events if e == "conversation.message.delta"]
    assert names(events) == [
        "conversation.chat.created",
        "conversation.chat.in_progress",
        *["conversation.message.delta"] * len(deltas),
        "conversation.message.completed",
        "conversation.message.completed",
        "conversation.chat.completed",
        "done",
    ]
    assert len(deltas) > 1
    assert events[-1] == ("done", "[DONE]")
    created, progress, completed = events[0][1], events[1][1], events[-2][1]
    chat_id, conversation_id = created["id"], created["conversation_id"]
    assert re.fullmatch(r"\d{19}", chat_id) and re.fullmatch(r"\d{19}", conversation_id)
    assert (created["status"], progress["status"], completed["status"]) == ("created", "in_progress", "completed")
    assert created["bot_id"] == BOT_ID and created["last_error"] == {"code": 0, "msg": ""}
    answer, verbose = events[-4][1], events[-3][1]
    assert answer["type"] == "answer" and answer["content"] == "echo: 2024年10月1日是星期几"
    assert "".join(d["content"] for d in deltas) == answer["content"]
    assert {d["id"] for d in deltas} == {answer["id"]} and {d["type"] for d in deltas} == {"answer"}
    assert verbose["type"] == "verbose" and orjson.loads(verbose["content"])["msg_type"] == "generate_answer_finish"
    for _, data in events[2:-2]:
        assert (data["chat_id"], data["conversation_id"], data["role"]) == (chat_id, conversation_id, "assistant")
    usage = completed["usage"]
    assert usage["output_count"] == len(answer["content"]) and usage["input_count"] > 0
    assert usage["token_count"] == usage["input_count"] + usage["output_count"]
    assert shown(events) == "echo: 2024年10月1日是星期几"
    assert double.requests[0].body["user_id"] == "u_9f2c" and double.requests[0].query == {}
    assert double.chats[chat_id].status == "completed"


async def test_tools_reasoning_answers_verbose_and_follow_ups_in_order(coze: Any, http: Any) -> None:
    double, url = coze
    double.tool_calls, double.reasoning = True, "用户问 日期"
    double.extra_answers, double.follow_ups = ["second answer"], ["你还想知道什么？", "明天呢？"]
    events = await stream(http, url, chat_body("hi"))
    kinds = [(e.removeprefix("conversation."), d.get("type") if isinstance(d, dict) else d) for e, d in events]
    thinking = [d for e, d in events if e == "conversation.message.delta" and d["content"] == ""]
    first = kinds.index(("message.delta", "answer"))
    assert kinds[:first] == [
        ("chat.created", None),
        ("chat.in_progress", None),
        ("message.completed", "function_call"),
        ("message.completed", "tool_response"),
    ]
    assert "".join(d["reasoning_content"] for d in thinking) == "用户问 日期"
    completed = [(k, t) for k, t in kinds if k == "message.completed"]
    assert [t for _, t in completed[2:]] == ["answer", "answer", "verbose", "follow_up", "follow_up"]
    assert kinds[-2:] == [("chat.completed", None), ("done", "[DONE]")]
    first_answer = next(d for e, d in events if e == "conversation.message.completed" and d["type"] == "answer")
    assert first_answer["reasoning_content"] == "用户问 日期"
    # Only answers are shown: no thinking, no verbose JSON, no suggestions.
    assert shown(events) == "echo: hi\nsecond answer"


async def test_a_reused_conversation_carries_its_history(coze: Any, http: Any) -> None:
    double, url = coze
    double.recall = True
    first = await stream(http, url, chat_body("my name is Li"))
    conversation_id = first[0][1]["conversation_id"]
    second = await stream(http, url, chat_body("what is my name?"), f"?conversation_id={conversation_id}")
    assert second[0][1]["conversation_id"] == conversation_id
    assert second[0][1]["id"] != first[0][1]["id"]
    assert shown(second) == "echo: what is my name? [after: my name is Li]"
    assert double.requests[1].query == {"conversation_id": conversation_id}
    history = [(m["role"], m["content"]) for m in double.history(conversation_id)]
    assert history == [
        ("user", "my name is Li"),
        ("assistant", "echo: my name is Li"),
        ("user", "what is my name?"),
        ("assistant", "echo: what is my name? [after: my name is Li]"),
    ]
    assert second[-2][1]["usage"]["input_count"] > first[-2][1]["usage"]["input_count"]
    fresh = await stream(http, url, chat_body("hello"))
    assert fresh[0][1]["conversation_id"] not in (conversation_id, None)
    assert shown(fresh) == "echo: hello"


async def test_a_chat_without_save_leaves_no_history(coze: Any, http: Any) -> None:
    double, url = coze
    events = await stream(http, url, chat_body("one", auto_save_history=False))
    assert double.history(events[0][1]["conversation_id"]) == []


async def test_unknown_conversation_id_is_an_envelope_error(coze: Any, http: Any) -> None:
    double, url = coze
    status, data = await envelope(http, url, "/v3/chat?conversation_id=7000000000000000000", chat_body())
    assert status == 200
    assert (data["code"], data["msg"]) == double.unknown_conversation
    assert "conversation" in data["msg"]
    assert not double.chats


async def test_one_chat_at_a_time_per_conversation_4016(coze: Any, http: Any) -> None:
    double, url = coze
    conversation_id = (await stream(http, url, chat_body("first")))[0][1]["conversation_id"]
    double.script = ["stall"]
    query = f"?conversation_id={conversation_id}"
    async with http.post(f"{url}/v3/chat{query}", json=chat_body("slow"), headers=AUTH) as running:
        reader = Reader(running)
        await reader.until("conversation.message.delta")
        paused = await double.wait_paused()
        assert paused.conversation_id == conversation_id and paused.status == "in_progress"
        status, data = await envelope(http, url, f"/v3/chat{query}", chat_body("too soon"))
        assert (status, data["code"]) == (200, 4016)
        other = await stream(http, url, chat_body("elsewhere"))  # another conversation is not blocked
        assert shown(other) == "echo: elsewhere"
        double.release()
        events = await reader.until("done")
    assert names(events)[-2:] == ["conversation.chat.completed", "done"]
    assert shown(events) == "echo: slow"
    after = await stream(http, url, chat_body("now"), query)
    assert shown(after) == "echo: now"
    assert [m["content"] for m in double.history(conversation_id) if m["role"] == "user"] == ["first", "slow", "now"]


async def test_held_chats_pause_after_in_progress(coze: Any, http: Any) -> None:
    double, url = coze
    double.hold = True
    async with http.post(f"{url}/v3/chat", json=chat_body(), headers=AUTH) as resp:
        reader = Reader(resp)
        head = await reader.until("conversation.chat.in_progress")
        chat = await double.wait_paused()
        assert names(head) == ["conversation.chat.created", "conversation.chat.in_progress"]
        assert double.conversations[chat.conversation_id].running == chat.id
        double.release(chat.id)
        assert names(await reader.until("done"))[-1] == "done"
    await double.wait_finished(1)


async def test_cancel_frees_the_conversation_and_forgets_the_turn(coze: Any, http: Any) -> None:
    double, url = coze
    double.script = ["stall"]
    async with http.post(f"{url}/v3/chat", json=chat_body("long task"), headers=AUTH) as running:
        reader = Reader(running)
        created = (await reader.until("conversation.message.delta"))[0][1]
        ids = {"conversation_id": created["conversation_id"], "chat_id": created["id"]}
        query = f"?conversation_id={ids['conversation_id']}"
        await double.wait_paused()
        status, data = await envelope(http, url, "/v3/chat/cancel", ids)
        assert (status, data["code"], data["data"]["status"]) == (200, 0, "canceled")
        assert data["data"]["id"] == ids["chat_id"]
        await double.wait_cancels(1)
        assert double.cancelled.is_set() and double.cancels[0].body == ids
        _, again = await envelope(http, url, "/v3/chat/cancel", ids)
        assert again["code"] == 4104
        _, info = await envelope(http, url, f"/v3/chat/retrieve?conversation_id={ids['conversation_id']}"
                                 f"&chat_id={ids['chat_id']}")
        assert info["data"]["status"] == "canceled"
        # The conversation takes a new chat at once, while the canceled one still streams.
        nxt = await stream(http, url, chat_body("next"), query)
        assert shown(nxt) == "echo: next"
        # Cancel does not cut the stream (the client must hang up): it goes on once released.
        double.release()
        rest = await reader.until("done")
    assert shown(rest) == "echo: long task"
    assert double.chats[ids["chat_id"]].status == "canceled"
    assert [(m["role"], m["content"]) for m in double.history(ids["conversation_id"])] == [
        ("user", "next"),
        ("assistant", "echo: next"),
    ]
    _, done = await envelope(http, url, "/v3/chat/cancel", {"conversation_id": ids["conversation_id"],
                                                            "chat_id": nxt[0][1]["id"]})
    assert done["code"] == 4104  # a completed chat can't be canceled
    _, unknown = await envelope(http, url, "/v3/chat/cancel", {"conversation_id": "1", "chat_id": "2"})
    assert unknown["code"] == 4000


@pytest.mark.parametrize(
    ("authorization", "code"),
    [(None, 4100), ("Bearer pat_wrong", 4101), ("Bearer pat_com_site", 4100), (f"Basic {TOKEN}", 4100)],
)
async def test_auth_errors_are_the_http_envelope(
    coze: Any, http: Any, authorization: str | None, code: int
) -> None:
    double, url = coze
    double.other_region_tokens = {"pat_com_site"}
    headers = {"Authorization": authorization} if authorization else {}
    for path, body in [("/v3/chat", chat_body()), ("/v3/chat/cancel", {}), ("/v1/conversation/create", {})]:
        status, data = await envelope(http, url, path, body, headers=headers)
        assert (status, data["code"]) == (401, code)
        assert data["msg"]
    assert not double.chats and not double.conversations


async def test_bad_requests_are_4000_and_an_unpublished_bot_4015(coze: Any, http: Any) -> None:
    _, url = coze
    cases = [
        ({k: v for k, v in chat_body().items() if k != "bot_id"}, 4000),
        ({k: v for k, v in chat_body().items() if k != "user_id"}, 4000),
        (chat_body(bot_id="7000000000000000001"), 4015),
        (chat_body(additional_messages=[]), 4000),  # a new conversation needs a question
        (chat_body(stream=False, auto_save_history=False), 4000),
    ]
    for body, code in cases:
        status, data = await envelope(http, url, "/v3/chat", body)
        assert (status, data["code"]) == (200, code), body


async def test_rate_limit_server_error_and_a_proxy_status(coze: Any, http: Any) -> None:
    double, url = coze
    double.script, double.retry_after = ["rate-limit", 5000, 502], "3"
    async with http.post(f"{url}/v3/chat", json=chat_body(), headers=AUTH) as resp:
        body = await resp.json()
        assert (resp.status, body["code"], resp.headers["Retry-After"]) == (200, 4013, "3")
    status, data = await envelope(http, url, "/v3/chat", chat_body())
    assert (status, data["code"]) == (200, 5000)
    async with http.post(f"{url}/v3/chat", json=chat_body(), headers=AUTH) as resp:
        assert (resp.status, resp.content_type) == (502, "text/html")
    assert len(double.requests) == 3 and not double.chats


async def test_a_question_can_script_its_own_error(coze: Any, http: Any) -> None:
    _, url = coze
    status, data = await envelope(http, url, "/v3/chat", chat_body("script:5000 please fail"))
    assert (status, data["code"]) == (200, 5000)
    events = await stream(http, url, chat_body("script:failed"))
    assert names(events)[-1] == "conversation.chat.failed"


async def test_failure_transcripts(coze: Any, http: Any) -> None:
    double, url = coze
    double.script = ["failed", "failed-bare", "error", "error-empty", "requires-action"]
    failed = await stream(http, url, chat_body())
    assert names(failed) == ["conversation.chat.created", "conversation.chat.in_progress", "conversation.chat.failed"]
    last = failed[-1][1]
    assert last["status"] == "failed" and last["last_error"] == {"code": 5000, "msg": "event interval error"}
    assert last["failed_at"] >= last["created_at"]
    bare = await stream(http, url, chat_body())
    assert bare[-1] == ("conversation.chat.failed", {"code": 701231, "msg": "error"})
    error = await stream(http, url, chat_body())
    assert names(error)[:3] == ["conversation.chat.created", "conversation.chat.in_progress",
                                "conversation.message.delta"]
    assert error[-1][0] == "error" and error[-1][1]["code"] == 5000 and "done" not in names(error)
    assert await stream(http, url, chat_body()) == [("error", {})]
    action = await stream(http, url, chat_body())
    assert names(action)[-2:] == ["conversation.chat.requires_action", "done"]
    call = action[-2][1]["required_action"]["submit_tool_outputs"]["tool_calls"][0]
    assert action[-2][1]["status"] == "requires_action" and call["type"] == "function"
    assert [c.status for c in double.chats.values()] == ["failed"] * 4 + ["requires_action"]
    # A failed chat ends the chat: its conversation takes the next one.
    again = await stream(http, url, chat_body("retry"), f"?conversation_id={failed[0][1]['conversation_id']}")
    assert shown(again) == "echo: retry"


async def test_drop_closes_the_connection_mid_stream(coze: Any, http: Any) -> None:
    double, url = coze
    double.script = ["drop"]
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(f"{url}/v3/chat", json=chat_body("a b c"), headers=AUTH) as resp:
            await resp.read()
    await double.wait_finished(1)
    chat = next(iter(double.chats.values()))
    assert names(chat.events)[-1] == "conversation.message.delta" and chat.status == "failed"


async def test_fragmented_writes_cut_inside_a_character(coze: Any, http: Any) -> None:
    double, url = coze
    double.fragment = True
    async with http.post(f"{url}/v3/chat", json=chat_body("你好"), headers=AUTH) as resp:
        chunks = [chunk async for chunk, _ in resp.content.iter_chunks()]
    raw = b"".join(chunks)
    assert shown(parse(raw.decode())) == "echo: 你好"
    assert any(not _decodes(c) for c in chunks)


def _decodes(chunk: bytes) -> bool:
    try:
        chunk.decode()
    except UnicodeDecodeError:
        return False
    return True


async def test_conversation_create_is_the_doctor_call(coze: Any, http: Any) -> None:
    double, url = coze
    status, data = await envelope(http, url, "/v1/conversation/create", {"bot_id": BOT_ID})
    assert (status, data["code"], data["msg"]) == (200, 0, "")
    conversation_id = data["data"]["id"]
    assert re.fullmatch(r"\d{19}", conversation_id) and data["data"]["connector_id"] == "1024"
    assert data["data"]["last_section_id"]
    _, empty = await envelope(http, url, "/v1/conversation/create")  # all fields optional, no body at all
    assert empty["code"] == 0
    _, wrong = await envelope(http, url, "/v1/conversation/create", {"bot_id": "1"})
    assert wrong["code"] == 5000
    # A pre-created conversation takes chats, and its seeded messages are context.
    _, seeded = await envelope(http, url, "/v1/conversation/create", {
        "bot_id": BOT_ID, "messages": [{"role": "user", "content": "seed", "content_type": "text"}]})
    seeded_id = seeded["data"]["id"]
    double.recall = True
    events = await stream(http, url, chat_body("go"), f"?conversation_id={seeded_id}")
    assert events[0][1]["conversation_id"] == seeded_id
    assert shown(events) == "echo: go [after: seed]"


async def test_non_streamed_chat_then_retrieve_and_message_list(coze: Any, http: Any) -> None:
    _, url = coze
    status, data = await envelope(http, url, "/v3/chat", chat_body("quiet", stream=False))
    assert (status, data["code"], data["data"]["status"]) == (200, 0, "in_progress")
    query = f"?conversation_id={data['data']['conversation_id']}&chat_id={data['data']['id']}"
    async with http.get(f"{url}/v3/chat/retrieve{query}", headers=AUTH) as resp:
        chat = (await resp.json())["data"]
    assert chat["status"] == "completed" and chat["usage"]["output_count"] == len("echo: quiet")
    async with http.get(f"{url}/v3/chat/message/list{query}", headers=AUTH) as resp:
        messages = (await resp.json())["data"]
    assert (messages[0]["type"], messages[0]["content"]) == ("answer", "echo: quiet")
    assert [m["type"] for m in messages] == ["answer", "verbose"]


async def test_chats_on_many_conversations_run_concurrently(coze: Any, http: Any) -> None:
    double, url = coze
    double.hold = True
    async def one(i: int) -> list[Event]:
        return await stream(http, url, chat_body(f"q{i}"))
    tasks = [asyncio.ensure_future(one(i)) for i in range(3)]
    await double.wait_paused(3)
    double.release()
    results = await asyncio.gather(*tasks)
    assert sorted(shown(r) for r in results) == ["echo: q0", "echo: q1", "echo: q2"]
    assert len({r[0][1]["conversation_id"] for r in results}) == 3
