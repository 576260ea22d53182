"""Servers under test as pinned subprocesses: the gateway (`python run.py --config`) and the references."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .env import HOST, PYTHON, ROOT, Cores, cpu_seconds, free_port, rss_mb, sched_wait_seconds

SECRET = "bench-app-secret"  # the DingTalk/Feishu app secret the doubles and the gateway share
CLIENT_ID = "dingbench"
FEISHU_APP_ID = "cli_bench"


class ServerError(Exception):
    """A server under test did not start or died: the scenario fails (this is an error, not a miss)."""


def toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Just enough TOML for a config file: strings, numbers, booleans, lists of strings."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    out = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {value(v)}" for k, v in keys.items()]
        out.append("")
    return "\n".join(out)


class ServerProcess:
    """One server process pinned to the server cores; ready when `ready_path` answers 200."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        cores: Cores,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/readyz",
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.cores = cores
        self.workdir = workdir
        self.ready_path = ready_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BOTGATE_")}
        self.env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
        self.env.update(env or {})
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.log_path = workdir / f"{name}.log"
        self.state_dir: Path | None = None  # the gateway's [server] state_dir (SQLite file)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def usage_start(self) -> tuple[float, float, float]:
        return time.monotonic(), cpu_seconds(self.pid), sched_wait_seconds(self.pid)

    def usage_since(self, start: tuple[float, float, float]) -> str:
        """How busy the server was since `start`, and how long it waited for a CPU: a server that
        waited is sharing its core with other work, and its numbers are low for that reason."""
        elapsed = time.monotonic() - start[0]
        busy = (cpu_seconds(self.pid) - start[1]) / elapsed
        waited = (sched_wait_seconds(self.pid) - start[2]) / elapsed
        return f"server core busy {busy:.0%}, waiting for a CPU {waited:.0%} of the time"

    async def start(self, within: float = 30.0) -> float:
        """Start and wait for readiness; returns seconds from spawn to the first 200."""
        cores = self.cores.server
        log = self.log_path.open("ab")  # handed to the child, closed below
        try:
            self.started_at = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=lambda: os.sched_setaffinity(0, cores),
            )
        finally:
            log.close()
        return await self.wait_ready(within)

    async def wait_ready(self, within: float = 30.0) -> float:
        deadline = self.started_at + within
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.proc is not None
                if self.proc.returncode is not None:
                    raise ServerError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(self.url + self.ready_path) as resp:
                        if resp.status == 200:
                            return time.monotonic() - self.started_at
                if time.monotonic() > deadline:
                    raise ServerError(f"{self.name} not ready after {within:.0f} s: {self.tail()}")
                await asyncio.sleep(0.005)

    def admin_headers(self) -> dict[str, str]:
        """The gateway's admin login token (no password is set), from the login link it logs at start:
        the web chat needs it like every admin surface."""
        for line in reversed(self.log_path.read_text(errors="replace").splitlines()):
            if '"login_url"' in line:
                url = str(orjson.loads(line)["login_url"])
                return {"Authorization": f"Bearer {url.partition('?token=')[2]}"}
        raise ServerError(f"{self.name} logged no login link: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    async def stop(self, within: float = 10.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(within):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def __aenter__(self) -> ServerProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def gateway_sections(
    port: int,
    model_url: str | None,
    store: str = "memory://",
    **overrides: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """The bench's gateway config. Deliberate differences from the shipped defaults are listed in
    BENCHMARKS.md: loopback host, a raised `max_concurrency` (so a burst is not capped at 64 model
    calls at once), a larger `max_queue` (so throughput runs never answer "busy") and no rate
    limits (a benchmark floods on purpose: it would measure the notices)."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"host": HOST, "port": port},
        "model": (
            {"provider": "openai", "base_url": model_url, "model": "bench", "max_retries": 0}
            if model_url
            else {"provider": "echo"}
        ),
        "dispatcher": {"max_concurrency": 4096, "max_queue": 1_000_000, "drain_timeout": 1.0},
        "limits": {"per_user_per_minute": 0, "per_conversation_per_minute": 0},
        "store": {"url": store},
        "log": {"level": "INFO"},
    }
    for name, keys in overrides.items():
        sections.setdefault(name, {}).update(keys)
    return sections


def dingtalk_section(api_base: str, oapi_base: str, mode: str = "stream") -> dict[str, Any]:
    """`oapi_base` is where sessionWebhooks live: the adapter only trusts webhook URLs under it.
    No API rate limits (`api_qps`, `card_qps` = 0): the doubles do not throttle, and the bench
    measures the gateway, not DingTalk's 20 calls a second."""
    return {
        "enabled": True,
        "mode": mode,
        "client_id": CLIENT_ID,
        "api_base": api_base,
        "oapi_base": oapi_base,
        "api_qps": 0,
        "card_qps": 0,
    }


def feishu_section(domain: str) -> dict[str, Any]:
    """No API rate limits either (see `dingtalk_section`)."""
    limits = {"api_qps": 0, "api_qpm": 0, "chat_qps": 0}
    return {"enabled": True, "mode": "ws", "app_id": FEISHU_APP_ID, "domain": domain, **limits}


# The gateway runs on asyncio's loop (docs/benchmarks.md, Profiles: why not uvloop); to measure it
# on uvloop all the same, its process installs uvloop's policy before running run.py.
ON_UVLOOP = (
    "import runpy, sys, uvloop; uvloop.install(); sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def gateway(
    cores: Cores,
    workdir: Path,
    sections: dict[str, dict[str, Any]],
    name: str = "gateway",
    loop: str = "asyncio",
) -> ServerProcess:
    """A gateway process for `sections`; secrets go through BOTGATE_ environment variables.
    `loop`: "asyncio" (the gateway's own) or "uvloop" (bench/requirements.txt)."""
    state = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    sections["server"]["state_dir"] = str(state)
    config = state / "config.toml"
    config.write_text(toml(sections))
    env = {}
    if sections.get("dingtalk", {}).get("enabled"):
        env["BOTGATE_DINGTALK__CLIENT_SECRET"] = SECRET
    if sections.get("feishu", {}).get("enabled"):
        env["BOTGATE_FEISHU__APP_SECRET"] = SECRET
    argv = [PYTHON, *(["-c", ON_UVLOOP] if loop == "uvloop" else []), "run.py", "--config", str(config)]
    proc = ServerProcess(name, argv, sections["server"]["port"], cores, workdir, env)
    proc.state_dir = state
    return proc


def reference(cores: Cores, workdir: Path, kind: str, *args: str, loop: str = "asyncio") -> ServerProcess:
    """A reference server or client from `bench.references` (`bare`, `fastapi`, `relay`, `dingtalk`,
    `feishu`), on asyncio's loop or (`loop="uvloop"`) on uvloop's."""
    port = free_port()
    argv = [PYTHON, "-m", "bench.references", kind, "--port", str(port), "--loop", loop, *args]
    return ServerProcess(f"ref-{kind}-{loop}", argv, port, cores, workdir, ready_path="/healthz")
