"""`run.py --env-file`: the environment file read as systemd's EnvironmentFile= reads it (values
literal: spaces kept, shell metacharacters never executed), and the documented --check-config
recipe (docs/deploy.md) run as written against a config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import envfile
from tests.process import ROOT

DEPLOY = ROOT / "docs" / "deploy.md"
TIMEOUT = 60.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=a long passphrase\n", {"A": "a long passphrase"}),
        ("A=s3cr$et&&touch /tmp/x\n", {"A": "s3cr$et&&touch /tmp/x"}),  # nothing expanded or run
        ("A=`id`;$(id)|x>y\n", {"A": "`id`;$(id)|x>y"}),
        ("  A = padded value \t\n", {"A": "padded value"}),  # outer whitespace dropped, inner kept
        ("A='quoted  $HOME'\n", {"A": "quoted  $HOME"}),  # single quotes: verbatim
        ('A="say \\"hi\\" \\$x \\n"\n', {"A": 'say "hi" $x \\n'}),  # double quotes: shell escapes only
        ("A=it's\n", {"A": "it's"}),  # a quote after the first character is kept
        ("A='two\nlines'\n", {"A": "two\nlines"}),
        ("A=joined\\\nline\n", {"A": "joinedline"}),  # backslash-newline continues the line
        ("A=back\\\\slash\n", {"A": "back\\slash"}),
        ("# A=1\n; B=2\nno assignment\n\nC=3", {"C": "3"}),  # comments, a line without "=", no final newline
        ("export A=1\n1B=2\nC-D=3\n", {}),  # not variable names: dropped, as systemd drops them
        ("A=\nA=second\n", {"A": "second"}),  # the later line wins
        ("A=\n", {"A": ""}),
    ],
)
def test_values_are_read_as_systemd_reads_them(text: str, expected: dict[str, str]) -> None:
    assert envfile.parse(text) == expected


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOTGATE_", "STATE_DIRECTORY"))}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=cwd, check=False,
    )  # fmt: skip


def test_a_secret_with_spaces_reaches_the_gateway_whole(tmp_path: Path) -> None:
    env = tmp_path / "env"
    env.write_text(f"BOTGATE_ADMIN__PASSWORD=a long passphrase\nBOTGATE_SERVER__STATE_DIR={tmp_path / 'state'}\n")
    result = run("--env-file", str(env), "login-link", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "password is set" in result.stderr  # a shell would have run `long` and set no password
    assert "passphrase" not in result.stdout + result.stderr


def test_shell_metacharacters_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    env = tmp_path / "env"
    env.write_text(f"BOTGATE_SERVER__PORT=18789 && touch {marker}\nBOTGATE_MODEL__MODEL=`touch {marker}`\n")
    result = run("--env-file", str(env), "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert f"BOTGATE_SERVER__PORT: expected an integer, got '18789 && touch {marker}'" in result.stderr
    assert not marker.exists()


def test_an_unreadable_env_file_is_a_config_error(tmp_path: Path) -> None:
    result = run("--env-file", str(tmp_path / "missing"), "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert f"config error: env file {tmp_path / 'missing'}: cannot read" in result.stderr


def documented_check_config() -> str:
    """The shell block of docs/deploy.md that checks the config with the service's env file."""
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", DEPLOY.read_text(), flags=re.S)
    # The block that is that one command (the upgrade steps run it too, among others).
    commands = [b for b in blocks if len(b.replace("\\\n", " ").strip().splitlines()) == 1]
    found = [b for b in commands if "--check-config" in b and "--env-file /etc/botgate/env" in b]
    found = [b for b in found if not b.startswith("CREDENTIALS_DIRECTORY=")]
    assert len(found) == 1, "docs/deploy.md: an sh block of its own runs --check-config --env-file /etc/botgate/env"
    return found[0]


def documented_credentials_check() -> str:
    """docs/deploy.md's check of the config with the secrets as credential files."""
    blocks: list[str] = re.findall(r"```sh\n(CREDENTIALS_DIRECTORY=.*?)```", DEPLOY.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/deploy.md: no CREDENTIALS_DIRECTORY=... --check-config block"
    return blocks[0]


@pytest.mark.parametrize("left_in_env_file", [False, True])
def test_documented_credentials_check_sees_the_env_file_too(tmp_path: Path, left_in_env_file: bool) -> None:
    """The service gets the env file and the credentials; a secret in both is refused at start, so
    the documented check must refuse it too (the step "remove those lines from the env file")."""
    config = tmp_path / "config.toml"
    config.write_text('[dingtalk]\nclient_id = "dingabc"\n')
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "BOTGATE_DINGTALK__CLIENT_SECRET").write_text("from-the-credential\n")
    env = tmp_path / "env"
    forgotten = "BOTGATE_DINGTALK__CLIENT_SECRET=old\n" if left_in_env_file else ""
    env.write_text("BOTGATE_DINGTALK__ENABLED=true\n" + forgotten)
    command = (
        documented_credentials_check()
        .replace("/etc/botgate/credentials", str(credentials))
        .replace("/opt/botgate/.venv/bin/python", sys.executable)
        .replace("/opt/botgate/run.py", str(ROOT / "run.py"))
        .replace("/etc/botgate/config.toml", str(config))
        .replace("/etc/botgate/env", str(env))
    )
    result = subprocess.run(
        ["/bin/sh", "-e", "-c", command], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if left_in_env_file:
        assert result.returncode == 2
        assert "credential BOTGATE_DINGTALK__CLIENT_SECRET: also set in the environment" in result.stderr
    else:
        assert result.returncode == 0, result.stderr


def test_docs_never_source_the_env_file_with_a_shell() -> None:
    text = DEPLOY.read_text()
    assert not re.search(r"(^|[\s;'\"])(\.|source)\s+/etc/botgate/env", text, flags=re.M)


@pytest.mark.parametrize("secret_ok", [True, False])
def test_documented_check_config_recipe_checks_what_the_service_gets(tmp_path: Path, secret_ok: bool) -> None:
    marker = tmp_path / "marker"
    config = tmp_path / "config.toml"
    config.write_text('[dingtalk]\nenabled = true\nclient_id = "dingabc"\n')
    env = tmp_path / "env"
    secret = "with spaces && touch " + str(marker)
    # An enabled platform without its secret is a config error: the check must see the file's value.
    env.write_text(f"BOTGATE_DINGTALK__CLIENT_SECRET={secret}\n" if secret_ok else "# nothing yet\n")
    command = (
        documented_check_config()
        .replace("/opt/botgate/.venv/bin/python", sys.executable)
        .replace("/opt/botgate/run.py", str(ROOT / "run.py"))
        .replace("/etc/botgate/config.toml", str(config))
        .replace("/etc/botgate/env", str(env))
    )
    result = subprocess.run(
        ["/bin/sh", "-e", "-c", command], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if secret_ok:
        assert result.returncode == 0, result.stderr
        assert f"config ok: {config}" in result.stdout
    else:
        assert result.returncode == 2
        assert "dingtalk.client_secret" in result.stderr
    assert not marker.exists()
