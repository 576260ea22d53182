"""The render contract of every adapter, and the markdown helpers they share: an answer becomes
an ordered list of `Part`s (split at paragraph boundaries, tables turned into lists for platforms
whose markdown has none)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Part:
    """One message of a rendered answer: the markdown it shows, and where the platform needs
    it, its message type and content object."""

    text: str
    msg_type: str = "markdown"
    content: Mapping[str, Any] = field(default_factory=dict)


_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_FENCE = "```"


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [c.strip() for c in line.split("|")]


def _is_row(line: str) -> bool:
    return "|" in line and bool(line.strip())


def find_tables(text: str) -> list[tuple[int, int]]:
    """(first line, end line) of each markdown table: a header row, a separator row, data rows.
    Tables inside code fences are not tables."""
    lines = text.split("\n")
    found: list[tuple[int, int]] = []
    in_fence = False
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith(_FENCE):
            in_fence = not in_fence
        elif not in_fence and i + 1 < len(lines) and _is_row(lines[i]) and _TABLE_SEP.match(lines[i + 1]):
            end = i + 2
            while end < len(lines) and _is_row(lines[end]):
                end += 1
            found.append((i, end))
            i = end
            continue
        i += 1
    return found


def tables_to_lists(text: str) -> str:
    """Rewrite each table as a list, one item per row: `- **H1**: v1; **H2**: v2`."""
    tables = find_tables(text)
    if not tables:
        return text
    lines = text.split("\n")
    out: list[str] = []
    cursor = 0
    for start, end in tables:
        out.extend(lines[cursor:start])
        header = _cells(lines[start])
        for row in lines[start + 2 : end]:
            cells = _cells(row)
            pairs = [
                f"**{h}**: {c}" if h else c
                for h, c in zip(header, cells + [""] * (len(header) - len(cells)), strict=False)
                if c
            ]
            out.append("- " + "; ".join(pairs))
        cursor = end
    out.extend(lines[cursor:])
    return "\n".join(out)


def _hard_split(text: str, limit: int) -> list[str]:
    return [text[i : i + limit] for i in range(0, len(text), limit)]


def split_text(text: str, limit: int) -> list[str]:
    """Split into parts of at most `limit` characters, at paragraph boundaries when possible,
    then at line boundaries, then anywhere. A code fence cut in two is closed at the end of one
    part and reopened at the start of the next, so every part renders on its own."""
    if len(text) <= limit:
        return [text]
    budget = limit - 2 * (len(_FENCE) + 1)  # room to close and reopen a fence
    parts: list[str] = []
    current = ""
    for block in re.split(r"(\n\n)", text):
        pieces = [block] if len(block) <= budget else _split_lines(block, budget)
        for piece in pieces:
            if len(current) + len(piece) > budget and current:
                parts.append(current)
                current = ""
            current += piece
    if current.strip():
        parts.append(current)
    return _balance_fences([p.strip("\n") for p in parts if p.strip()])


def _split_lines(block: str, budget: int) -> list[str]:
    out: list[str] = []
    for line in block.splitlines(keepends=True):
        out.extend([line] if len(line) <= budget else _hard_split(line, budget))
    return out


def _balance_fences(parts: list[str]) -> list[str]:
    out: list[str] = []
    open_fence = False
    for part in parts:
        text = f"{_FENCE}\n{part}" if open_fence else part
        if text.count(_FENCE) % 2 == 1:
            open_fence = True
            text += f"\n{_FENCE}"
        else:
            open_fence = False
        out.append(text)
    return out
