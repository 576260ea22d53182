"""Several bots and agents in one config: `[[agents]]`, `[[dingtalk.bots]]`, `[[feishu.bots]]`,
`[[routes]]`, their secrets from the environment and every error naming the key and the bot."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load
from gateway.keyage import configured_keys

BOTS = """
[model]
system_prompt = "default persona"

[[agents]]
name = "hr"
provider = "openai"
base_url = "https://api.deepseek.com/v1"
model = "deepseek-chat"
system_prompt = "你是公司的人事助手"
group_context = "per_user"

[[agents]]
name = "it"

[[dingtalk.bots]]
name = "hrbot"
client_id = "ding-hr"
agent = "hr"
api_base = "http://127.0.0.1:1"

[[dingtalk.bots]]
name = "it-bot"
client_id = "ding-it"
agent = "it"

[[feishu.bots]]
name = "itbot"
app_id = "cli_it"
agent = "it"
domain = "https://open.larksuite.com"

[[routes]]
platform = "dingtalk"
bot = "hrbot"
conversation = "cidFIN"
agent = "it"
"""

SECRETS = {
    "BOTGATE_DINGTALK__BOTS__HRBOT__CLIENT_SECRET": "s-hr",
    "BOTGATE_DINGTALK__BOTS__IT_BOT__CLIENT_SECRET": "s-it",
    "BOTGATE_FEISHU__BOTS__ITBOT__APP_SECRET": "s-fs",
    "BOTGATE_AGENTS__HR__API_KEYS": "sk-1,sk-2",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "botgate.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text), SECRETS if env is None else env)
    return str(err.value)


def test_bots_agents_and_routes(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, BOTS), SECRETS)
    assert [b.key for b in cfg.enabled_bots()] == ["dingtalk/hrbot", "dingtalk/it-bot", "feishu/itbot"]
    hr = cfg.bots[0]
    assert hr.agent == "hr" and hr.settings.client_secret == "s-hr"  # type: ignore[union-attr]
    assert hr.settings.api_base == "http://127.0.0.1:1"  # type: ignore[union-attr]
    assert cfg.bots[1].settings.api_base == "https://api.dingtalk.com"  # type: ignore[union-attr]
    assert cfg.bots[2].settings.domain == "https://open.larksuite.com"  # type: ignore[union-attr]
    agent = cfg.agent("hr")
    assert agent.model.api_keys == ["sk-1", "sk-2"] and agent.model.model == "deepseek-chat"
    assert agent.group_context == "per_user" and agent.model.max_tokens == 1024  # inherited from [model]
    assert cfg.agent("it").model.system_prompt == "default persona"
    assert cfg.agent("default").model is cfg.model
    assert cfg.agent_for("dingtalk", "hrbot", "cidFIN") == "it"  # the route
    assert cfg.agent_for("dingtalk", "hrbot", "cidOTHER") == "hr"  # the bot's agent
    assert cfg.agent_for("feishu", "itbot", "oc_1") == "it"
    assert {"s-hr", "s-it", "s-fs", "sk-1", "sk-2"} <= set(cfg.secrets())
    assert not cfg.dingtalk.enabled and not cfg.feishu.enabled  # a config of bots alone


def test_names_that_share_an_environment_name_are_refused(tmp_path: Path) -> None:
    text = BOTS.replace('name = "hrbot"', 'name = "it_bot"').replace('bot = "hrbot"', 'bot = "it_bot"')
    env = {"BOTGATE_DINGTALK__BOTS__IT_BOT__CLIENT_SECRET": "s-it", "BOTGATE_FEISHU__BOTS__ITBOT__APP_SECRET": "s"}
    assert error_of(tmp_path, text, env).endswith(
        "dingtalk.bots[it-bot].name: 'it-bot' and 'it_bot' share the environment name "
        "BOTGATE_DINGTALK__BOTS__IT_BOT__…"
    )
    text = BOTS.replace('name = "it"\n', 'name = "HR"\n')
    assert "agents[HR].name: 'HR' and 'hr' share the environment name BOTGATE_AGENTS__HR__…" in error_of(
        tmp_path, text
    )


def test_key_age_tracks_every_bot_and_agent_secret(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, BOTS), SECRETS)
    assert dict(configured_keys(cfg)) == {
        "[[agents]] hr api_keys #1": "sk-1",
        "[[agents]] hr api_keys #2": "sk-2",
        "[[dingtalk.bots]] hrbot client_secret": "s-hr",
        "[[dingtalk.bots]] it-bot client_secret": "s-it",
        "[[feishu.bots]] itbot app_secret": "s-fs",
    }


def test_single_app_section_is_the_default_bot(tmp_path: Path) -> None:
    text = '[dingtalk]\nenabled = true\nclient_id = "d"\nclient_secret = "s"\n'
    cfg = load(write(tmp_path, text), {})
    assert [(b.key, b.agent) for b in cfg.enabled_bots()] == [("dingtalk/default", "default")]
    assert cfg.bots[0].settings is cfg.dingtalk


def test_a_bot_may_be_switched_off(tmp_path: Path) -> None:
    text = BOTS.replace('name = "it-bot"\n', 'name = "it-bot"\nenabled = false\n')
    env = {k: v for k, v in SECRETS.items() if "IT_BOT" not in k}
    cfg = load(write(tmp_path, text), env)
    assert [b.key for b in cfg.enabled_bots("dingtalk")] == ["dingtalk/hrbot"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('agent = "hr"', 'agent = "hrr"'),
            "dingtalk.bots[hrbot].agent: no agent named 'hrr' (agents: default, hr, it)",
        ),
        (('name = "it-bot"', 'name = "hrbot"'), "dingtalk.bots[hrbot].name: duplicate dingtalk bot name 'hrbot'"),
        (('name = "it"', 'name = "hr"'), "agents[hr].name: duplicate agent name 'hr'"),
        (
            ('name = "it"', 'name = "default"'),
            "agents[default].name: duplicate agent name 'default' (that is [model]'s name)",
        ),
        (('bot = "hrbot"', 'bot = "hbot"'), "routes[1]: matches no enabled bot (platform = 'dingtalk' bot = 'hbot')"),
        (('"cidFIN"\nagent = "it"', '"cidFIN"\nagent = "fin"'), "routes[1].agent: no agent named 'fin'"),
        (
            ('group_context = "per_user"', 'group_context = "each"'),
            "agents[hr].group_context: must be one of shared, per_user",
        ),
        (
            ('group_context = "per_user"', 'reasoning = "hidden"'),
            "agents[hr].reasoning: must be one of strip, fold, show, got 'hidden'",
        ),
        (
            ('api_base = "http://127.0.0.1:1"', 'api_base = "127.0.0.1"'),
            "dingtalk.bots[hrbot].api_base: must be an http(s) URL",
        ),
        (('client_id = "ding-hr"', 'clientid = "ding-hr"'), "dingtalk.bots[hrbot]: unknown key clientid"),
        (('name = "itbot"', 'name = "it bot"'), "feishu.bots[it bot]: name: must be letters, digits, - and _"),
    ],
)
def test_errors_name_the_key_and_the_bot(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    old, new = change
    text = BOTS.replace(old, new, 1)
    env = {k: v for k, v in SECRETS.items() if "IT_BOT" not in k or '"it-bot"' in text}
    assert message in error_of(tmp_path, text, env)


def test_missing_secret_names_its_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in SECRETS.items() if "HRBOT" not in k}
    assert error_of(tmp_path, BOTS, env).endswith(
        "dingtalk.bots[hrbot].client_secret: is required for dingtalk bot 'hrbot' "
        "(set BOTGATE_DINGTALK__BOTS__HRBOT__CLIENT_SECRET)"
    )


def test_secret_for_an_unknown_bot(tmp_path: Path) -> None:
    env = {**SECRETS, "BOTGATE_FEISHU__BOTS__NOBOT__APP_SECRET": "x"}
    assert "environment variable BOTGATE_FEISHU__BOTS__NOBOT__APP_SECRET: no [[feishu.bots]] entry named 'nobot'" in (
        error_of(tmp_path, BOTS, env)
    )


def test_a_webhook_bot_of_feishu_needs_its_keys(tmp_path: Path) -> None:
    text = BOTS.replace('app_id = "cli_it"', 'app_id = "cli_it"\nmode = "webhook"')
    assert error_of(tmp_path, text).endswith(
        "feishu.bots[itbot].verification_token: is required when mode is webhook or both "
        "(set BOTGATE_FEISHU__BOTS__ITBOT__VERIFICATION_TOKEN)"
    )


def test_check_config_names_the_bot(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    path = write(tmp_path, BOTS.replace('agent = "hr"', 'agent = "nobody"'))
    done = subprocess.run(
        [sys.executable, str(root / "run.py"), "--check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **SECRETS},
        timeout=60,
        cwd=root,
    )
    assert done.returncode != 0
    assert "dingtalk.bots[hrbot].agent: no agent named 'nobody'" in done.stdout + done.stderr
