"""Run a command under the kernel-enforced parts of systemd/botgate.service's sandbox, without systemd.

`python tests/sandbox.py -- CMD...` applies, then execs CMD:
- NoNewPrivileges=yes                           -> PR_SET_NO_NEW_PRIVS
- MemoryDenyWriteExecute=yes                    -> PR_SET_MDWE (Linux >= 6.3; what systemd >= 257 uses)
- SystemCallFilter= / SystemCallArchitectures=  -> a seccomp allow list built from the unit's lines,
  expanded with `systemd-analyze syscall-filter`; other calls fail with EPERM (SystemCallErrorNumber=),
  a foreign architecture's calls kill the process. (EPERM, not a kill: as root, which tests may run
  as, SQLite fchown()s its journal and copes with EPERM; the service user never makes that call.)
- RestrictAddressFamilies=                      -> other socket() families fail with EAFNOSUPPORT, as
  under systemd (glibc's getaddrinfo probes AF_NETLINK and copes with that)
- ProcSubset= / ProtectProc=                     -> a private /proc mounted with subset=pid and hidepid=
  (/proc/stat, /proc/meminfo... are gone, as under the unit); needs root, skipped otherwise:
  `proc_unsupported()` says so
CI has no systemd as PID 1, so this is how tests show that Python and aiohttp work inside the sandbox.
Only x86_64 is supported; `unsupported()` says why it cannot run here.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "botgate.service"
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")

PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 22, 38, 65, 1
SECCOMP_MODE_FILTER = 2
RET_ALLOW, RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
RET_EPERM, RET_EAFNOSUPPORT = 0x00050000 | 1, 0x00050000 | 97  # SECCOMP_RET_ERRNO | errno
AUDIT_ARCH_X86_64 = 0xC000003E
LD_ABS, JEQ, RET = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
NR_SOCKET = 41
FAMILIES = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6}
CLONE_NEWNS, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x20000, 2, 4, 8, 0x4000, 1 << 18


def unsupported() -> str | None:
    if platform.machine() != "x86_64":
        return "the seccomp filter is built for x86_64 only"
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze not installed (Debian package: systemd)"
    if not UNISTD.exists():
        return f"{UNISTD} missing (Debian package: linux-libc-dev)"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE + 1, 0, 0, 0, 0) < 0:  # PR_GET_MDWE
        return "kernel without PR_SET_MDWE (needs Linux 6.3+)"
    return None


def proc_unsupported() -> str | None:
    if os.geteuid() != 0:
        return "mounting a private /proc (ProcSubset=, ProtectProc=) needs root"
    return None


def proc_options() -> bytes:
    """procfs mount options for the unit's ProcSubset= and ProtectProc= (systemd.exec(5))."""
    options = [f"subset={v}" for v in unit_values("ProcSubset") if v == "pid"]
    options += [f"hidepid={v}" for v in unit_values("ProtectProc") if v != "default"]
    return ",".join(options).encode()


def unit_values(key: str) -> list[str]:
    return [line.partition("=")[2] for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]


def expand(names: list[str], seen: set[str] | None = None) -> set[str]:
    """Syscall names, with `@group`s expanded the way systemd does."""
    seen = set() if seen is None else seen
    out: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            out.add(name)
            continue
        if name in seen:
            continue
        seen.add(name)
        listing = subprocess.run(
            ["systemd-analyze", "syscall-filter", name],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.splitlines()
        members = [line.strip() for line in listing[1:] if line.strip() and not line.strip().startswith("#")]
        out |= expand(members, seen)
    return out


def allowed_syscalls() -> set[str]:
    allowed: set[str] = set()
    for value in unit_values("SystemCallFilter"):
        names = value.split()
        if names and names[0].startswith("~"):
            allowed -= expand([names[0][1:], *names[1:]])
        else:
            allowed |= expand(names)
    return allowed


def syscall_numbers() -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", UNISTD.read_text())}


def build_filter() -> bytes:
    numbers = syscall_numbers()
    allowed = sorted(numbers[name] for name in allowed_syscalls() if name in numbers)
    families = [FAMILIES[f] for value in unit_values("RestrictAddressFamilies") for f in value.split()]
    prog: list[tuple[int, int, int, int]] = [
        (LD_ABS, 0, 0, 4),  # seccomp_data.arch
        (JEQ, 1, 0, AUDIT_ARCH_X86_64),
        (RET, 0, 0, RET_KILL_PROCESS),
        (LD_ABS, 0, 0, 0),  # seccomp_data.nr
    ]
    if NR_SOCKET in allowed:
        allowed.remove(NR_SOCKET)
        # socket(): allowed only for the unit's address families (low 32 bits of args[0]).
        prog.append((JEQ, 0, len(families) + 3, NR_SOCKET))
        prog.append((LD_ABS, 0, 0, 16))
        prog += [(JEQ, len(families) - i, 0, family) for i, family in enumerate(families)]
        prog.append((RET, 0, 0, RET_EAFNOSUPPORT))
        prog.append((RET, 0, 0, RET_ALLOW))
    for nr in allowed:
        prog.append((JEQ, 0, 1, nr))
        prog.append((RET, 0, 0, RET_ALLOW))
    prog.append((RET, 0, 0, RET_EPERM))
    return b"".join(struct.pack("HBBI", *insn) for insn in prog)


def apply() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]  # pointers must not be cut to int

    def prctl(*args: object) -> None:
        if libc.prctl(*args) != 0:
            raise OSError(ctypes.get_errno(), f"prctl{args[:2]}: {os.strerror(ctypes.get_errno())}")

    code = build_filter()
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(code) // 8, ctypes.addressof(buf))
    if proc_options() and proc_unsupported() is None:  # before seccomp, which refuses mount()
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
        if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, proc_options()) != 0:
            raise OSError(ctypes.get_errno(), f"mount -t proc -o {proc_options().decode()}")
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    apply()
    os.execv(argv[0], argv)
