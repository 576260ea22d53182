"""A gateway in its own process (`python run.py --config ...`, settings from `BOTGATE_` env), for
tests that `kill -9` it, restart it on the same state, or run two of them side by side."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.redisd import listen_port

REPO = Path(__file__).resolve().parent.parent


def env_for(sections: dict[str, dict[str, Any]]) -> dict[str, str]:
    """`{"dingtalk": {"enabled": True}}` -> `{"BOTGATE_DINGTALK__ENABLED": "true"}`."""
    out = {}
    for section, values in sections.items():
        for key, value in values.items():
            text = ",".join(value) if isinstance(value, list) else str(value)
            out[f"BOTGATE_{section.upper()}__{key.upper()}"] = text.lower() if isinstance(value, bool) else text
    return out


class GatewayProcess:
    """One gateway's config, state directory and log; started, killed and restarted at will."""

    def __init__(self, workdir: Path, name: str, sections: dict[str, dict[str, Any]]) -> None:
        self.name = name
        self.port = listen_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / f"{name}.toml"
        # The file holds where to listen; everything else comes from the environment, as under systemd.
        self.config.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\nstate_dir = "{workdir / "state"}"\n'
        )
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("BOTGATE_")}
        self.env = {**inherited, **env_for(sections)}
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        assert self.proc is None, "already running"
        with self.log.open("ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "run.py", "--config", str(self.config)],
                cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        return self.proc

    async def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until it serves HTTP (its channels connect around the same time)."""
        proc = self._spawn()  # fork+exec: quick, and nothing to wait for
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as http:
            while True:  # the child is importing and opening its store: nothing to await on
                assert proc.poll() is None, f"{self.name} exited: {self.log.read_text()[-2000:]}"
                try:
                    async with http.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.02)

    def pause(self) -> None:
        """SIGSTOP: frames sent now stay unread in its socket, never ACKed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """`kill -9`: no shutdown hook, no drain, no final commit."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    async def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, as systemd stops it; returns the exit code."""
        assert self.proc is not None
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/readyz") as resp:
            return resp.status, await resp.json()

    def events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log lines (all runs) whose event is `event`."""
        lines = (orjson.loads(line) for line in self.log.read_bytes().splitlines() if line.startswith(b"{"))
        return [line for line in lines if line.get("event") == event]
