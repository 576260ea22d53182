"""Shared fixtures: configs pointed at local doubles, a running gateway, an OpenAI double."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import handlers
from gateway.app import create_app
from gateway.config import Config, build
from gateway.keys import AUTH
from tests.doubles.openai import OpenAIDouble
from tests.process import GatewayProcess
from tests.redisd import RedisServer

pytest_plugins = ["tests.feishu_env"]  # the Feishu double's fixtures: feishu, feishu_gateway

# websockets honours proxy variables even for 127.0.0.1 (docs/protocols/testing.md §0.8).
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"


def make_config(**sections: dict[str, Any]) -> Config:
    """A config from defaults plus `sections` (e.g. model={"base_url": ...}), without env.

    The store defaults to `memory://` here (fast, nothing on disk); tests of durability pass
    `store={"url": ...}` themselves."""
    sections.setdefault("store", {"url": "memory://"})
    return build(sections, env={}, source="<test>")


@pytest.fixture
async def openai_double(
    aiohttp_server: Callable[..., Any],
) -> AsyncIterator[tuple[OpenAIDouble, str]]:
    """The double and its base URL (`.../v1`); held requests are released at teardown."""
    double = OpenAIDouble()
    server = await aiohttp_server(double.app())
    yield double, str(server.make_url("/v1"))
    double.release()


@pytest.fixture
def gateway(
    aiohttp_client: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    """Start a full gateway (core + handlers) for a config; returns its test client.

    Without an admin password the client sends the gateway's login token (`Authorization: Bearer`),
    as a script on the gateway's machine would; tests of refusals make a client of their own. A
    config without `[server] state_dir` keeps its state (the login token) under the test's tmp_path."""
    if not os.environ.get("STATE_DIRECTORY"):
        monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))

    async def start(config: Config) -> TestClient[web.Request, web.Application]:
        app = create_app(config, [handlers.setup])
        headers = {} if config.admin.password else {"Authorization": f"Bearer {app[AUTH].login_token.current()}"}
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            TestServer(app, host="127.0.0.1"), headers=headers
        )
        return client

    return start


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole run (tests that kill Redis start their own)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared redis-server, emptied for this test."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def spawn_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start `python run.py` subprocesses (config text, extra env); killed at teardown if still up."""
    started: list[GatewayProcess] = []

    def spawn(
        config: str = "",
        env: dict[str, str] | None = None,
        start: bool = True,
        wrapper: list[str] | None = None,
    ) -> GatewayProcess:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        process = GatewayProcess(workdir, config, env, wrapper)
        started.append(process)
        return process.start() if start else process

    yield spawn
    for process in started:
        process.kill()
