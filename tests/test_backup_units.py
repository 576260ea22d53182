"""systemd/botgate-backup.service and .timer: both verify, the sandbox scores well, and the
service's command lines, run as systemd would run them, leave a copy and prune old ones."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from gateway.store import SqliteStore
from tests.debian import tool
from tests.helpers import msg
from tests.process import ROOT

SERVICE = ROOT / "systemd" / "botgate-backup.service"
TIMER = ROOT / "systemd" / "botgate-backup.timer"
VENV_PYTHON = "/opt/botgate/.venv/bin/python"


def settings(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_units_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    # verify checks that each command's binary exists: the interpreter running the tests stands in
    # for /opt/botgate/.venv (arguments are not checked).
    (tmp_path / SERVICE.name).write_text(SERVICE.read_text().replace(VENV_PYTHON, sys.executable))
    (tmp_path / TIMER.name).write_text(TIMER.read_text())
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / SERVICE.name), str(tmp_path / TIMER.name)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    complaints = [line for line in result.stderr.splitlines() if "botgate" in line]
    assert result.returncode == 0 and not complaints, result.stderr
    calendar = subprocess.run(
        [analyze, "calendar", settings(TIMER)["OnCalendar"][0]], capture_output=True, text=True, timeout=30, check=False
    )
    assert calendar.returncode == 0 and "03:30:00" in calendar.stdout, calendar.stderr


def test_backup_service_sandbox_is_safe() -> None:
    analyze = tool("systemd-analyze", "systemd")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(SERVICE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score is not None, result.stdout + result.stderr
    assert float(score.group(1)) < 2.0


def expand(command: str, env: dict[str, str]) -> list[str]:
    """A command line as systemd runs it: split into words, `${NAME}` replaced by its value."""
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word) for word in shlex.split(command)]


def test_service_commands_make_a_copy_and_prune_old_ones(tmp_path: Path) -> None:
    state = tmp_path / "state"

    async def fill() -> None:
        store = SqliteStore(state / "botgate.sqlite3")
        await store.open()
        await store.admit(msg(1), ttl=600)
        await store.close()

    asyncio.run(fill())
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nstate_dir = "{state}"\n')
    unit = settings(SERVICE)
    env = {name: value for name, _, value in (item.partition("=") for item in shlex.split(unit["Environment"][0]))}
    assert env["BACKUP_DIR"].startswith("/var/lib/botgate/")  # inside StateDirectory: writable there
    backups = tmp_path / "backups"
    env["BACKUP_DIR"] = str(backups)  # as a drop-in would set it
    commands = [unit["ExecStartPre"][0], unit["ExecStart"][0], unit["ExecStartPost"][0]]
    process_env = {k: v for k, v in os.environ.items() if not k.startswith(("BOTGATE_", "STATE_DIRECTORY"))}

    def run_unit() -> list[str]:
        outputs = []
        for command in commands:
            line = (
                command.replace(VENV_PYTHON, sys.executable)
                .replace("/opt/botgate/run.py", str(ROOT / "run.py"))
                .replace("/etc/botgate/config.toml", str(config))
            )
            result = subprocess.run(
                expand(line, env), capture_output=True, text=True, timeout=60, env=process_env, check=False
            )
            assert result.returncode == 0, f"{line}: {result.stderr}"
            outputs.append(result.stdout)
        return outputs

    assert "backup ok" in run_unit()[1]
    (copy,) = backups.iterdir()
    # That copy, as if made before KEEP_DAYS: it goes at the next run; the new one and other files stay.
    first = copy.rename(backups / "botgate-20000101T033000Z.sqlite3")
    old = time.time() - (int(env["KEEP_DAYS"]) + 2) * 86400
    os.utime(first, (old, old))
    (backups / "notes.txt").write_text("kept")
    run_unit()
    names = sorted(p.name for p in backups.iterdir())
    assert first.name not in names
    assert len([n for n in names if n.startswith("botgate-")]) == 1 and "notes.txt" in names
