"""systemd notifications from a real `python run.py`: READY, WATCHDOG, STOPPING, reload, start failures."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.sdnotify import Notifier
from tests.process import ROOT, GatewayProcess, NotifySocket


def first(received: list[list[str]], field: str) -> int:
    return next(i for i, fields in enumerate(received) if field in fields)


@pytest.mark.parametrize("address", ["abstract", "path"])
def test_ready_watchdog_stopping_in_order(
    spawn_gateway: Callable[..., GatewayProcess], address: str, tmp_path: Path
) -> None:
    # 0.2 s watchdog -> pings every 0.1 s; a short socket path keeps within sun_path's 108 bytes.
    gw = spawn_gateway(env={"WATCHDOG_USEC": "200000"}, start=False)
    if address == "path":
        gw.notify.close()
        gw.notify = NotifySocket(Path(f"/tmp/botgate-notify-{gw.port}"))
        gw.env["NOTIFY_SOCKET"] = gw.notify.env_value
    try:
        gw.start()
        ready = gw.notify.received[-1]
        assert f"STATUS=serving on http://127.0.0.1:{gw.port}" in ready
        with urllib.request.urlopen(f"{gw.url}/healthz", timeout=10) as resp:
            assert resp.status == 200  # READY=1 came after the socket was listening
        gw.notify.wait_for("WATCHDOG=1")
        gw.notify.wait_for("WATCHDOG=1")  # keeps pinging, not a one-off
        assert gw.stop() == 0
        gw.notify.drain()
    finally:
        gw.kill()
        if address == "path":
            Path(gw.notify.env_value).unlink(missing_ok=True)
    received = gw.notify.received
    assert first(received, "READY=1") < first(received, "WATCHDOG=1") < first(received, "STOPPING=1")
    assert any(f.startswith("STATUS=") for f in received[first(received, "STOPPING=1")])


def test_no_watchdog_pings_without_watchdog_usec(spawn_gateway: Callable[..., GatewayProcess]) -> None:
    gw = spawn_gateway()
    assert gw.stop() == 0
    gw.notify.drain()
    assert [f[0] for f in gw.notify.received] == ["READY=1", "STOPPING=1"]


def test_sighup_reloads_config_and_names_keys_needing_restart(
    spawn_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = spawn_gateway('[log]\nlevel = "INFO"\n')
    gw.config_path.write_text(
        '[log]\nlevel = "DEBUG"\n[model]\ntemperature = 0.1\n[dispatcher]\nmax_queue = 5\n'
    )
    gw.signal(signal.SIGHUP)
    assert gw.notify.wait_for("RELOADING=1")
    assert gw.notify.receive()[0] == "READY=1"

    gw.config_path.write_text("[log\n")  # broken: the running config stays
    gw.signal(signal.SIGHUP)
    gw.notify.wait_for("RELOADING=1")
    done = gw.notify.receive()
    assert done[0] == "READY=1" and "last reload failed" in done[1]
    with urllib.request.urlopen(f"{gw.url}/healthz", timeout=10) as resp:
        assert resp.status == 200
    assert gw.stop() == 0

    lines = gw.log_lines()
    reloaded = next(line for line in lines if str(line["message"]).startswith("config reloaded"))
    assert reloaded["restart_keys"] == ["dispatcher.max_queue"]
    assert reloaded["applied"] == ["model.temperature", "log.level"]  # docs/status.md
    assert reloaded["log_level"] == "DEBUG"
    failed = next(line for line in lines if str(line["message"]).startswith("reload failed"))
    assert "invalid TOML" in str(failed["message"])


def test_bind_error_exits_2_without_ready(spawn_gateway: Callable[..., GatewayProcess]) -> None:
    gw = spawn_gateway(start=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", gw.port))
        busy.listen()
        assert gw.spawn().wait(30) == 2
    assert f"cannot serve on 127.0.0.1:{gw.port}" in gw.stderr()
    assert "Traceback" not in gw.stderr()
    gw.notify.drain()
    assert not any("READY=1" in f for f in gw.notify.received)


def test_store_error_at_start_exits_2(spawn_gateway: Callable[..., GatewayProcess]) -> None:
    gw = spawn_gateway('[store]\nurl = "sqlite:////dev/null/botgate.db"\n', start=False)
    assert gw.spawn().wait(30) == 2
    assert "store error" in gw.stderr() and "Traceback" not in gw.stderr()


def test_notifier_is_inert_outside_systemd() -> None:
    notifier = Notifier(env={})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")  # no socket: nothing to send, nothing raised


def test_watchdog_meant_for_another_pid_is_ignored(tmp_path: Path) -> None:
    sock = NotifySocket()
    try:
        env = {"NOTIFY_SOCKET": sock.env_value, "WATCHDOG_USEC": "4000000"}
        assert Notifier(env={**env, "WATCHDOG_PID": "1"}).watchdog_interval is None
        assert Notifier(env=env).watchdog_interval == 2.0
    finally:
        sock.close()


def test_check_config_still_validates_and_exits(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\ntls_cert = "/nonexistent/cert.pem"\ntls_key = "/nonexistent/key.pem"\n')
    result: Any = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "server.tls_cert/tls_key: cannot load /nonexistent/cert.pem" in result.stderr
    assert "Traceback" not in result.stderr
