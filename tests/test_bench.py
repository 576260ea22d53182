"""`python -m bench --quick` runs every benchmark scenario briefly, so the harness never rots.

Speed is not asserted (that is what the full run and BENCHMARKS.md are for): only that every
scenario ran, or was skipped for a named missing prerequisite, without an error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_runs_every_scenario_without_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for scenario in ("1. Webhook ingress", "2. Stream ingress", "3. Gateway overhead", "4. Burst",
                     "5. Memory", "6. Recovery", "7. Startup", "8. Hot-path costs"):  # fmt: skip
        assert scenario in done.stdout, f"{scenario} missing from the table"
