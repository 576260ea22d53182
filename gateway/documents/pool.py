"""`DocumentExtractor`: untrusted files parsed in worker processes, driven from asyncio.

One fresh worker process per document (`python -I -c ...` running `worker.main`, an environment of
only PATH and LANG, cwd `/`), started with asyncio's subprocess support: a fork-and-exec, never a bare fork
of the gateway process (it has threads and an event loop). A fresh process per document means a job
that runs out of time or memory is killed alone, and nothing one file did is left for the next; it
costs the interpreter's start and one parser library's import per document (README "Dependencies"
has the numbers). At most `Limits.workers` run at once; more wait for a free one.

Results come back as a length-capped JSON frame on the worker's stdout, never as pickles from a
process that just parsed a hostile file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from asyncio.subprocess import Process
from dataclasses import asdict, dataclass
from pathlib import Path

from . import worker
from .results import MIB, ExtractFailure, Failure, Limits, Result

log = logging.getLogger(__name__)

ROOT = str(Path(__file__).resolve().parents[2])  # where `gateway` is importable from
BOOTSTRAP = f"import sys; sys.path.insert(0, {ROOT!r}); from gateway.documents.worker import main; sys.exit(main())"
WORKER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # none of the gateway's secrets
MAX_NAME = 255  # characters of the claimed name the worker gets
REPLY_SLACK = 1 * MIB  # on top of 4 bytes per character of text: JSON fields, notes, details
CPU_SIGNALS = frozenset({getattr(signal, "SIGXCPU", -1)})  # RLIMIT_CPU's soft limit


@dataclass(slots=True)
class Counts:
    """What the extractor did since it started, for metrics and tests."""

    started: int = 0  # worker processes started
    timeouts: int = 0  # killed past the wall time, or stopped by their CPU limit
    died: int = 0  # ended without a reply: a crash, a signal, the memory limit outside Python's reach
    refused_size: int = 0  # too large: no worker started


class DocumentExtractor:
    """`await extract(data, name)` → `Extract` or `ExtractFailure`; never raises for a bad file.

    `close()` at the end kills what still runs (`context.documents_context` does it for an app)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.counts = Counts()
        self._slots = asyncio.Semaphore(self.limits.workers)
        self._running: set[Process] = set()
        self._closed = False

    @property
    def running(self) -> int:
        """Documents being parsed now."""
        return len(self._running)

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids, for diagnostics."""
        return [process.pid for process in self._running]

    async def close(self) -> None:
        """Kill running workers; documents still waiting for one get `unreadable` ("shutting down")."""
        self._closed = True
        for process in list(self._running):
            _kill(process)
        for process in list(self._running):
            await process.wait()

    async def extract(self, data: bytes, name: str) -> Result:
        limits = self.limits
        if len(data) > limits.max_bytes:
            self.counts.refused_size += 1
            return ExtractFailure(Failure.TOO_LARGE, name, f"{len(data)} bytes (limit {limits.max_bytes})")
        if not data:
            return ExtractFailure(Failure.EMPTY, name, "no bytes")
        async with self._slots:
            if self._closed:
                return ExtractFailure(Failure.UNREADABLE, name, "shutting down")
            result = await self._run(data, name)
        if not result.ok:  # the file's name stays out of the log: it is the sender's content
            kind = str(result.kind) if result.kind else None
            fields = {"failure": str(result.failure), "kind": kind, "bytes": len(data), "detail": result.detail}
            log.info("document not read", extra=fields)
        return result

    async def _run(self, data: bytes, name: str) -> Result:
        limits = self.limits
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-c",
                BOOTSTRAP,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=WORKER_ENV,
                cwd="/",
            )
        except OSError as e:  # out of processes or file descriptors: this document fails, not the caller
            log.warning("could not start a document worker: %s", e)
            return ExtractFailure(Failure.UNREADABLE, name, f"could not start a worker: {e}")
        self.counts.started += 1
        self._running.add(process)
        try:
            async with asyncio.timeout(limits.timeout):
                payload = await _exchange(process, data, name, limits)
        except TimeoutError:
            self.counts.timeouts += 1
            return ExtractFailure(Failure.TIMEOUT, name, f"no result within {limits.timeout:g}s")
        finally:
            _kill(process)
            await process.wait()  # reaped even when cancelled: the kill makes this immediate
            self._running.discard(process)
        if payload is not None:
            return worker.decode(payload, name)
        code = process.returncode
        elapsed = time.monotonic() - started
        if self._closed:
            return ExtractFailure(Failure.UNREADABLE, name, "shutting down")
        if code is not None and -code in CPU_SIGNALS:
            self.counts.timeouts += 1
            return ExtractFailure(Failure.TIMEOUT, name, f"CPU time limit after {elapsed:.1f}s")
        self.counts.died += 1
        return ExtractFailure(Failure.UNREADABLE, name, f"worker died (exit code {code}) after {elapsed:.1f}s")


async def _exchange(process: Process, data: bytes, name: str, limits: Limits) -> bytes | None:
    """Send the job, read the reply frame; None if the worker ended without a (well-sized) one."""
    assert process.stdin is not None and process.stdout is not None
    job = {"name": name[-MAX_NAME:], "size": len(data), "limits": asdict(limits)}  # the end keeps the suffix
    header = json.dumps(job).encode() + b"\n"
    try:
        process.stdin.write(header)
        process.stdin.write(data)
        await process.stdin.drain()
        process.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        return None  # died before it read the document: its exit code tells why
    try:
        (size,) = worker.FRAME.unpack(await process.stdout.readexactly(worker.FRAME.size))
        if size > 4 * limits.max_chars + REPLY_SLACK:
            return None
        return await process.stdout.readexactly(size)
    except asyncio.IncompleteReadError:
        return None


def _kill(process: Process) -> None:
    """SIGKILL, unless asyncio has seen it exit. Not `process.kill()`: that polls (waitpid) first, and
    a worker that just exited would be reaped there, behind asyncio's back, which then reports its exit
    code as 255 instead of the signal that ended it (a zombie ignores the signal; its pid is not reused
    before asyncio reaps it)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
