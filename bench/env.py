"""The machine under test: CPU pinning, free ports, process CPU/RSS readers, versions for the report."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository whose gateway is measured
PYTHON = sys.executable
HOST = "127.0.0.1"
PACKAGES = (
    "aiohttp",
    "orjson",
    "prometheus-client",
    "dingtalk-stream",
    "redis",
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "uvloop",
    "httptools",
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class Cores:
    """Where the server under test runs and where the load generator (this process, wrk) runs."""

    server: frozenset[int]
    load: frozenset[int]

    @property
    def separate(self) -> bool:
        return not (self.server & self.load)

    def describe(self) -> str:
        if not self.separate:
            return f"server and load generator share cores {sorted(self.server)} (one core available)"
        return f"server on core {_fmt(self.server)}, load generator on core {_fmt(self.load)}"


def _fmt(cores: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def plan_cores() -> Cores:
    """Server on the first usable core, everything else on the others (the same core if only one)."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return Cores(frozenset(usable), frozenset(usable))
    return Cores(frozenset(usable[:1]), frozenset(usable[1:]))


def pin_self(cores: Cores) -> None:
    os.sched_setaffinity(0, cores.load)


def raise_fd_limit() -> None:
    """Thousands of sockets in the burst and memory scenarios; children inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sched_wait_seconds(pid: int) -> float:
    """Time the process's threads were runnable but waiting for a CPU (other work on the core)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(stat.read_text().split()[1])
    return total / 1e9


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5)
    return (out.stdout + out.stderr).split("Copyright")[0].strip() or "wrk"


def load_average() -> str:
    """The 1-minute load average: other work on the machine makes every number noisier."""
    return f"{os.getloadavg()[0]:.2f}"


def machine_facts(usable: int) -> dict[str, str]:
    """What a reader needs to compare a BENCHMARKS.md with their own run."""
    mem_gb = os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30
    facts = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} ({usable} usable)",
        "memory": f"{mem_gb:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }
    wrk = wrk_path()
    facts["load generator"] = wrk_version(wrk) if wrk else "none (wrk not installed: scenario 1 failed)"
    facts["packages"] = ", ".join(f"{p} {v}" for p in PACKAGES if (v := version(p)))
    return facts
