"""Reply rendering shared by the adapters: splitting long answers, tables as lists."""

from __future__ import annotations

from gateway.render import find_tables, split_text, tables_to_lists

TABLE = "Prices:\n\n| Plan | Price |\n|---|---:|\n| Basic | 10 |\n| Pro | 20 |\n\nThat's all."


def test_table_becomes_readable_list() -> None:
    out = tables_to_lists(TABLE)
    assert "|" not in out
    assert "- **Plan**: Basic; **Price**: 10" in out
    assert "- **Plan**: Pro; **Price**: 20" in out
    assert out.startswith("Prices:") and out.endswith("That's all.")


def test_tables_in_code_fences_are_left_alone() -> None:
    fenced = "```\n| a | b |\n|---|---|\n| 1 | 2 |\n```"
    assert find_tables(fenced) == []
    assert tables_to_lists(fenced) == fenced
    assert len(find_tables(TABLE + "\n\n" + TABLE)) == 2


def test_short_text_is_one_part() -> None:
    assert split_text("hello", 100) == ["hello"]


def test_split_at_paragraphs_in_order_within_limit() -> None:
    paragraphs = [f"Paragraph {i}: " + "word " * 30 for i in range(20)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    parts = split_text(text, 500)
    assert len(parts) > 1
    assert all(len(p) <= 500 for p in parts)
    # Nothing lost, nothing reordered, no paragraph cut in half.
    assert "\n\n".join(parts) == text


def test_code_fence_cut_is_closed_and_reopened() -> None:
    code = "```python\n" + "\n".join(f"print({i})" for i in range(200)) + "\n```"
    parts = split_text(code, 300)
    assert len(parts) > 1
    assert all(p.count("```") % 2 == 0 for p in parts)
    assert all(len(p) <= 300 for p in parts)


def test_one_huge_line_is_hard_split() -> None:
    parts = split_text("x" * 1000, 300)
    assert "".join(parts) == "x" * 1000
    assert all(len(p) <= 300 for p in parts)
