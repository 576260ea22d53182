"""Shared fixtures: configs pointed at local doubles, a running gateway, an OpenAI double."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import handlers
from gateway.app import create_app
from gateway.config import Config, build
from tests.doubles.openai import OpenAIDouble

# websockets honours proxy variables even for 127.0.0.1 (protocols.md §0.8).
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"


def make_config(**sections: dict[str, Any]) -> Config:
    """A config from defaults plus `sections` (e.g. model={"base_url": ...}), without env."""
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
def gateway(aiohttp_client: Callable[..., Any]) -> Callable[..., Any]:
    """Start a full gateway (core + handlers) for a config; returns its test client."""

    async def start(config: Config) -> TestClient:
        app = create_app(config, [handlers.setup])
        client: TestClient = await aiohttp_client(TestServer(app, host="127.0.0.1"))
        return client

    return start
