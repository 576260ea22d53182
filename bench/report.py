"""Result rows, the console table, BENCHMARKS.md and the JSON that tests/test_bench.py reads."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class Row:
    scenario: str  # "1. Webhook ingress"
    name: str  # what was measured, e.g. "gateway, SQLite store"
    value: float | None = None
    unit: str = ""
    reference: str = ""  # what `ratio` divides by
    ref_value: float | None = None
    target: str = ""  # human text, e.g. ">= 0.7x bare"
    check: Callable[[Row], bool] | None = field(default=None, repr=False)
    note: str = ""
    skipped: str = ""  # why it did not run
    optional: bool = False  # a reference from the optional extra (bench/requirements.txt): may be skipped
    gap: str = ""  # for a missed target: why, and what would close the gap

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.ref_value:
            return None
        return self.value / self.ref_value

    @property
    def met(self) -> bool | None:
        if self.check is None or self.value is None:
            return None
        return self.check(self)


def at_least_ratio(x: float) -> Callable[[Row], bool]:
    return lambda row: row.ratio is not None and row.ratio >= x


def at_most_ratio(x: float) -> Callable[[Row], bool]:
    return lambda row: row.ratio is not None and row.ratio <= x


def at_least(limit: float) -> Callable[[Row], bool]:
    return lambda row: row.value is not None and row.value >= limit


def at_most(limit: float) -> Callable[[Row], bool]:
    return lambda row: row.value is not None and row.value <= limit


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()


def _status(row: Row) -> str:
    if row.skipped:
        return "skipped"
    return {True: "met", False: "MISSED", None: ""}[row.met]


def _cells(row: Row) -> list[str]:
    ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
    ref = f"{row.reference} = {fmt(row.ref_value, row.unit)}" if row.reference else ""
    value = fmt(row.value, row.unit) if not row.skipped else "-"
    return [row.scenario, row.name, value, ref, ratio, row.target, _status(row)]


HEADERS = ["scenario", "measured", "value", "reference (same run)", "ratio", "target", "status"]


def table(rows: Sequence[Row]) -> str:
    """Fixed-width table for the terminal, notes and skip reasons under each row."""
    lines = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(HEADERS)]
    out = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for row, cells in zip(rows, lines, strict=True):
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
        for extra in (f"skipped: {row.skipped}" if row.skipped else "", row.note):
            if extra:
                out.append(" " * (widths[0] + 2) + extra)
    return "\n".join(out)


def markdown(
    rows: Sequence[Row], facts: dict[str, str], setup: Sequence[str], command: str, label: str = ""
) -> str:
    out = [
        "# Benchmarks",
        "",
        *([f"> {label}", ""] if label else []),
        f"Measured with `{command}` on 127.0.0.1 against the local test doubles. Every value comes with",
        "a ratio to a reference measured in the same run, because absolute numbers drift on shared",
        "machines; compare ratios across machines, absolute values only on the same one.",
        "",
        "Reproduce: `apt-get install wrk` (Debian), `pip install -r bench/requirements.txt` (the optional",
        "FastAPI + uvicorn reference; without it those rows are skipped), then `python -m bench` from the",
        "repository root (about 30 minutes on 2 cores; `--only N`, `--keep` for the logs, `--json PATH` for",
        "the rows as JSON). `python -m bench --quick` runs every scenario for a moment (CI).",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in facts.items()),
        "",
        "## Setup",
        "",
        *(f"- {line}" for line in setup),
        "",
        "## Results",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + " --- |" * len(HEADERS),
    ]
    for row in rows:
        cells = _cells(row)
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out += ["", "## Notes per scenario"]
    current = ""
    for row in rows:
        if row.scenario != current:
            current = row.scenario
            out += ["", f"### {current}", ""]
        detail = (row.skipped and f"skipped: {row.skipped}") or row.note
        missed = row.met is False and row.gap
        if detail or missed:
            out.append(f"- **{row.name}**: {detail or fmt(row.value, row.unit)}")
        if missed:
            out.append(f"  - *Missed.* {row.gap}")
    out.append("")
    return "\n".join(out)


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def as_json(rows: Sequence[Row], errors: Sequence[str], quick: bool) -> str:
    """Every row as the table has it, plus whether it is optional: what a test can assert on."""
    return json.dumps(
        {
            "mode": "quick" if quick else "full",
            "errors": list(errors),
            "rows": [
                {
                    "scenario": r.scenario,
                    "name": r.name,
                    "value": None if r.skipped else _number(r.value),
                    "unit": r.unit,
                    "reference": r.reference,
                    "ref_value": _number(r.ref_value),
                    "ratio": _number(r.ratio),
                    "target": r.target,
                    "status": _status(r),
                    "skipped": r.skipped,
                    "optional": r.optional,
                }
                for r in rows
            ],
        },
        ensure_ascii=False,
        indent=1,
    )
