"""systemd/botgate.service: `systemd-analyze verify` passes and the sandbox scores "OK" (< 2.0)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import DispatcherConfig
from tests.process import ROOT

UNIT = ROOT / "systemd" / "botgate.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian package: systemd)")


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists; this machine has no /opt/botgate, so point it at
    # the interpreter running the tests (arguments are not checked).
    unit = tmp_path / "botgate.service"
    unit.write_text(UNIT.read_text().replace("/opt/botgate/.venv/bin/python", sys.executable))
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    complaints = [line for line in result.stderr.splitlines() if "botgate" in line]
    assert result.returncode == 0 and not complaints, result.stderr


@needs_analyze
def test_security_exposure_is_ok() -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    match = re.search(r"Overall exposure level for botgate\.service: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < 2.0, result.stdout
    assert match.group(2) == "OK"
    # The score in docs/deploy.md is the one this unit gets.
    assert f"exposure {match.group(1)}" in (ROOT / "docs" / "deploy.md").read_text()


def test_unit_matches_what_the_app_expects() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == ["/opt/botgate/.venv/bin/python /opt/botgate/run.py --config /etc/botgate/config.toml"]
    assert s["StateDirectory"] == ["botgate"]  # -> $STATE_DIRECTORY, read by Config.state_dir
    assert s["EnvironmentFile"] == ["/etc/botgate/env"]
    # Stopping must outlast the drain plus aiohttp's shutdown_timeout (drain_timeout + 5).
    drain = DispatcherConfig().drain_timeout
    assert int(s["TimeoutStopSec"][0]) > drain + (drain + 5)
    # The watchdog pings at half the interval; it must leave room for a busy loop.
    assert int(s["WatchdogSec"][0]) >= 10
