"""Summarize py-spy raw profiles of the gateway: `python -m bench.profile FILE...` prints where the
time goes (own time per function, and inclusive time of the gateway's own functions).

Record them with `BENCH_PROFILE=1 python -m bench --keep ...` (needs `py-spy`, see
bench/requirements.txt): every gateway process is sampled while it runs.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

OWN = ("gateway/", "handlers/")


def summarize(paths: list[Path], top: int = 25) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            leaf = frames[-1]
            if "select (" in leaf and "selectors.py" in leaf:
                idle += n
                continue
            own[_short(leaf)] += n
            for name in {_short(f) for f in frames if any(o in f for o in OWN)}:
                inclusive[name] += n
    busy = max(1, total - idle)
    out = [
        f"{total} samples, {idle / max(1, total):.0%} idle in select(); shares below are of the busy samples",
        "",
    ]
    out.append("own time (leaf function):")
    out += [f"  {n / busy:6.1%}  {name}" for name, n in own.most_common(top)]
    out.append("")
    out.append("inclusive time of gateway/handlers functions:")
    out += [f"  {n / busy:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def _short(frame: str) -> str:
    """'func (path/to/site-packages/pkg/mod.py:12)' -> 'func (pkg/mod.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", "/wt/", "/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


if __name__ == "__main__":
    print(summarize([Path(p) for p in sys.argv[1:]]))
