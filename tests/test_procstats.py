"""process_* metrics (gateway/procstats.py): the names and values prometheus_client's ProcessCollector
exports, and present where it exports nothing, under the unit's ProcSubset=pid (tests/sandbox.py)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway.procstats import ProcessMetrics
from tests import sandbox
from tests.process import ROOT, GatewayProcess

NAMES = {
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
}
PROC_STAT = Path("/proc/stat")
needs_linux = pytest.mark.skipif(not PROC_STAT.exists(), reason="needs Linux /proc")


def collected(collector: Any) -> dict[str, tuple[str, float]]:
    return {m.name: (m.type, m.samples[0].value) for m in collector.collect()}


@needs_linux
def test_same_series_as_prometheus_clients_process_collector() -> None:
    """Where /proc/stat is visible, the upstream collector is the oracle: same names, types, start
    time (to its one-second btime) and fd limit; memory and CPU within what changes between reads."""
    oracle = collected(ProcessCollector(registry=None))
    ours = collected(ProcessMetrics(CollectorRegistry()))
    assert {name: kind for name, (kind, _) in ours.items()} == NAMES
    assert {name: kind for name, (kind, _) in oracle.items()} == NAMES
    # /proc/stat's btime is whole seconds (truncated): upstream's start time is up to 1 s early.
    assert -0.05 < ours["process_start_time_seconds"][1] - oracle["process_start_time_seconds"][1] < 1.05
    assert ours["process_max_fds"] == oracle["process_max_fds"]
    assert abs(ours["process_open_fds"][1] - oracle["process_open_fds"][1]) <= 2
    assert abs(ours["process_resident_memory_bytes"][1] / oracle["process_resident_memory_bytes"][1] - 1) < 0.1
    assert -1e-9 <= ours["process_cpu_seconds"][1] - oracle["process_cpu_seconds"][1] < 1  # read later


def test_no_series_without_proc(tmp_path: Path) -> None:
    assert collected(ProcessMetrics(CollectorRegistry(), proc=tmp_path / "absent")) == {}


UNSUPPORTED = sandbox.unsupported() or sandbox.proc_unsupported() or (
    None if shutil.which("prlimit") else "prlimit not installed (Debian package util-linux)"
)
SANDBOX = [sys.executable, str(ROOT / "tests" / "sandbox.py"), "--"]


def inside_sandbox(code: str) -> str:
    result = subprocess.run(
        [*SANDBOX, sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout.strip()


def host_cpu_seconds(pid: int) -> float:
    """The process's CPU time as the host's /proc sees it (outside the sandbox's mount namespace)."""
    fields = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def scrape(url: str) -> tuple[set[str], dict[str, float]]:
    """The families /metrics describes (also those without a sample yet), and the unlabelled samples."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        families = list(text_string_to_metric_families(await resp.text()))
    return {f.name for f in families}, {s.name: s.value for f in families for s in f.samples}


def series_the_rules_read() -> set[str]:
    """Family names of the gateway's series in deploy/alerts.yml (not node_exporter's, `up`, or the
    recording rules' own `botgate:...` names)."""
    names = re.findall(r"\b((?:botgate|process)_[a-z_]+)", (ROOT / "deploy" / "alerts.yml").read_text())
    return {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in names}


@pytest.mark.skipif(UNSUPPORTED is not None, reason=f"sandbox emulation: {UNSUPPORTED}")
async def test_process_metrics_and_every_series_the_rules_read_under_the_units_sandbox(
    spawn_gateway: Callable[..., GatewayProcess],
) -> None:
    # The emulation reproduces what the unit does: no /proc/stat, so the upstream collector is empty.
    probe = (
        "import os, prometheus_client as p; "
        "print(os.path.exists('/proc/stat'), len(list(p.ProcessCollector(registry=None).collect())))"
    )
    assert await asyncio.to_thread(inside_sandbox, probe) == "False 0"

    # LimitNOFILE= as the unit would set it; the gateway must report its own limit, not a default.
    gw = spawn_gateway(start=False, wrapper=["prlimit", "--nofile=4096:4096", *SANDBOX])
    before = time.time()
    await asyncio.to_thread(gw.start)
    after = time.time()
    assert gw.proc is not None
    pid = gw.proc.pid  # prlimit and sandbox.py exec the gateway: the same pid
    cpu_low = await asyncio.to_thread(host_cpu_seconds, pid)
    exported, first = await scrape(gw.url)
    for _ in range(20):  # some work, so CPU time moves
        await scrape(gw.url)
    _, second = await scrape(gw.url)
    cpu_high = await asyncio.to_thread(host_cpu_seconds, pid)
    assert await asyncio.to_thread(gw.stop) == 0, gw.output()

    assert {"process_cpu_seconds_total", *NAMES} - {"process_cpu_seconds"} <= first.keys(), sorted(first)
    assert before - 1 < first["process_start_time_seconds"] <= after
    assert second["process_start_time_seconds"] == first["process_start_time_seconds"]  # no restart
    assert cpu_low <= first["process_cpu_seconds_total"] <= second["process_cpu_seconds_total"] <= cpu_high
    assert second["process_cpu_seconds_total"] > 0
    assert 20e6 < first["process_resident_memory_bytes"] < 1e9  # MemoryMax=1G in the unit
    assert first["process_virtual_memory_bytes"] > first["process_resident_memory_bytes"]
    assert first["process_max_fds"] == 4096
    assert 5 <= first["process_open_fds"] < 4096
    # Every alert can fire: each series it reads exists in the sandboxed gateway.
    assert series_the_rules_read() - exported == set()
