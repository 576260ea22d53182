"""DOCX text with python-docx: the body's paragraphs and tables in document order.

Headings become Markdown headings, tables Markdown tables. Headers, footers, footnotes, comments and
text boxes are left out (python-docx does not reach text boxes; the rest is rarely what is asked about).
"""

from __future__ import annotations

import io

import docx
from docx.table import Table
from docx.text.paragraph import Paragraph

from .budget import Budget, add_table, note, number, table_rows
from .results import Extract, Failure, Kind, Limits, Refused


def extract_docx(data: bytes, name: str, limits: Limits) -> Extract:
    try:
        document = docx.Document(io.BytesIO(data))
    except (ValueError, KeyError) as e:  # python-docx's words for a package that is not a Word document
        raise Refused(Failure.UNREADABLE, f"DOCX: {e}", kind=Kind.DOCX) from e
    budget = Budget(limits.max_chars)
    total = 0  # characters of the whole document as rendered (tables: their cells' text)
    for block in document.iter_inner_content():
        if isinstance(block, Paragraph):
            text = _paragraph(block)
            if not text:
                continue
            total += len(text)
            if not budget.full:
                budget.add_partly(text)
        elif isinstance(block, Table):
            cells = ([cell.text for cell in row.cells] for row in block.rows)
            rows, _ = table_rows(cells, limits.max_columns, limits.max_cell)
            total += sum(len(cell) for row in rows for cell in row)
            if not budget.full:
                added, _ = add_table(budget, rows)
                if added < len(rows):
                    budget.full = True
    if not total:
        raise Refused(Failure.EMPTY, "DOCX without text", kind=Kind.DOCX)
    truncated = None
    if budget.full:
        truncated = note(f"the first {number(budget.used)} characters of about {number(max(total, budget.used))}")
    return Extract(Kind.DOCX, name, budget.text(), truncated)


def _paragraph(paragraph: Paragraph) -> str:
    text = paragraph.text.strip()
    if not text:
        return ""
    style = paragraph.style.name if paragraph.style is not None else ""
    if style and style.startswith("Heading "):
        level = style.removeprefix("Heading ")
        if level.isdigit():
            return "#" * min(int(level), 6) + " " + text
    if style == "Title":
        return "# " + text
    return text
