"""systemd/botgate.service: `systemd-analyze verify` passes, the sandbox scores "OK" (< 2.0), and the
gateway works inside that sandbox (emulated by tests/sandbox.py, since CI has no systemd as PID 1)."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.config import DispatcherConfig
from tests import sandbox
from tests.process import ROOT, GatewayProcess, self_signed

UNIT = ROOT / "systemd" / "botgate.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (Debian package: systemd)"
)


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
    result = subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [line for line in result.stderr.splitlines() if "botgate" in line]
    assert result.returncode == 0 and not complaints, result.stderr


@needs_analyze
def test_security_exposure_is_ok() -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
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
    assert s["ExecStart"] == [
        "/opt/botgate/.venv/bin/python /opt/botgate/run.py --config /etc/botgate/config.toml"
    ]
    assert s["StateDirectory"] == ["botgate"]  # -> $STATE_DIRECTORY, read by Config.state_dir
    assert s["EnvironmentFile"] == ["/etc/botgate/env"]
    # Stopping must outlast the drain plus aiohttp's shutdown_timeout (drain_timeout + 5).
    drain = DispatcherConfig().drain_timeout
    assert int(s["TimeoutStopSec"][0]) > drain + (drain + 5)
    # The watchdog pings at half the interval; it must leave room for a busy loop.
    assert int(s["WatchdogSec"][0]) >= 10


SANDBOX_UNSUPPORTED = sandbox.unsupported()


@pytest.mark.skipif(SANDBOX_UNSUPPORTED is not None, reason=f"sandbox emulation: {SANDBOX_UNSUPPORTED}")
async def test_gateway_works_inside_the_units_sandbox(
    spawn_gateway: Callable[..., GatewayProcess], openai_double: Any, tmp_path: Path
) -> None:
    """Seccomp allow list, address families, no W+X memory, no new privileges, as the unit sets them:
    a conversation through the model (outbound HTTP, name resolution, threads), TLS, reload, stop."""
    _, url = openai_double
    config = ""
    if shutil.which("openssl"):
        cert, key = await asyncio.to_thread(self_signed, tmp_path, "sandbox")
        config = f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    gw = spawn_gateway(
        config,
        env={"BOTGATE_MODEL__BASE_URL": url.replace("127.0.0.1", "localhost"), "WATCHDOG_USEC": "1000000"},
        start=False,
        wrapper=[sys.executable, str(ROOT / "tests" / "sandbox.py"), "--"],
    )
    await asyncio.to_thread(gw.start)
    scheme = "https" if config else "http"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{scheme}://127.0.0.1:{gw.port}/chat/ws?session=sandbox01", ssl=False) as ws,
    ):
        await ws.receive()
        await ws.send_str(orjson.dumps({"type": "message", "id": "1", "text": "inside the sandbox"}).decode())
        async with asyncio.timeout(20):
            while (frame := orjson.loads((await ws.receive()).data))["type"] not in (
                "done",
                "notice",
                "error",
            ):
                pass
    assert frame["type"] == "done" and frame["text"] == "echo: inside the sandbox", frame
    gw.signal(signal.SIGHUP)
    await gw.notify.await_for("RELOADING=1")
    assert await asyncio.to_thread(gw.stop) == 0, gw.output()  # killed by seccomp = -SIGSYS
    assert "Traceback" not in gw.output()
