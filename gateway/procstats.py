"""The standard `process_*` metrics (CPU, memory, file descriptors, start time), read from
/proc/self only, so they exist under the systemd unit's `ProcSubset=pid`.

prometheus_client's ProcessCollector reads the boot time from /proc/stat and exports nothing at all
when that file is missing, which is what `ProcSubset=pid` does (systemd.exec(5)): the CPU alert and
the restart-loop alert would see no series. Everything here comes from files that stay visible
(/proc/self/stat, /proc/self/fd) and from system calls: the clock tick and page size from
sysconf(3), the fd limit from getrlimit(2), and the boot time from the clocks, CLOCK_REALTIME minus
CLOCK_BOOTTIME, the same clock the kernel counts a process's start in (proc(5): `starttime`, field
22 of /proc/<pid>/stat, clock ticks since boot). The names, types and units are the ones
ProcessCollector exports, so standard dashboards and rules keep working.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterable
from pathlib import Path

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

SELF = Path("/proc/self")

# Indexes into the fields after the command name's closing parenthesis (field 3, `state`, is 0):
# proc(5) numbers them from 1, so field n is at n - 3.
UTIME, STIME, STARTTIME, VSIZE, RSS = 14 - 3, 15 - 3, 22 - 3, 23 - 3, 24 - 3


def boot_time() -> float:
    """When the machine booted, in Unix seconds, without /proc/stat."""
    return time.clock_gettime(time.CLOCK_REALTIME) - time.clock_gettime(time.CLOCK_BOOTTIME)


class ProcessMetrics(Collector):
    """`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
    `process_start_time_seconds`, `process_open_fds`, `process_max_fds` of this process; nothing
    where /proc/self is not there (not Linux)."""

    def __init__(self, registry: CollectorRegistry, proc: Path = SELF) -> None:
        self._proc = proc
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._page = float(resource.getpagesize())
        # Fixed for the life of the process: computed once, so the series only changes on a restart.
        self._start: float | None = None
        with contextlib.suppress(OSError):  # no /proc/self: not Linux, no series
            self._start = boot_time() + float(self._fields()[STARTTIME]) / self._ticks
        registry.register(self)

    def _fields(self) -> list[bytes]:
        # The command name (field 2) may hold spaces and parentheses: split after its last ")".
        return (self._proc / "stat").read_bytes().rpartition(b")")[2].split()

    def collect(self) -> Iterable[Metric]:
        if self._start is None:
            return
        try:
            fields = self._fields()
            open_fds = len(os.listdir(self._proc / "fd"))
        except OSError:
            return
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            value=(float(fields[UTIME]) + float(fields[STIME])) / self._ticks,
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            value=float(fields[RSS]) * self._page,
        )
        yield GaugeMetricFamily(
            "process_virtual_memory_bytes", "Virtual memory size in bytes.", value=float(fields[VSIZE])
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            value=self._start,
        )
        yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", value=open_fds)
        yield GaugeMetricFamily(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            value=float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
        )
