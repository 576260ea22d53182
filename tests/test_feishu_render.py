"""Answers -> Feishu cards and posts within Feishu's limits."""

from __future__ import annotations

import orjson

from handlers.feishu.render import CARD_TABLE_LIMIT, PART_LIMIT, render, stream_view

TABLE = "| a | b |\n|---|---|\n| 1 | 2 |"


def tables(n: int) -> str:
    return "\n\n".join(f"Table {i}:\n\n{TABLE}" for i in range(n))


def test_short_answer_is_one_card() -> None:
    (part,) = render("**Hello** world")
    assert part.msg_type == "interactive"
    assert part.content["schema"] == "2.0"
    assert part.content["body"]["elements"][0]["content"] == "**Hello** world"


def test_five_tables_stay_in_a_card_six_become_a_post() -> None:
    (five,) = render(tables(CARD_TABLE_LIMIT))
    assert five.msg_type == "interactive"
    (six,) = render(tables(CARD_TABLE_LIMIT + 1))
    assert six.msg_type == "post"
    paragraphs = six.content["zh_cn"]["content"]
    blocks = [p[0]["text"] for p in paragraphs if p[0]["tag"] == "code_block"]
    assert blocks == [TABLE] * 6  # every table kept verbatim, columns aligned in a code block
    prose = [p[0]["text"] for p in paragraphs if p[0]["tag"] == "md"]
    assert prose == [f"Table {i}:" for i in range(6)]


def test_long_answer_split_into_ordered_parts_under_the_card_limit() -> None:
    text = "\n\n".join(f"Paragraph {i}: " + "字" * 900 for i in range(30))
    parts = render(text)
    assert len(parts) > 1
    assert all(len(orjson.dumps(p.content)) < 30 * 1024 for p in parts)
    assert all(len(p.text) <= PART_LIMIT for p in parts)
    joined = "\n\n".join(p.text for p in parts)
    assert joined == text  # nothing lost, order kept


def test_model_output_cannot_mention_everyone() -> None:
    (part,) = render('Hi <at id=all></at> and <AT user_id="ou_x">x</at>')
    content = part.content["body"]["elements"][0]["content"]
    assert "<at" not in content.lower()
    assert "&lt;at id=all>&lt;/at>" in content


def test_stream_view_never_shows_more_than_five_tables() -> None:
    view = stream_view(tables(7))
    assert "|---|" not in view and "- **a**: 1; **b**: 2" in view
    assert len(stream_view("x" * (PART_LIMIT * 2))) <= PART_LIMIT
