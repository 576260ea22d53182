"""Config loading: every error message a human may see, env typing, masking, and run.py's exits."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.config import SECRET_KEYS, Config, ConfigError, build, load, masked

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "botgate.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load(path, env or {})
    return str(err.value)


# -- errors in the file -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nport = "80"\n', "server.port: expected an integer, got str '80'"),
        ("[server]\nport = 80.5\n", "server.port: expected an integer, got float 80.5"),
        ("[model]\nvision = 1\n", "model.vision: expected true/false, got int 1"),
        ('[model]\napi_keys = "sk-1"\n', "model.api_keys: expected a list of strings, got str"),
        ("[model]\napi_keys = [1, 2]\n", "model.api_keys: expected a list of strings, got list"),
        ('[dispatcher]\ndeadline = "soon"\n', "dispatcher.deadline: expected a number, got str"),
        ("[model]\ntemperature = true\n", "model.temperature: expected a number, got bool True"),
        ("[server]\nprot = 1\n", "unknown key server.prot"),
        ("[srever]\nport = 1\n", "unknown section [srever]"),
        ("port = 1\n", "unknown key 'port' (keys belong in a [section])"),
        ("server = 1\n", "[server] must be a table, got server = 1"),
        (
            '[model]\nprovider = "gpt"\n',
            "model.provider: must be one of auto, openai, echo, dify, coze, fastgpt, got 'gpt'",
        ),
        ('[model]\nreasoning = "hide"\n', "model.reasoning: must be one of strip, fold, show, got 'hide'"),
        ('[dingtalk]\nmode = "poll"\n', "dingtalk.mode: must be one of stream, webhook, both"),
        ('[feishu]\nmode = "poll"\n', "feishu.mode: must be one of ws, webhook, both"),
        ('[log]\nlevel = "LOUD"\n', "log.level: must be one of DEBUG, INFO, WARNING, ERROR"),
        ("[server]\nport = 70000\n", "server.port: must be between 1 and 65535, got 70000"),
        ('[server]\ntls_cert = "c.pem"\n', "server.tls_cert: tls_cert and tls_key must be set together"),
        ("[dispatcher]\nmax_concurrency = 0\n", "dispatcher.max_concurrency: must be at least 1"),
        ("[dispatcher]\ndrain_timeout = 0\n", "dispatcher.drain_timeout: must be positive"),
        ("[model]\nfirst_token_timeout = -1\n", "model.first_token_timeout: must be positive"),
        ("[model]\nmax_retries = -1\n", "model.max_retries: must be 0 or more"),
        (
            '[model]\nprovider = "openai"\n',
            'model.base_url: is required when provider = "openai"',
        ),
        (
            '[model]\nbase_url = "api.openai.com/v1"\n',
            "model.base_url: must be an http(s) URL, got 'api.openai.com/v1'",
        ),
        ('[feishu]\ndomain = "open.feishu.cn"\n', "feishu.domain: must be an http(s) URL"),
        (
            '[store]\nurl = "postgres://db"\n',
            "store.url: must start with memory://, sqlite:/// or redis://, got 'postgres://db'",
        ),
        ('[store]\ndurability = "fast"\n', "store.durability: must be one of power, process, got 'fast'"),
        (
            '[dingtalk]\nenabled = true\nclient_id = "ding123"\n',
            "dingtalk.client_secret: is required when dingtalk.enabled = true "
            "(set BOTGATE_DINGTALK__CLIENT_SECRET)",
        ),
        (
            "[dingtalk]\nenabled = true\n",
            "dingtalk.client_id: is required when dingtalk.enabled = true "
            "(set BOTGATE_DINGTALK__CLIENT_ID)",
        ),
        (
            '[feishu]\nenabled = true\napp_id = "cli_1"\n',
            "feishu.app_secret: is required when feishu.enabled = true "
            "(set BOTGATE_FEISHU__APP_SECRET)",
        ),
    ],
)
def test_file_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    assert error_of(path).startswith(f"{path}: {message}")


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = \n")
    assert error_of(path).startswith(f"{path}: invalid TOML: Invalid value (at line 2, column 8)")


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[model]\nsystem_prompt = "caf\xe9"\n'.encode("latin-1"))
    assert error_of(path) == f"{path}: invalid TOML: the file is not UTF-8"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert error_of(missing) == f"{missing}: file not found"
    assert error_of(tmp_path).startswith(f"{tmp_path}: cannot read: ")


# -- errors and typing in the environment -------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"BOTGATE_SERVER__PORT": "eighty"},
            "environment variable BOTGATE_SERVER__PORT: expected an integer, got 'eighty'",
        ),
        (
            {"BOTGATE_FEISHU__ENABLED": "maybe"},
            "environment variable BOTGATE_FEISHU__ENABLED: expected true/false, got 'maybe'",
        ),
        (
            {"BOTGATE_MODEL__TEMPERATURE": "warm"},
            "environment variable BOTGATE_MODEL__TEMPERATURE: expected a number, got 'warm'",
        ),
        (
            {"BOTGATE_SERVER__PROT": "80"},
            "environment variable BOTGATE_SERVER__PROT: unknown key server.prot",
        ),
        (
            {"BOTGATE_SRVR__PORT": "80"},
            "environment variable BOTGATE_SRVR__PORT: unknown section [srvr]",
        ),
        (
            {"BOTGATE_PORT": "80"},
            "environment variable BOTGATE_PORT: expected BOTGATE_<SECTION>__<KEY>, "
            "e.g. BOTGATE_SERVER__PORT",
        ),
        (
            {"BOTGATE_LOG__LEVEL": "verbose"},
            "environment variable BOTGATE_LOG__LEVEL: log.level: must be one of DEBUG, INFO, "
            "WARNING, ERROR, got 'verbose'",
        ),
        (
            {"BOTGATE_SERVER__PORT": "0"},
            "environment variable BOTGATE_SERVER__PORT: server.port: must be between 1 and 65535",
        ),
    ],
)
def test_env_errors_name_the_variable(tmp_path: Path, env: dict[str, str], message: str) -> None:
    assert error_of(write(tmp_path, ""), env).startswith(message)


def test_missing_secret_when_enabled_from_env_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[feishu]\napp_id = "cli_1"\n')
    message = error_of(path, {"BOTGATE_FEISHU__ENABLED": "true"})
    assert message == (
        f"{path}: feishu.app_secret: is required when feishu.enabled = true "
        "(set BOTGATE_FEISHU__APP_SECRET)"
    )


def test_env_values_are_typed_by_their_key_and_beat_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 1000\n[model]\napi_keys = ["from-file"]\n')
    cfg = load(
        path,
        {
            "BOTGATE_SERVER__PORT": " 8080 ",
            "BOTGATE_FEISHU__ENABLED": "TRUE",
            "BOTGATE_FEISHU__APP_ID": "cli_1",
            "BOTGATE_FEISHU__APP_SECRET": "s3cret",
            "BOTGATE_DINGTALK__ENABLED": "no",
            "BOTGATE_MODEL__VISION": "1",
            "BOTGATE_MODEL__TEMPERATURE": "0.25",
            "BOTGATE_MODEL__TOTAL_TIMEOUT": "60",
            "BOTGATE_MODEL__API_KEYS": "sk-a, sk-b,,sk-c ",
            "BOTGATE_DINGTALK__ALLOW_SENDERS": "",
            "BOTGATE_MODEL__SYSTEM_PROMPT": "Be kind, be brief",
            "OTHER_VARIABLE": "ignored",
        },
    )
    assert cfg.server.port == 8080
    assert cfg.feishu.enabled is True and cfg.dingtalk.enabled is False and cfg.model.vision is True
    assert cfg.model.temperature == 0.25
    assert cfg.model.total_timeout == 60.0 and isinstance(cfg.model.total_timeout, float)
    assert cfg.model.api_keys == ["sk-a", "sk-b", "sk-c"]
    assert cfg.dingtalk.allow_senders == []
    assert cfg.model.system_prompt == "Be kind, be brief"  # a string is not split at commas
    assert cfg.source == str(path)


def test_integers_are_accepted_for_float_keys(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "[dispatcher]\ndeadline = 30\n"), {})
    assert cfg.dispatcher.deadline == 30.0 and isinstance(cfg.dispatcher.deadline, float)


def test_no_file_means_defaults(tmp_path: Path) -> None:
    assert load(None, {}) == Config()


# -- the shipped config.toml ----------------------------------------------------------------------
def test_shipped_config_documents_every_key_with_its_default() -> None:
    data = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    defaults = build({}, {})
    for section in dataclasses.fields(Config):
        if section.name in ("source", "agents", "bots", "routes", "schedules"):  # arrays of tables: none by default
            continue
        values = dataclasses.asdict(getattr(defaults, section.name))
        assert data.get(section.name) == values, f"[{section.name}] in config.toml drifted"
    assert load(SHIPPED, {}) == dataclasses.replace(defaults, source=str(SHIPPED))


# -- masking ---------------------------------------------------------------------------------------
def test_masked_hides_every_secret_and_keeps_the_rest() -> None:
    cfg = build(
        {
            "model": {"api_keys": ["sk-aaaa", "sk-bbbb"], "base_url": "http://127.0.0.1:1/v1"},
            "feishu": {"enabled": True, "app_id": "cli_visible", "app_secret": "fs-secret"},
            "admin": {"password": "hunter22-hunter22", "jwt_secret": "jwt-secret-jwt-secret-jwt-secret"},
            "alerts": {"dingtalk_webhook": "https://oapi.dingtalk.com/robot/send?access_token=t0k"},
        },
        {},
    )
    dump = masked(cfg)
    assert dump["model"]["api_keys"] == "***"
    assert dump["feishu"]["app_secret"] == "***" and dump["feishu"]["app_id"] == "cli_visible"
    assert dump["admin"]["password"] == "***" and dump["admin"]["jwt_secret"] == "***"
    assert dump["alerts"]["dingtalk_webhook"] == "***"
    assert dump["admin"]["metrics_token"] == ""  # unset secrets stay visibly unset
    assert dump["model"]["base_url"] == "http://127.0.0.1:1/v1"
    text = repr(dump)
    for secret in cfg.secrets():
        assert secret not in text
    assert sorted(cfg.secrets()) == sorted(
        [
            "sk-aaaa",
            "sk-bbbb",
            "fs-secret",
            "hunter22-hunter22",
            "jwt-secret-jwt-secret-jwt-secret",
            cfg.alerts.dingtalk_webhook,
        ]
    )
    # Every secret key is a real key (a typo here would leave a secret unmasked).
    for key in SECRET_KEYS:
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


# -- run.py ----------------------------------------------------------------------------------------
def run_py(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BOTGATE_")}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_accepts_the_shipped_file() -> None:
    result = run_py("--check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"config ok: {SHIPPED}"


def test_check_config_rejects_a_bad_file_with_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = \"http\"\n")
    result = run_py("--config", str(path), "--check-config")
    assert result.returncode == 2
    assert result.stderr == f"config error: {path}: server.port: expected an integer, got str 'http'\n"
    assert result.stdout == ""


def test_serving_with_a_bad_config_exits_2_without_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "[dingtalk]\nenabled = true\n")
    result = run_py("--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(path) in lines[0] and "dingtalk.client_id" in lines[0]


def test_env_errors_reach_run_py_too(tmp_path: Path) -> None:
    result = run_py("--check-config", env={"BOTGATE_SERVER__PORT": "eighty"})
    assert result.returncode == 2
    assert result.stderr == (
        "config error: environment variable BOTGATE_SERVER__PORT: expected an integer, "
        "got 'eighty'\n"
    )
    missing = run_py("--config", str(tmp_path / "absent.toml"), "--check-config")
    assert missing.returncode == 2
    assert missing.stderr == f"config error: {tmp_path / 'absent.toml'}: file not found\n"
