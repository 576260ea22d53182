"""PPTX text with python-pptx: slide by slide from the first, its shapes' text (groups included),
tables as Markdown tables, and the speaker notes."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import pptx
from pptx.shapes.base import BaseShape
from pptx.shapes.graphfrm import GraphicFrame
from pptx.shapes.group import GroupShape
from pptx.slide import Slide

from .budget import Budget, add_table, note, parts_note, span, table_rows, tidy
from .results import Extract, Failure, Kind, Limits, Refused

MAX_DEPTH = 20  # nested groups followed at most


def extract_pptx(data: bytes, name: str, limits: Limits) -> Extract:
    try:
        presentation = pptx.Presentation(io.BytesIO(data))
    except (ValueError, KeyError) as e:  # python-pptx's words for a package that is not a presentation
        raise Refused(Failure.UNREADABLE, f"PPTX: {e}", kind=Kind.PPTX) from e
    slides = list(presentation.slides)
    total = len(slides)
    if not total:
        raise Refused(Failure.EMPTY, "PPTX without slides", kind=Kind.PPTX)
    budget = Budget(limits.max_chars)
    shown, partial, with_text = 0, False, 0
    for number, slide in enumerate(slides[: limits.max_pages], start=1):
        text = _slide(slide, number, limits)
        if text is None:
            shown += 1
            continue
        with_text += 1
        added = budget.add_partly(text)
        if added == 2:
            shown += 1
            continue
        partial = added == 1
        break
    if not with_text:
        raise Refused(Failure.EMPTY, "PPTX without text", kind=Kind.PPTX)
    truncated = None
    if shown < total:
        capped = note(f"slides {span(1, shown)} of {total:,}")
        truncated = parts_note("slide", shown, partial, total) if budget.full else capped
    return Extract(Kind.PPTX, name, budget.text(), truncated, total)


def _slide(slide: Slide, number: int, limits: Limits) -> str | None:
    """The slide as text, or None if it has none."""
    lines: list[str] = []
    title_shape = slide.shapes.title
    title = tidy(title_shape.text_frame.text) if title_shape is not None and title_shape.has_text_frame else ""
    for shape in _shapes(slide.shapes, 0):
        if shape is title_shape or (title_shape is not None and shape.shape_id == title_shape.shape_id):
            continue
        if shape.has_text_frame:
            text = tidy(shape.text_frame.text)  # type: ignore[attr-defined]
            if text:
                lines.append(text)
        elif isinstance(shape, GraphicFrame) and shape.has_table:
            cells = ([cell.text for cell in row.cells] for row in shape.table.rows)
            rows, _ = table_rows(cells, limits.max_columns, limits.max_cell)
            if rows:
                table = Budget(limits.max_chars)
                add_table(table, rows)
                lines.append(table.text())
    if slide.has_notes_slide:
        notes_frame = slide.notes_slide.notes_text_frame
        notes = tidy(notes_frame.text) if notes_frame is not None else ""
        if notes:
            lines.append("Notes: " + notes)
    if not title and not lines:
        return None
    head = f"[Slide {number}]" + (f" {title}" if title else "")
    return "\n".join([head, *lines])


def _shapes(shapes: Iterable[BaseShape], depth: int) -> Iterator[BaseShape]:
    for shape in shapes:
        if isinstance(shape, GroupShape):
            if depth < MAX_DEPTH:
                yield from _shapes(shape.shapes, depth + 1)
        else:
            yield shape
