"""Inline thinking split off an answer as it streams (gateway/reasoning.py), the `show` marking, and
the draft that gathers a backend's deltas (gateway/draft.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.backends import Delta, DeltaKind, Source
from gateway.draft import Draft
from gateway.reasoning import THINKING, ThinkSplitter, shown


def split(*chunks: str, starts_in_think: bool = False) -> tuple[str, str]:
    """(reasoning, answer) once the stream is over."""
    splitter = ThinkSplitter(starts_in_think)
    for chunk in chunks:
        splitter.feed(chunk)
    splitter.end()
    return splitter.reasoning, splitter.answer


@pytest.mark.parametrize(
    ("chunks", "reasoning", "answer"),
    [
        (["<thi", "nk>a", "</thi", "nk>b"], "a", "b"),  # tags cut across deltas
        (["\n <think>a</think>\n\nb"], "a", "b"),  # whitespace before the block, newlines after
        (["x</think>y"], "x", "y"),  # no opening tag: all before the close was thinking
        (["好的，用户问…", "…所以回答晴。\n</think>\n\n", "今天晴。"], "好的，用户问……所以回答晴。\n", "今天晴。"),
        (["好的</th", "ink>\n答"], "好的", "答"),
        (["<think>a"], "a", ""),  # the stream ended mid-thought: no answer
        (["<think>a</th"], "a</th", ""),
        (["<think>a</think><think>b</think>c"], "ab", "c"),  # blocks in a row at the start
        (["a < b"], "", "a < b"),
        (["a <thi"], "", "a <thi"),  # held back as a possible tag, then given back at the end
        (["<think>a</think><thi"], "a", "<thi"),
        # Only at the start: after answer text a tag is the answer's own text.
        (["答", "案<", "think>x</think>y"], "", "答案<think>x</think>y"),
        (["a</think>b<think>c</think>d"], "a", "b<think>c</think>d"),
        (["Use `<think>` tags", " like </think> this"], "", "Use `<think>` tags like </think> this"),
    ],
)
def test_vectors(chunks: list[str], reasoning: str, answer: str) -> None:
    assert split(*chunks) == (reasoning, answer)


def test_a_model_known_to_start_in_thought_shows_nothing_until_the_tag() -> None:
    splitter = ThinkSplitter(starts_in_think=True)
    splitter.feed("思考")
    assert (splitter.reasoning, splitter.answer) == ("思考", "")
    splitter.feed("</think>答")
    assert (splitter.reasoning, splitter.answer) == ("思考", "答")
    assert splitter.orphan


def test_a_model_known_to_start_in_thought_that_never_closes_answered_after_all() -> None:
    assert split("just an answer", starts_in_think=True) == ("", "just an answer")


def test_undecided_text_streams_as_answer_until_an_orphan_close_takes_it_back() -> None:
    splitter = ThinkSplitter()
    splitter.feed("hmm, the user")
    assert splitter.answer == "hmm, the user" and not splitter.orphan  # shown at once: no hold
    splitter.feed(" wants</think>\n\nHi")
    assert (splitter.reasoning, splitter.answer) == ("hmm, the user wants", "Hi") and splitter.orphan


def test_a_partial_tag_is_held_back_while_streaming() -> None:
    splitter = ThinkSplitter()
    splitter.feed("answer <")
    assert splitter.answer == "answer "
    splitter.feed("b")
    assert splitter.answer == "answer <b"


texts = st.lists(
    st.sampled_from(["<think>", "</think>", "<", "</", "think", ">", "\n", " ", "a", "思", "考", "<th", "nk>"]),
    max_size=30,
).map("".join)


@given(texts, st.lists(st.integers(0, 200), max_size=10), st.booleans())
def test_any_split_of_the_stream_gives_the_same_answer(text: str, cuts: list[int], starts_in_think: bool) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert split(*pieces, starts_in_think=starts_in_think) == split(text, starts_in_think=starts_in_think)


@given(texts)
def test_nothing_is_lost_or_invented(text: str) -> None:
    """Every character is thinking, answer, or a tag or whitespace around a block; a thought ends
    at its first close tag."""
    reasoning, answer = split(text)
    assert len(reasoning) + len(answer) <= len(text)
    assert "</think>" not in reasoning
    if "<think>" not in text and "</think>" not in text:
        assert (reasoning, answer) == ("", text)


def test_show_quotes_the_thinking_under_a_heading() -> None:
    assert shown("line one\n\nline two\n", "The answer.") == (
        f"> **{THINKING}**\n>\n> line one\n> \n> line two\n\nThe answer."
    )
    assert shown("  \n", "The answer.") == "The answer."


@given(st.text(max_size=30), st.text(max_size=30), st.text(max_size=10))
def test_show_only_extends_as_the_thinking_grows(start: str, more: str, answer: str) -> None:
    """A stream appends: a longer thinking never rewrites what was shown (trailing whitespace of
    the thinking aside, which a later line gives back)."""
    before = shown(start, "")
    after = shown(start + more, answer)
    if start.strip() and not start[-1].isspace():
        assert after.startswith(before.rstrip())


def test_draft_keeps_thinking_apart_from_the_answer() -> None:
    draft = Draft()
    for delta in (
        Delta(DeltaKind.REASONING, "first I"),
        Delta(DeltaKind.REASONING, " think"),
        Delta(DeltaKind.ANSWER, "<think>and inline</think>"),
        Delta(DeltaKind.ANSWER, "Hello"),
    ):
        draft.add(delta)
    draft.end()
    assert (draft.reasoning, draft.answer) == ("first I thinkand inline", "Hello")


def test_draft_replace_images_and_sources() -> None:
    draft = Draft()
    draft.add(Delta(DeltaKind.ANSWER, "bad words"))
    draft.add(Delta(DeltaKind.REPLACE, "Sorry, I can't say that."))
    draft.add(Delta(DeltaKind.ANSWER, " Ask me another."))
    draft.add(Delta(DeltaKind.IMAGE, "https://files.example/cat.png"))
    draft.add(Delta(DeltaKind.SOURCES, sources=(Source("HR handbook", "https://wiki.example/hr"), Source("FAQ"))))
    draft.end()
    assert draft.answer == (
        "Sorry, I can't say that. Ask me another.\n\n![图片 / Image](https://files.example/cat.png)\n\n"
        "来源 / Sources:\n1. [HR handbook](https://wiki.example/hr)\n2. FAQ"
    )
