"""Secrets stay secret: a full conversation with known secrets, then every byte the gateway emitted
(logs, stderr, replies, /metrics, /readyz, pages) is searched for them. Config dumps mask them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import typing
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.config import SECRET_KEYS, Config, ConfigError, build, masked
from gateway.logs import JsonFormatter
from tests.conftest import make_config
from tests.doubles.openai import OpenAIDouble
from tests.process import GatewayProcess

BAD_KEY, GOOD_KEY = "sk-live-AAAA1111bad", "sk-live-BBBB2222good"
SECRETS = {
    "BOTGATE_MODEL__API_KEYS": f"{BAD_KEY},{GOOD_KEY}",
    "BOTGATE_ADMIN__PASSWORD": "admin-pw-C3C3C3",
    "BOTGATE_ADMIN__JWT_SECRET": "jwt-secret-D4D4D4-of-at-least-32-bytes",
    "BOTGATE_ADMIN__METRICS_TOKEN": "metrics-token-E5E5E5",
    # Platforms stay disabled, but their secrets are configured and must not leak either.
    "BOTGATE_DINGTALK__CLIENT_ID": "ding-client-id",
    "BOTGATE_DINGTALK__CLIENT_SECRET": "ding-secret-F6F6F6",
    "BOTGATE_FEISHU__APP_ID": "cli_feishu_app",
    "BOTGATE_FEISHU__APP_SECRET": "feishu-secret-G7G7G7",
    "BOTGATE_FEISHU__ENCRYPT_KEY": "feishu-encrypt-H8H8H8",
    "BOTGATE_FEISHU__VERIFICATION_TOKEN": "feishu-verify-I9I9I9",
    "BOTGATE_ALERTS__DINGTALK_WEBHOOK": "https://alerts.invalid/robot/send?access_token=alert-tok-J0J0J0",
    "BOTGATE_ALERTS__DINGTALK_SECRET": "alert-secret-K1K1K1",
}
SECRET_VALUES = [
    BAD_KEY,
    GOOD_KEY,
    "alert-tok-J0J0J0",  # a token inside a secret URL must not show up on its own either
    *(v for k, v in SECRETS.items() if k != "BOTGATE_MODEL__API_KEYS" and "_ID" not in k),
]


def leaky_model(double: OpenAIDouble) -> web.Application:
    """The OpenAI double, plus what real providers do: error bodies that quote the API key."""

    async def completions(request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if key == BAD_KEY:
            return web.json_response({"error": {"message": f"Incorrect API key provided: {key}"}}, status=401)
        last = (await request.json())["messages"][-1]["content"]
        if isinstance(last, str) and last.startswith("leak:"):
            status = int(last.split()[0].partition(":")[2])
            return web.json_response({"error": {"message": f"request with key {key} failed"}}, status=status)
        return await double.completions(request)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    return app


async def login(url: str) -> dict[str, str]:
    """An admin password is set, so the web chat and the status page need a login."""
    async with aiohttp.ClientSession() as session:
        password = SECRETS["BOTGATE_ADMIN__PASSWORD"]
        async with session.post(f"{url}/login", json={"password": password}) as resp:
            return {"Authorization": f"Bearer {(await resp.json())['token']}"}


async def converse(url: str, texts: list[str]) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession(headers=await login(url)) as session,
        session.ws_connect(f"{url}/chat/ws?session=secretsession1") as ws,
    ):
        await ws.receive()
        for i, text in enumerate(texts):
            await ws.send_str(orjson.dumps({"type": "message", "id": f"m{i}", "text": text}).decode())
            async with asyncio.timeout(30):
                while (frame := orjson.loads((await ws.receive()).data))["type"] not in (
                    "done",
                    "notice",
                    "error",
                ):
                    frames.append(frame)
            frames.append(frame)
    return frames


async def test_no_secret_in_any_output(
    spawn_gateway: Callable[..., GatewayProcess], aiohttp_server: Callable[..., Any]
) -> None:
    double = OpenAIDouble()
    model = await aiohttp_server(leaky_model(double))
    env = {
        **SECRETS,
        "BOTGATE_MODEL__BASE_URL": str(model.make_url("/v1")),
        "BOTGATE_MODEL__MAX_RETRIES": "1",
        "BOTGATE_LOG__LEVEL": "DEBUG",  # the most talkative the gateway gets
    }
    gw = spawn_gateway(env=env, start=False)
    await asyncio.to_thread(gw.start)

    frames = await converse(gw.url, ["hello there", "leak:400 please", "leak:500 again"])
    answers = [f["text"] for f in frames if f["type"] in ("done", "notice")]
    assert answers[0] == "echo: hello there"
    assert all("模型现在没有响应" in text for text in answers[1:]), answers  # model down, in Chinese
    assert f"Bearer {GOOD_KEY}" in double.auth_headers  # the keys really were used

    bodies = []
    admin = await login(gw.url)
    scrape = {"Authorization": f"Bearer {SECRETS['BOTGATE_ADMIN__METRICS_TOKEN']}"}
    async with aiohttp.ClientSession() as session:
        for path, headers in (
            ("/healthz", {}),
            ("/readyz", {}),
            ("/metrics", scrape),
            ("/chat", admin),
            ("/", admin),  # the status page shows the whole (masked) config
            ("/api/status", admin),
            ("/nope", {}),
        ):
            async with session.get(gw.url + path, headers=headers) as resp:
                assert resp.status == (404 if path == "/nope" else 200), path
                bodies.append(await resp.text())
    assert await asyncio.to_thread(gw.stop) == 0

    logs = gw.output()
    assert "***" in logs  # the key-quoting error bodies were logged, masked
    emitted = {"logs": logs, "replies": orjson.dumps(frames).decode(), "http": "\n".join(bodies)}
    for where, text in emitted.items():
        leaked = [s for s in SECRET_VALUES if s in text]
        assert not leaked, f"{where} leak {leaked}"


# not sections: arrays of tables (tests/test_bots_config.py)
LISTS = ("source", "agents", "bots", "routes", "schedules")


def test_masked_dump_hides_every_secret_key() -> None:
    hints = {
        name: typing.get_type_hints(cls)
        for name, cls in typing.get_type_hints(Config).items()
        if name not in LISTS
    }
    values: dict[str, dict[str, Any]] = {}
    for key in SECRET_KEYS:
        section, name = key.split(".")
        secret = f"s3cret-{section}-{name}-padded-to-32-bytes"
        values.setdefault(section, {})[name] = [secret] if hints[section][name] == list[str] else secret
    values["store"] = {"url": "redis://:s3cret-store-password@127.0.0.1:6379/0"}
    cfg = make_config(**values)
    dump = orjson.dumps(masked(cfg)).decode()
    assert "s3cret-store-password" not in dump and "s3cret-store-password" in cfg.secrets()
    for key in SECRET_KEYS:
        section, name = key.split(".")
        assert f"s3cret-{section}-{name}-padded-to-32-bytes" not in dump
        assert masked(cfg)[section][name] == "***"
        assert f"s3cret-{section}-{name}-padded-to-32-bytes" in cfg.secrets()  # so the log formatter masks it too


def test_every_secret_looking_key_is_a_secret_key() -> None:
    """A new key named like a secret must be added to SECRET_KEYS (and Config.secrets())."""
    pattern = re.compile(r"(secret|password|_token|api_keys|encrypt_key|webhook)$")
    for section, cls in typing.get_type_hints(Config).items():
        if section in LISTS:
            continue
        for f in dataclasses.fields(cls):
            if pattern.search(f.name):
                assert f"{section}.{f.name}" in SECRET_KEYS


def test_config_errors_do_not_echo_secret_values() -> None:
    with pytest.raises(ConfigError) as err:
        build({"admin": {"password": 31337_4242}}, env={})
    assert "admin.password" in str(err.value) and "31337" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        build({"model": {"api_keys": ["sk-ok", 99_887_766]}}, env={})
    assert "model.api_keys" in str(err.value) and "sk-ok" not in str(err.value)


@pytest.mark.parametrize("secret", ['pa"ss\\word-1', "tab\there-2", "ünï-cödé-3"])
def test_log_masking_survives_json_escaping(secret: str) -> None:
    record = logging.makeLogRecord({"msg": "value %s", "args": (secret,), "levelname": "INFO"})
    line = JsonFormatter([secret]).format(record)
    assert orjson.loads(line)["message"] == "value ***"
