"""Text files: TXT and Markdown as they are, CSV as a Markdown table (delimiter sniffed)."""

from __future__ import annotations

import csv
import io

from .budget import Budget, add_table, note, number, table_rows, tidy
from .results import Extract, Failure, Kind, Limits, Refused

SNIFF_SAMPLE = 64 * 1024
DELIMITERS = ",;\t|"


def extract_text(kind: Kind, text: str, name: str, limits: Limits) -> Extract:
    text = tidy(text.removeprefix("\ufeff"))
    if not text:
        raise Refused(Failure.EMPTY, "text file of blanks only", kind=kind)
    budget = Budget(limits.max_chars)
    budget.add_partly(text)
    truncated = None
    if budget.used < len(text):
        truncated = note(f"the first {number(budget.used)} of {number(len(text))} characters")
    return Extract(kind, name, budget.text(), truncated)


def extract_csv(text: str, name: str, limits: Limits, delimiter: str | None = None) -> Extract:
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise Refused(Failure.EMPTY, "CSV of blanks only", kind=Kind.CSV)
    delimiter = delimiter or _sniff(text[:SNIFF_SAMPLE])
    records: list[list[str]] = []
    total = 0  # rows with a value, all of the file's
    try:
        for record in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter):
            if not any(cell.strip() for cell in record):
                continue
            total += 1
            if total <= limits.max_rows:
                records.append(record)
    except csv.Error:
        return extract_text(Kind.CSV, text, name, limits)  # not really CSV: shown as the text it is
    rows, widest = table_rows(records, limits.max_columns, limits.max_cell)
    budget = Budget(limits.max_chars)
    added, _ = add_table(budget, rows)
    clauses = []
    if added < total:
        clauses.append(f"the first {number(added)} of {number(total)} rows")
    if widest > limits.max_columns:
        clauses.append(f"the first {limits.max_columns} of {widest} columns")
    return Extract(Kind.CSV, name, budget.text(), note(*clauses) if clauses else None)


def _sniff(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return ","
