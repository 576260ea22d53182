"""systemd/botgate.service: `systemd-analyze verify` passes, the sandbox scores "OK" (< 2.0), and the
gateway works inside that sandbox (emulated by tests/sandbox.py, since CI has no systemd as PID 1)."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from gateway.config import ConfigError, DingTalkConfig, DispatcherConfig, FeishuConfig, load
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
    assert s["EnvironmentFile"] == ["-/etc/botgate/env"]  # optional: secrets may all be credentials
    # Stopping must outlast the drain plus aiohttp's shutdown_timeout (drain_timeout + 5).
    drain = DispatcherConfig().drain_timeout
    assert int(s["TimeoutStopSec"][0]) > drain + (drain + 5)
    # The watchdog pings at half the interval; it must leave room for a busy loop.
    assert int(s["WatchdogSec"][0]) >= 10


def test_unit_denies_link_local_addresses() -> None:
    """Cloud metadata services (169.254.169.254, AWS's fd00:ec2::254) hand out the VM's own
    credentials to whoever asks from it; the service cannot reach them (nor anything link-local)."""
    denied = [ipaddress.ip_network(n) for line in unit_settings()["IPAddressDeny"] for n in line.split()]
    for address in ("169.254.169.254", "169.254.0.1", "fe80::1", "fd00:ec2::254"):
        assert any(ipaddress.ip_address(address) in net for net in denied), address
    # Nothing else: the platforms' and the model's addresses are not known in advance.
    assert "IPAddressAllow" not in unit_settings()
    # No shipped default points there (a key that needs it would need a drop-in, docs/deploy.md).
    for url in (DingTalkConfig().api_base, DingTalkConfig().oapi_base, FeishuConfig().domain):
        host = urlsplit(url).hostname or ""
        assert not host.startswith(("169.254.", "fe80:")), url


@needs_analyze
def test_credentials_drop_in_from_the_docs_verifies(tmp_path: Path) -> None:
    """The LoadCredential= drop-in docs/deploy.md shows is valid for systemd, together with the unit."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    drop_in = re.search(r"```ini\n(\[Service\]\nLoadCredential=.*?)```", docs, re.S)
    assert drop_in, "docs/deploy.md: no [Service] LoadCredential= drop-in example"
    lines = [line for line in drop_in.group(1).splitlines() if line.startswith("LoadCredential=")]
    assert lines and all(line.split("=", 1)[1].split(":")[0].startswith("BOTGATE_") for line in lines)
    unit = tmp_path / "botgate.service"
    text = UNIT.read_text().replace("/opt/botgate/.venv/bin/python", sys.executable)
    unit.write_text(text.replace("[Install]", "\n".join(lines) + "\n\n[Install]"))
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [line for line in result.stderr.splitlines() if "botgate" in line]
    assert result.returncode == 0 and not complaints, result.stderr


# -- LoadCredential=: secrets as files in $CREDENTIALS_DIRECTORY ----------------------------------------
def test_credential_files_supply_the_variables_they_are_named_after(tmp_path: Path) -> None:
    (tmp_path / "BOTGATE_MODEL__API_KEYS").write_text("sk-cred-1,sk-cred-2\n")  # echo/editors add one
    (tmp_path / "BOTGATE_ADMIN__PASSWORD").write_text("a password with trailing space \r\n")
    (tmp_path / "tls.key").write_text("not a variable: left alone")
    config = load(None, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.model.api_keys == ["sk-cred-1", "sk-cred-2"]
    assert config.admin.password == "a password with trailing space "
    assert "sk-cred-1" in config.secrets()  # masked like any secret
    # Without the directory, nothing is read from it.
    assert load(None, env={}).model.api_keys == []


def test_a_credential_also_in_the_environment_is_refused(tmp_path: Path) -> None:
    (tmp_path / "BOTGATE_MODEL__API_KEYS").write_text("sk-from-file")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "BOTGATE_MODEL__API_KEYS": "sk-from-env"}
    with pytest.raises(ConfigError) as err:
        load(None, env=env)
    assert "BOTGATE_MODEL__API_KEYS" in str(err.value) and "sk-from" not in str(err.value)
    (tmp_path / "BOTGATE_NOPE__KEY").write_text("x")
    with pytest.raises(ConfigError, match="unknown section"):  # named like any unknown variable
        load(None, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})


async def test_gateway_reads_its_model_key_from_a_credential(
    spawn_gateway: Callable[..., GatewayProcess], openai_double: Any, tmp_path: Path
) -> None:
    """As systemd starts it with LoadCredential=: the key is a file, not in the environment."""
    double, url = openai_double
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "BOTGATE_MODEL__API_KEYS").write_text("sk-credential-9T9T\n")
    gw = spawn_gateway(env={"BOTGATE_MODEL__BASE_URL": url, "CREDENTIALS_DIRECTORY": str(credentials)}, start=False)
    await asyncio.to_thread(gw.start)
    headers = gw.admin_headers()
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.ws_connect(f"{gw.url}/chat/ws") as ws,
    ):
        await ws.receive()
        await ws.send_str(orjson.dumps({"type": "message", "id": "1", "text": "key from a file"}).decode())
        async with asyncio.timeout(20):
            while (frame := orjson.loads((await ws.receive()).data))["type"] not in ("done", "notice", "error"):
                pass
    assert frame["type"] == "done", frame
    # Seen failing without credential loading: no Authorization header reached the model.
    assert double.auth_headers and set(double.auth_headers) == {"Bearer sk-credential-9T9T"}
    assert await asyncio.to_thread(gw.stop) == 0
    assert "sk-credential-9T9T" not in gw.output()


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
        aiohttp.ClientSession(headers=gw.admin_headers()) as session,
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
