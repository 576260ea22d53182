"""`python run.py` as a real subprocess, synchronised on its systemd notifications (a fake $NOTIFY_SOCKET)."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson

from tests.redisd import listen_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A throw-away certificate and key for 127.0.0.1 (needs the openssl CLI)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def env_for(sections: dict[str, dict[str, object]]) -> dict[str, str]:
    """Config sections as the environment spells them: `{"dingtalk": {"enabled": True}}` ->
    `{"BOTGATE_DINGTALK__ENABLED": "true"}` (lists comma-separated)."""
    out = {}
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, bool):
                text = str(value).lower()
            else:
                text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            out[f"BOTGATE_{section.upper()}__{key.upper()}"] = text
    return out


class NotifySocket:
    """A unix datagram socket bound like systemd's; each datagram is a list of `KEY=value` fields."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        if path is None:
            name = f"botgate-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.received: list[list[str]] = []

    def _take(self) -> list[str]:
        fields = self.sock.recv(4096).decode().split("\n")
        self.received.append(fields)
        return fields

    def receive(self, timeout: float = START_TIMEOUT) -> list[str]:
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if not readable:
            raise TimeoutError(f"no notification within {timeout}s; got {self.received}")
        return self._take()

    async def areceive(self, within: float = START_TIMEOUT) -> list[str]:
        async with asyncio.timeout(within):
            data = await asyncio.get_running_loop().sock_recv(self.sock, 4096)
        fields = data.decode().split("\n")
        self.received.append(fields)
        return fields

    def wait_for(self, field: str, timeout: float = START_TIMEOUT) -> list[str]:
        while field not in (fields := self.receive(timeout)):
            pass
        return fields

    async def await_for(self, field: str, within: float = START_TIMEOUT) -> list[str]:
        while field not in (fields := await self.areceive(within)):
            pass
        return fields

    def drain(self) -> None:
        """Collect whatever is still queued (e.g. after the process exited)."""
        while select.select([self.sock], [], [], 0)[0]:
            self._take()

    def close(self) -> None:
        self.sock.close()


class GatewayProcess:
    """One gateway process: `start()` returns once READY=1 arrived, `stop()` sends SIGTERM."""

    def __init__(
        self,
        workdir: Path,
        config: str = "",
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.wrapper = wrapper or []  # e.g. tests/sandbox.py
        self.port = listen_port()  # not an ephemeral port, which a test's client socket could take first
        self.config_path = workdir / "config.toml"
        self.config_path.write_text(config)
        self.notify = NotifySocket()
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("BOTGATE_", "NOTIFY_SOCKET", "WATCHDOG_", "STATE_DIRECTORY"))
        }
        self.env.update(
            {
                "BOTGATE_SERVER__HOST": "127.0.0.1",
                "BOTGATE_SERVER__PORT": str(self.port),
                "NOTIFY_SOCKET": self.notify.env_value,
                "STATE_DIRECTORY": str(workdir / "state"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.update(env or {})
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> subprocess.Popen[bytes]:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, str(ROOT / "run.py"), "--config", str(self.config_path)],
                cwd=self.workdir,
                env=self.env,
                stdout=out,
                stderr=err,
            )
        return self.proc

    def start(self) -> GatewayProcess:
        proc = self.spawn()
        deadline = time.monotonic() + START_TIMEOUT
        # Short receive timeouts only so a process that dies during start-up is noticed at once.
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if "READY=1" in self.notify.receive(0.2):
                    return self
            except TimeoutError:
                continue
        raise RuntimeError(f"gateway did not become ready (exit {proc.poll()}):\n{self.output()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.notify.close()

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def output(self) -> str:
        return self.stdout() + self.stderr()

    def login_token(self) -> str:
        """The admin login token (no password set), from the login link the gateway logs at start."""
        urls = [line["login_url"] for line in self.log_lines() if isinstance(line.get("login_url"), str)]
        if not urls:
            raise AssertionError(f"no login link logged:\n{self.output()}")
        return parse_qs(urlsplit(str(urls[-1])).query)["token"][0]

    def admin_headers(self) -> dict[str, str]:
        """What a script on the gateway's machine sends to use the admin API and the web chat."""
        return {"Authorization": f"Bearer {self.login_token()}"}

    def log_lines(self) -> list[dict[str, object]]:
        """stdout parsed as JSON lines; a line that is not JSON fails the test. Lines end at "\n"
        only (a logged text may hold U+2028 or U+0085, which `splitlines` would also cut at); a
        last line still being written is left for the next call."""
        lines = self.stdout().split("\n")[:-1]
        return [orjson.loads(line) for line in lines if line.strip()]
