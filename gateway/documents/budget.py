"""The character budget of an extract, Markdown tables, and the wording of truncation notes."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence

BLOCK_SEP = "\n\n"
MIN_PART = 200  # a block is cut only where at least this much of it fits (unless it is the first)
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")


class Budget:
    """Collects text blocks until `limit` characters; then it is `full` and takes nothing more."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.used = 0
        self.full = False

    @property
    def left(self) -> int:
        return self.limit - self.used

    def _sep(self, sep: str) -> str:
        return sep if self.parts else ""

    def fits(self, piece: str, sep: str = BLOCK_SEP) -> bool:
        return not self.full and len(self._sep(sep)) + len(piece) <= self.left

    def add(self, piece: str, sep: str = BLOCK_SEP) -> bool:
        """Add `piece` whole if it fits; else mark the budget full. True if it was added."""
        if not self.fits(piece, sep):
            self.full = True
            return False
        piece = self._sep(sep) + piece
        self.parts.append(piece)
        self.used += len(piece)
        return True

    def add_partly(self, piece: str, sep: str = BLOCK_SEP) -> int:
        """Add `piece`, cut at the budget (at a line or word end where one is near). 0 = nothing of it
        was added, 1 = part of it, 2 = all of it. After 0 or 1 the budget is full."""
        if self.full:
            return 0
        if self.add(piece, sep):
            return 2
        room = self.left - len(self._sep(sep))
        if room <= 0 or (self.parts and room < MIN_PART):
            return 0  # a few characters of a page would only be its marker
        cut = piece[:room]
        for boundary in ("\n", " "):
            at = cut.rfind(boundary)
            if at >= room // 2:
                cut = cut[:at]
                break
        cut = cut.rstrip()
        if not cut:
            return 0
        piece = self._sep(sep) + cut
        self.parts.append(piece)
        self.used += len(piece)
        return 1

    def text(self) -> str:
        return "".join(self.parts)


def tidy(text: str) -> str:
    """Line ends unified, trailing spaces and runs of blank lines dropped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def cell_text(value: object, max_cell: int) -> str:
    """One table cell as Markdown: pipes escaped, line breaks as <br>, long text cut."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        text = value.date().isoformat() if value.time() == dt.time() else value.isoformat(sep=" ")
    elif isinstance(value, dt.date | dt.time):
        text = value.isoformat()
    elif isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        text = str(int(value))
    else:
        text = str(value)
    text = text.strip()
    if len(text) > max_cell:
        text = text[: max_cell - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def table_rows(rows: Iterable[Sequence[object]], max_columns: int, max_cell: int) -> tuple[list[list[str]], int]:
    """Rows as cell texts, empty rows dropped, trailing empty columns trimmed, at most `max_columns`
    wide; and the widest row's width before that cap."""
    out: list[list[str]] = []
    widest = 0
    for row in rows:
        cells = [cell_text(value, max_cell) for value in row]
        while cells and not cells[-1]:
            cells.pop()
        if not cells:
            continue
        widest = max(widest, len(cells))
        out.append(cells[:max_columns])
    return out, widest


def markdown_row(cells: Sequence[str], width: int) -> str:
    padded = list(cells) + [""] * (width - len(cells))
    return "| " + " | ".join(padded) + " |"


def markdown_header(cells: Sequence[str], width: int) -> str:
    """The header row (the table's first row) and the separator line under it."""
    return markdown_row(cells, width) + "\n" + "|" + "---|" * width


def add_table(budget: Budget, rows: Sequence[Sequence[str]], heading: str = "") -> tuple[int, bool]:
    """Add a Markdown table (first row as header), row by row until the budget is full.

    Returns (rows added, header row included); a table whose header does not fit adds nothing."""
    if not rows:
        return 0, False
    width = max(len(row) for row in rows)
    head = (heading + "\n\n" if heading else "") + markdown_header(rows[0], width)
    if not budget.add(head):
        return 0, False
    added = 1
    for row in rows[1:]:
        if not budget.add(markdown_row(row, width), sep="\n"):
            break
        added += 1
    return added, True


def number(n: int) -> str:
    return f"{n:,}"


def span(first: int, last: int) -> str:
    """ "1–12", or "3" when the span is one."""
    return number(first) if first == last else f"{number(first)}–{number(last)}"


def note(*clauses: str) -> str:
    return "(truncated: " + "; ".join(clause for clause in clauses if clause) + ")"


def parts_note(unit: str, shown: int, partial: bool, total: int) -> str:
    """E.g. "(truncated: pages 1–12 of 40)", "(truncated: pages 1–12 of 40, and the start of page 13)"."""
    plural = unit + "s"
    if shown:
        clause = f"{plural if shown > 1 else unit} {span(1, shown)} of {number(total)}"
        if partial:
            clause += f", and the start of {unit} {number(shown + 1)}"
    else:
        clause = f"the start of {unit} 1 of {number(total)}"
    return note(clause)
