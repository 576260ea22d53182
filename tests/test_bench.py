"""`python -m bench --quick` runs every benchmark scenario briefly, so the harness never rots.

Speed is not asserted (that is what the full run and BENCHMARKS.md are for): only that the run
exits 0 and that every scenario measured something. Every row must carry a positive number (and so
must its reference); the one exception is a row of the optional extra (the FastAPI + uvicorn
reference, bench/requirements.txt), which may be skipped when that extra is not installed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = (
    "1. Webhook ingress",
    "2. Stream ingress",
    "3. Gateway overhead",
    "4. Burst",
    "5. Memory",
    "6. Recovery",
    "7. Startup",
    "8. Hot-path costs",
    "9. Card streaming",
    "10. State growth",
    "11. Scale-out on Redis",
    "12. Answer throughput",
)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_bench_measures_every_scenario(tmp_path: Path) -> None:
    result = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(result)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["mode"] == "quick"
    assert report["errors"] == []
    rows = report["rows"]

    problems = []
    for scenario in SCENARIOS:
        if not any(r["scenario"] == scenario and _positive(r["value"]) for r in rows):
            problems.append(f"{scenario}: measured nothing")
    for r in rows:
        where = f"{r['scenario']} / {r['name']}"
        if r["skipped"]:
            if not r["optional"]:
                problems.append(f"{where}: skipped ({r['skipped']})")
            continue
        if not _positive(r["value"]):
            problems.append(f"{where}: no positive value ({r['value']!r})")
        if r["reference"] and not _positive(r["ref_value"]):
            problems.append(f"{where}: reference {r['reference']!r} has no positive value ({r['ref_value']!r})")
    assert not problems, "\n".join(problems)
