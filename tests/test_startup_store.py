"""`python run.py` with its store: durable SQLite by default, exit 2 with a clear line when the
store cannot be opened."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.redisd import free_port

REPO = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, body: str) -> tuple[Path, int]:
    port = free_port()
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n{body}\n')
    return path, port


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BOTGATE_")}


def run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run.py", "--config", str(config)],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60, check=False,
    )


def test_unreachable_redis_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    dead = free_port()
    config, _ = write_config(tmp_path, f'[store]\nurl = "redis://:pw-secret@127.0.0.1:{dead}/0"')
    result = run(config)
    assert result.returncode == 2
    assert f"store error: redis redis://127.0.0.1:{dead}/0: unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert "pw-secret" not in result.stderr + result.stdout


def test_unusable_sqlite_location_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config, _ = write_config(tmp_path, f'state_dir = "{blocker}"')
    result = run(config)
    assert result.returncode == 2
    assert f"store error: sqlite {blocker}/botgate.sqlite3: cannot open" in result.stderr
    assert "Traceback" not in result.stderr


def test_default_install_keeps_state_in_sqlite_under_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config, port = write_config(tmp_path, f'state_dir = "{state}"')
    proc = subprocess.Popen(
        [sys.executable, "run.py", "--config", str(config)],
        cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # bounded wait for the listener
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "gateway did not start"
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    with sqlite3.connect(state / "botgate.sqlite3") as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert {"inbox", "dedup", "context", "cache", "buckets"} <= tables
