"""The one SSE reader (gateway/sse.py): the WHATWG rules, the backends' own framings (transcripts
as in docs/protocols/backends.md §1), limits, and that no chunking of the bytes changes the events."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sse import SseError, SseEvent, SseParser, read_events


def parse(*chunks: bytes, limit: int = 1 << 20) -> list[SseEvent]:
    parser = SseParser(limit)
    return [event for chunk in chunks for event in parser.feed(chunk)]


def pairs(*chunks: bytes) -> list[tuple[str, str]]:
    return [(e.event, e.data) for e in parse(*chunks)]


DIFY = (
    b'data: {"event":"message","conversation_id":"c1","answer":" I"}\n\n'
    b"event: ping\n\n"
    b'data: {"event":"message","conversation_id":"c1","answer":"\'m fine"}\n\n'
    b'data: {"event":"message_end","conversation_id":"c1","metadata":{}}\n\n'
)

COZE = (
    b'event:conversation.chat.created\ndata:{"id":"738","conversation_id":"7381","status":"created"}\n\n'
    b'event:conversation.message.delta\ndata:{"type":"answer","content":"2"}\n\n'
    b'event:conversation.chat.completed\ndata:{"status":"completed"}\n\n'
    b'event:done\ndata:"[DONE]"\n\n'
)

OPENROUTER = (
    b": OPENROUTER PROCESSING\n\n"
    b'data: {"choices":[{"delta":{"reasoning":"Let me think"}}]}\n\n'
    b": OPENROUTER PROCESSING\n\n"
    b'data: {"choices":[{"delta":{"content":"Hi!"}}]}\n\n'
    b"data: [DONE]\n\n"
)

FASTGPT = (
    'event: flowNodeStatus\ndata: {"status":"running","name":"AI 对话"}\n\n'
    'event: answer\ndata: {"choices":[{"delta":{"content":"电影"}}]}\n\n'
    "event: answer\ndata: [DONE]\n\n"
    'event: flowResponses\ndata: [{"moduleName":"AI 对话"}]\n\n'
).encode()


def test_dify_names_its_events_inside_the_json_and_pings_without_data() -> None:
    assert pairs(DIFY) == [
        ("message", '{"event":"message","conversation_id":"c1","answer":" I"}'),
        ("ping", ""),  # a browser would drop it; a backend may want to see it
        ("message", '{"event":"message","conversation_id":"c1","answer":"\'m fine"}'),
        ("message", '{"event":"message_end","conversation_id":"c1","metadata":{}}'),
    ]


def test_coze_writes_no_space_after_the_colon_and_ends_with_a_json_string() -> None:
    events = pairs(COZE)
    assert [e for e, _ in events] == [
        "conversation.chat.created", "conversation.message.delta", "conversation.chat.completed", "done"
    ]
    assert events[0][1].startswith('{"id":"738"') and events[-1][1] == '"[DONE]"'


def test_openrouter_keep_alive_comments_are_ignored() -> None:
    assert [d for _, d in pairs(OPENROUTER)] == [
        '{"choices":[{"delta":{"reasoning":"Let me think"}}]}', '{"choices":[{"delta":{"content":"Hi!"}}]}', "[DONE]"
    ]


def test_fastgpt_events_after_done_are_read_too() -> None:
    assert pairs(FASTGPT)[2:] == [("answer", "[DONE]"), ("flowResponses", '[{"moduleName":"AI 对话"}]')]


def test_line_endings_crlf_lf_and_cr_alike() -> None:
    expected = [("message", "a"), ("x", "b")]
    for eol in (b"\n", b"\r\n", b"\r"):
        assert pairs(b"data: a" + eol + eol + b"event: x" + eol + b"data: b" + eol + eol) == expected, eol


def test_a_crlf_split_between_chunks_is_one_line_end() -> None:
    assert pairs(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [("message", "a\nb")]


def test_field_rules() -> None:
    stream = (
        b"\xef\xbb\xbfdata: first\n"  # a BOM at the start goes
        b"data:second\n"  # the space is optional ...
        b"data:  third\n"  # ... and only one goes
        b"data\n"  # a field without colon has an empty value
        b": a comment\n"
        b"unknown: ignored\n"
        b"id: 42\n"
        b"retry: 3000\n"
        b"\n"
        b"id: a\x00b\n"  # an id with NUL is ignored
        b"retry: soon\n"  # a retry that is not digits is ignored
        b"event: named\n"
        b"data: x\n"
        b"\n"
    )
    first, second = parse(stream)
    assert first == SseEvent("message", "first\nsecond\n third\n", "42", 3000)
    assert second == SseEvent("named", "x", "42", 3000)  # the id and retry stay in force


def test_an_event_type_does_not_leak_into_the_next_event() -> None:
    assert pairs(b"event: a\ndata: 1\n\ndata: 2\n\n") == [("a", "1"), ("message", "2")]


def test_blank_lines_alone_and_comments_alone_dispatch_nothing() -> None:
    assert parse(b"\n\n: hi\n\nid: 7\n\n") == []


def test_an_empty_data_line_is_an_event_with_empty_data() -> None:
    assert pairs(b"data:\n\n") == [("message", "")]


def test_an_event_not_closed_by_a_blank_line_is_discarded_at_the_end() -> None:
    """WHATWG: "If the file ends in the middle of an event, before the final empty line, the
    incomplete event is not dispatched." A backend notices the missing terminal event."""
    assert pairs(b"data: one\n\ndata: two\n") == [("message", "one")]
    assert pairs(b"data: one\n\ndata: tw") == [("message", "one")]


def test_utf8_cut_inside_a_character_arrives_whole() -> None:
    raw = "data: 今天晴。\n\n".encode()
    cut = raw.index("晴".encode()) + 1
    assert pairs(raw[:cut], raw[cut:]) == [("message", "今天晴。")]


def test_a_line_over_the_limit_is_refused() -> None:
    with pytest.raises(SseError):
        parse(b"data: " + b"x" * 100, limit=64)  # not even ended yet
    with pytest.raises(SseError):
        parse(b"data: " + b"x" * 100 + b"\n", limit=64)


def test_event_data_over_the_limit_is_refused() -> None:
    with pytest.raises(SseError):
        parse(b"data: 0123456789\n" * 10, limit=64)


async def test_read_events_over_an_async_byte_stream() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(COZE), 7):
            yield COZE[i : i + 7]

    events = [e async for e in read_events(chunks())]
    assert [(e.event, e.data) for e in events] == pairs(COZE)


# -- any chunking, the same events --------------------------------------------------------------
lines = st.lists(
    st.one_of(
        st.text(st.characters(blacklist_characters="\r\n"), max_size=12).map(lambda t: f"data:{t}"),
        st.sampled_from(["data: 思考", "event: ping", "event:done", ": keep-alive", "id: 9", "retry: 5", "", ""]),
    ),
    max_size=20,
)


@given(lines, st.sampled_from(["\n", "\r\n", "\r"]), st.lists(st.integers(0, 400), max_size=12))
def test_any_chunking_of_the_bytes_gives_the_same_events(body: list[str], eol: str, cuts: list[int]) -> None:
    raw = ("\ufeff" + eol.join(body) + eol + eol).encode()
    whole = parse(raw)
    points = sorted({min(c, len(raw)) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    assert parse(*pieces) == whole


class _Chunks:
    """A byte stream as aiohttp's `iter_any()` is: an iterator object, not an async generator."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = iter(chunks)

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None


async def test_a_reader_left_at_the_terminal_event_needs_no_finalizing() -> None:
    """A backend stops at `[DONE]`; an unfinished async generator would cost a task of its own
    (the loop's finalizer hook closes it), one per answer."""
    started: list[object] = []
    hooks = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(firstiter=started.append, finalizer=hooks.finalizer)
    try:
        async for event in read_events(_Chunks([b"data: a\n\ndata: [DONE]\n\ndata: late\n\n"])):
            if event.data == "[DONE]":
                break
    finally:
        sys.set_asyncgen_hooks(*hooks)
    assert started == []
