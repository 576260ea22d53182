"""XLSX with openpyxl in read-only mode (rows streamed, not the whole workbook in memory): each
sheet from the first as a Markdown table of its cached cell values (what Excel last showed)."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import openpyxl

from .budget import Budget, add_table, note, number, span, table_rows
from .results import Extract, Failure, Kind, Limits, Refused


def extract_xlsx(data: bytes, name: str, limits: Limits) -> Extract:
    try:
        workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True, keep_links=False)
    except (KeyError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise Refused(Failure.UNREADABLE, f"XLSX: {e}", kind=Kind.XLSX) from e
    try:
        return _sheets(workbook, name, limits)
    finally:
        workbook.close()


def _sheets(workbook: Any, name: str, limits: Limits) -> Extract:
    sheets = list(workbook.worksheets)
    budget = Budget(limits.max_chars)
    clauses: list[str] = []  # the sheets shown in part
    looked = 0  # sheets from the first looked at: shown whole or in part, or empty
    any_cells = False
    for index, sheet in enumerate(sheets[: limits.max_sheets]):
        title = str(sheet.title)
        declared = sheet.max_row if isinstance(sheet.max_row, int) else None  # from <dimension>, if any
        raw = sheet.iter_rows(max_row=limits.max_rows, max_col=limits.max_columns + 1, values_only=True)
        rows, widest = table_rows(raw, limits.max_columns, limits.max_cell)
        if not rows:
            looked += 1
            continue
        any_cells = True
        added, _ = add_table(budget, rows, heading=f"## Sheet {index + 1}: {title}")
        if not added:
            break
        looked += 1
        label = f"sheet {index + 1} “{title}”"
        if added < len(rows) or (declared is not None and declared > limits.max_rows):
            of = f" of {number(declared)}" if declared else ""
            clauses.append(f"{label}: first {number(added)} rows{of}")
        if widest > limits.max_columns:
            columns = sheet.max_column if isinstance(sheet.max_column, int) else None
            of = f" of {number(columns)}" if columns else ""
            clauses.append(f"{label}: first {limits.max_columns} columns{of}")
        if budget.full:
            break
    if not any_cells:
        raise Refused(Failure.EMPTY, "XLSX without values", kind=Kind.XLSX)
    if looked < len(sheets):
        clauses.insert(0, f"sheets {span(1, looked)} of {len(sheets)}" if looked else f"none of {len(sheets)} sheets")
    truncated = note(*clauses) if clauses else None
    return Extract(Kind.XLSX, name, budget.text(), truncated, len(sheets))
