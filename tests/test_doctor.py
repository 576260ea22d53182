"""`python run.py doctor` against the DingTalk and OpenAI doubles: every check passing, and each
failure a user would otherwise meet as an opaque error, with the line that names the fix."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

import handlers
from gateway import doctor
from gateway.config import Config
from gateway.store import SqliteStore
from tests.conftest import make_config
from tests.doubles import feishu as fd
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu import FeishuDouble
from tests.doubles.openai import OpenAIDouble
from tests.process import ROOT
from tests.redisd import listen_port

SECRET = "ding-secret-7f3a9c"
KEY = "sk-doctor-key-1"


class Setup:
    def __init__(self, double: DingTalkDouble, model: OpenAIDouble, model_url: str, state: Path) -> None:
        self.double, self.model, self.model_url, self.state = double, model, model_url, state

    def config(self, **sections: dict[str, Any]) -> Config:
        dingtalk = {
            "enabled": True,
            "client_id": self.double.client_id,
            "client_secret": SECRET,
            "api_base": self.double.base,
            "oapi_base": self.double.base,
            "monthly_api_budget": 5000,  # a standard org's quota (the budget check)
            **sections.pop("dingtalk", {}),
        }
        model = {"base_url": self.model_url, "api_keys": [KEY], **sections.pop("model", {})}
        store = sections.pop("store", {"url": f"sqlite:///{self.state}/doctor.sqlite3"})
        return make_config(dingtalk=dingtalk, model=model, store=store, **sections)


@pytest.fixture
async def setup(aiohttp_server: Any, openai_double: tuple[OpenAIDouble, str], tmp_path: Path) -> Setup:
    double = DingTalkDouble(client_secret=SECRET)
    server = await aiohttp_server(double.app(), host="127.0.0.1")
    double.base = str(server.make_url("")).rstrip("/")
    model, url = openai_double
    return Setup(double, model, url, tmp_path / "state")


async def diagnose(config: Config) -> tuple[int, dict[str, str]]:
    """The exit code and each check's line, by check name."""
    lines: list[str] = []
    code = await doctor.run(config, [handlers.doctor], lines.append)
    for line in lines:
        for secret in (SECRET, KEY):
            assert secret not in line
    checks = {}
    for line in lines[1:-1]:
        name = line[6:].split(": ", 1)[0]
        checks[name] = line
    return code, checks


def status(line: str) -> str:
    return line[:4]


async def test_a_healthy_setup_passes_every_check(setup: Setup) -> None:
    code, checks = await diagnose(setup.config())
    assert code == 0, checks
    assert list(checks) == [
        "dingtalk credentials",
        "dingtalk stream endpoint",
        "dingtalk robot identity",
        "dingtalk clock",
        "dingtalk api budget",
        "model",
        "store",
        "key age",
    ]
    assert all(status(line) == "PASS" for line in checks.values()), checks
    assert "robot code ding-app-key belongs to this app" in checks["dingtalk robot identity"]
    assert setup.model.requests[0]["max_tokens"] == 1
    assert setup.model.auth_headers == [f"Bearer {KEY}"]
    assert setup.double.connections == 0  # the ticket was never used: no messages diverted


async def test_bad_secret_fails_the_token_check_with_the_fix(setup: Setup) -> None:
    setup.double.client_secret = "the-real-one"
    code, checks = await diagnose(setup.config())
    assert code == 1
    line = checks["dingtalk credentials"]
    assert status(line) == "FAIL" and "refused the app credentials" in line
    assert "BOTGATE_DINGTALK__CLIENT_SECRET" in line and "AppSecret" in line
    stream = checks["dingtalk stream endpoint"]
    assert status(stream) == "FAIL" and "HTTP 401" in stream
    assert status(checks["dingtalk robot identity"]) == "SKIP"
    assert status(checks["model"]) == "PASS" and status(checks["store"]) == "PASS"


async def test_platform_down_says_which_host_to_reach(setup: Setup) -> None:
    down = f"http://127.0.0.1:{listen_port()}"
    code, checks = await diagnose(setup.config(dingtalk={"api_base": down}))
    assert code == 1
    for name in ("dingtalk credentials", "dingtalk stream endpoint", "dingtalk clock"):
        assert status(checks[name]) == "FAIL", checks[name]
        assert "make sure this host can reach 127.0.0.1" in checks[name]
    assert "ClientConnectorError" in checks["dingtalk credentials"]


async def test_stream_endpoint_down(setup: Setup) -> None:
    setup.double.open_failures = 1
    code, checks = await diagnose(setup.config())
    assert code == 1
    line = checks["dingtalk stream endpoint"]
    assert status(line) == "FAIL" and "HTTP 503" in line and "can reach" in line
    assert status(checks["dingtalk credentials"]) == "PASS"


async def test_stream_endpoint_check_is_left_out_in_webhook_mode(setup: Setup) -> None:
    code, checks = await diagnose(setup.config(dingtalk={"mode": "webhook"}))
    assert code == 0 and "dingtalk stream endpoint" not in checks


async def test_model_key_refused(setup: Setup) -> None:
    setup.model.bad_keys = {"sk-revoked"}
    code, checks = await diagnose(setup.config(model={"api_keys": [KEY, "sk-revoked"]}))
    assert code == 1
    line = checks["model"]
    assert status(line) == "FAIL" and "(key 2 of 2)" in line and "refused the API key (401)" in line
    assert "BOTGATE_MODEL__API_KEYS" in line
    assert "sk-revoked" not in line  # a secret, masked like every configured secret


async def test_model_endpoint_down(setup: Setup) -> None:
    code, checks = await diagnose(setup.config(model={"base_url": f"http://127.0.0.1:{listen_port()}/v1"}))
    assert code == 1
    assert status(checks["model"]) == "FAIL" and "check [model] base_url" in checks["model"]


async def test_no_model_is_a_warning(setup: Setup) -> None:
    code, checks = await diagnose(setup.config(model={"base_url": "", "api_keys": []}))
    assert code == 0
    assert status(checks["model"]) == "WARN" and "echo" in checks["model"]


async def test_store_unwritable(setup: Setup, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    code, checks = await diagnose(setup.config(store={"url": f"sqlite:///{blocker}/state.sqlite3"}))
    assert code == 1
    line = checks["store"]
    assert status(line) == "FAIL" and "cannot open" in line and "writable by this user" in line


async def test_store_held_by_the_running_gateway_is_a_warning(setup: Setup) -> None:
    running = SqliteStore(setup.state / "doctor.sqlite3")
    await running.open()
    try:
        code, checks = await diagnose(setup.config())
    finally:
        await running.close()
    assert code == 0
    assert status(checks["store"]) == "WARN" and "/readyz" in checks["store"]


async def test_unreachable_redis_fails_the_store_check(setup: Setup) -> None:
    code, checks = await diagnose(setup.config(store={"url": f"redis://127.0.0.1:{listen_port()}/0"}))
    assert code == 1 and status(checks["store"]) == "FAIL"


@pytest.mark.parametrize(
    ("offset", "expected", "code"), [(300, "WARN", 0), (-300, "WARN", 0), (7200, "FAIL", 1)]
)
async def test_clock_skew_from_the_date_header(setup: Setup, offset: float, expected: str, code: int) -> None:
    setup.double.clock_offset = offset
    got, checks = await diagnose(setup.config())
    line = checks["dingtalk clock"]
    assert got == code and status(line) == expected, line
    side = "behind" if offset > 0 else "ahead of"
    assert f"{abs(offset)} s {side} DingTalk's" in line or f"{abs(offset) - 1} s {side}" in line, line
    assert "timedatectl set-ntp true" in line


async def test_foreign_robot_code_fails_identity(setup: Setup) -> None:
    code, checks = await diagnose(setup.config(dingtalk={"robot_code": "dingother"}))
    line = checks["dingtalk robot identity"]
    assert code == 1 and status(line) == "FAIL"
    assert "does not know robot code dingother" in line and "[dingtalk] robot_code" in line


async def test_identity_without_permission_is_only_a_warning(setup: Setup) -> None:
    setup.double.robot_permission = False
    code, checks = await diagnose(setup.config())
    line = checks["dingtalk robot identity"]
    assert code == 0 and status(line) == "WARN"
    assert "Robot.SingleChat.ReadWrite" in line and "no identity call" in line


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "run.py"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "NO_PROXY": "127.0.0.1", **(env or {})},
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_doctor_command_exits_0_healthy_1_failing_2_without_config(setup: Setup, tmp_path: Path) -> None:
    config = tmp_path / "botgate.toml"
    config.write_text(
        f'[dingtalk]\nenabled = true\nclient_id = "{setup.double.client_id}"\nmonthly_api_budget = 5000\n'
        f'api_base = "{setup.double.base}"\n[model]\nbase_url = "{setup.model_url}"\n'
        f'[store]\nurl = "sqlite:///{setup.state}/cli.sqlite3"\n'
    )
    env = {"BOTGATE_DINGTALK__CLIENT_SECRET": SECRET, "BOTGATE_MODEL__API_KEYS": KEY}
    code, out, err = await run_cli("doctor", "--config", str(config), env=env)
    assert code == 0, out + err
    assert out.splitlines()[-1] == "8 passed" and SECRET not in out and err == ""
    # --config may come before the command too.
    env["BOTGATE_DINGTALK__CLIENT_SECRET"] = "wrong"
    code, out, _ = await run_cli("--config", str(config), "doctor", env=env)
    assert code == 1 and "FAIL  dingtalk credentials" in out
    assert out.splitlines()[-1].endswith("failed, 1 skipped")
    code, _, err = await run_cli("doctor", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "file not found" in err


@pytest.fixture
async def feishu(aiohttp_server: Any) -> tuple[FeishuDouble, str]:
    return await fd.start(aiohttp_server)


def feishu_config(domain: str, model_url: str, tmp_path: Path, **feishu: Any) -> Config:
    store = {"url": f"sqlite:///{tmp_path}/feishu.sqlite3"}
    return fd.config(domain, model_url, feishu=feishu, store=store)


async def test_feishu_healthy(feishu: tuple[FeishuDouble, str], setup: Setup, tmp_path: Path) -> None:
    double, domain = feishu
    # A paid plan has no quota; a budget far above what answers cost keeps the budget check quiet.
    config = feishu_config(domain, setup.model_url, tmp_path, monthly_api_budget=1_000_000)
    code, checks = await diagnose(config)
    assert code == 0, checks
    names = [
        "feishu credentials",
        "feishu ws endpoint",
        "feishu bot identity",
        "feishu clock",
        "feishu api budget",
        "model",
        "store",
        "key age",
    ]
    assert list(checks) == names
    assert all(status(line) == "PASS" for line in checks.values()), checks
    assert "bot open_id ou_bot" in checks["feishu bot identity"]
    assert "ticket" not in checks["feishu ws endpoint"]  # the URL's query holds credentials
    assert double.connections == 0


async def test_feishu_bad_secret(feishu: tuple[FeishuDouble, str], setup: Setup, tmp_path: Path) -> None:
    _, domain = feishu
    code, checks = await diagnose(feishu_config(domain, setup.model_url, tmp_path, app_secret="wrong-secret"))
    assert code == 1
    line = checks["feishu credentials"]
    assert status(line) == "FAIL" and "10014" in line and "BOTGATE_FEISHU__APP_SECRET" in line
    assert "wrong-secret" not in line
    ws = checks["feishu ws endpoint"]
    assert status(ws) == "FAIL" and "auth failed" in ws and "persistent connection" in ws
    assert status(checks["feishu bot identity"]) == "SKIP"


async def test_unreachable_feishu_fails_every_feishu_check(setup: Setup, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{listen_port()}"
    code, checks = await diagnose(feishu_config(down, setup.model_url, tmp_path))
    assert code == 1
    for name in ("feishu credentials", "feishu ws endpoint", "feishu clock"):
        assert status(checks[name]) == "FAIL" and "can reach 127.0.0.1" in checks[name], checks[name]


# Only our clock running ahead hurts here (events look old); behind is worth a warning.
@pytest.mark.parametrize(("offset", "expected"), [(-120, "WARN"), (-900, "FAIL"), (900, "WARN")])
async def test_feishu_clock_skew(
    feishu: tuple[FeishuDouble, str], setup: Setup, tmp_path: Path, offset: float, expected: str
) -> None:
    double, domain = feishu
    double.clock_offset = offset
    _, checks = await diagnose(feishu_config(domain, setup.model_url, tmp_path))
    line = checks["feishu clock"]
    assert status(line) == expected, line
    if expected == "FAIL":
        assert "more than 600 s" in line and "dropped as replays" in line


# -- the monthly API budget ---------------------------------------------------------------------------
async def test_unset_api_budget_warns_with_the_plans_quota(
    feishu: tuple[FeishuDouble, str], setup: Setup, tmp_path: Path
) -> None:
    code, checks = await diagnose(setup.config(dingtalk={"monthly_api_budget": 0}))
    line = checks["dingtalk api budget"]
    assert code == 0 and status(line) == "WARN", line
    assert "monthly_api_budget is not set" in line and "a standard DingTalk org: 5,000" in line
    _, domain = feishu
    _, checks = await diagnose(feishu_config(domain, setup.model_url, tmp_path))
    line = checks["feishu api budget"]
    assert status(line) == "WARN" and "Feishu's free plan: 10,000" in line, line


async def test_api_budget_card_streaming_would_use_up_warns(setup: Setup) -> None:
    cards = {"card_template_id": "tpl", "stream_interval": 0.5}
    # A card answer: create, one update every 0.5 s of a 10 s answer, final update, finish = 23 calls.
    _, checks = await diagnose(setup.config(dingtalk={**cards, "monthly_api_budget": 5000}))
    line = checks["dingtalk api budget"]
    assert status(line) == "WARN", line
    assert "about 23 API calls" in line and "about 217 answers a month" in line and "stream_interval" in line
    _, checks = await diagnose(setup.config(dingtalk={**cards, "monthly_api_budget": 100_000}))
    line = checks["dingtalk api budget"]
    assert status(line) == "PASS" and "about 4,348 answers a month" in line, line
    # Without a card, answers go through the sessionWebhook, which the API quota does not count.
    _, checks = await diagnose(setup.config(dingtalk={"monthly_api_budget": 50}))
    line = checks["dingtalk api budget"]
    assert status(line) == "PASS" and "sessionWebhook" in line, line
