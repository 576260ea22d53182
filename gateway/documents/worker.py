"""The worker process: one per document, a fresh interpreter, confined before it reads the file.

Protocol (`pool` is the other side): on stdin one JSON line `{"name", "size", "limits"}`, then `size`
bytes of the document; on stdout one frame, an 8-byte big-endian length and the result as JSON.
The worker limits itself (address space, CPU seconds, no core dumps, lower priority) before it reads
the document; anything a parser prints goes to /dev/null, not into the reply.

Run as `python -m gateway.documents.worker`; the pool starts it as `python -I -c ...` (`pool.BOOTSTRAP`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
import sys
import warnings
from dataclasses import asdict, fields
from typing import Any, BinaryIO

from .results import Extract, ExtractFailure, Failure, Kind, Limits, Result

try:
    import resource
except ImportError:  # not on Windows: no limits there but the pool's wall time
    resource = None  # type: ignore[assignment]

NICENESS = 10  # parsing yields the CPU to the gateway's event loop
MAX_DETAIL = 300
MAX_HEADER = 64 * 1024
FRAME = struct.Struct(">Q")


def main() -> int:
    reply = os.fdopen(os.dup(1), "wb")  # the reply channel; fd 1 itself goes to /dev/null below
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    source = sys.stdin.buffer
    header = json.loads(source.readline(MAX_HEADER))
    name, size = str(header["name"]), int(header["size"])
    limits = limits_from(header["limits"])
    confine(limits)
    data = _read_exactly(source, size)
    result = run(data, name, limits)
    payload = encode(result)
    reply.write(FRAME.pack(len(payload)) + payload)
    reply.flush()
    return 0


def run(data: bytes, name: str, limits: Limits) -> Result:
    """Extract, parsers' warnings and logs silenced; whatever still escapes is `unreadable`."""
    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger().setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    try:
        from .extract import extract_document

        return extract_document(data, name, limits)
    except MemoryError:
        reason = "memory limit reached"
    except Exception as e:  # the last line: a reply, whatever happened
        reason = f"{type(e).__name__}: {e}"
    return ExtractFailure(Failure.UNREADABLE, name, reason[:MAX_DETAIL])


def confine(limits: Limits) -> None:
    """Address space, CPU seconds and core dumps limited; lower priority. Best effort off Linux."""
    if resource is None:
        return
    _limit(resource.RLIMIT_AS, limits.memory)
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = math.ceil(used.ru_utime + used.ru_stime + limits.timeout) + 1  # backs up the pool's wall-time kill
    _limit(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL at the hard one
    _limit(resource.RLIMIT_CORE, 0)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)


def _limit(which: int, soft: int, hard: int | None = None) -> None:
    assert resource is not None
    _, current_hard = resource.getrlimit(which)
    hard = soft if hard is None else hard
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def _read_exactly(source: BinaryIO, size: int) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = source.read(left)
        if not chunk:
            raise EOFError(f"document cut short: {size - left} of {size} bytes")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def limits_from(values: dict[str, Any]) -> Limits:
    known = {field.name for field in fields(Limits)}
    return Limits(**{key: value for key, value in values.items() if key in known})


def encode(result: Result) -> bytes:
    return json.dumps(asdict(result), ensure_ascii=False).encode()


def decode(payload: bytes, name: str) -> Result:
    """The worker's JSON back to a result; anything malformed becomes `unreadable`."""
    try:
        values: dict[str, Any] = json.loads(payload)
        if values.get("ok") is True:
            return Extract(
                Kind(values["kind"]),
                name,
                str(values["text"]),
                _optional_str(values.get("truncated_note")),
                _optional_int(values.get("pages_total")),
            )
        kind = values.get("kind")
        return ExtractFailure(
            Failure(values["failure"]),
            name,
            str(values.get("detail", ""))[:MAX_DETAIL],
            Kind(kind) if kind is not None else None,
            _optional_str(values.get("detected")),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return ExtractFailure(Failure.UNREADABLE, name, f"bad worker reply: {e}"[:MAX_DETAIL])


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) else None


if __name__ == "__main__":
    sys.exit(main())
