"""Fixtures for tests of a gateway on the Feishu double's long connection (a plugin of
tests/conftest.py): `feishu` (the served double and its domain), `feishu_gateway` (start a gateway
against it and the OpenAI double, returning once the long connection pinged), and `answered`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.keys import DISPATCHER
from tests.doubles import feishu as fd
from tests.doubles.feishu import FeishuDouble
from tests.doubles.openai import OpenAIDouble

Client = TestClient[web.Request, web.Application]
Start = Callable[..., Any]


@pytest.fixture
async def feishu(aiohttp_server: Callable[..., Any]) -> tuple[FeishuDouble, str]:
    return await fd.start(aiohttp_server)


@pytest.fixture
def feishu_gateway(feishu: tuple[FeishuDouble, str], openai_double: tuple[OpenAIDouble, str], gateway: Start) -> Start:
    """`await feishu_gateway(**sections)`: a gateway on the double (`fd.config` with `sections`), its
    long connection up unless the mode is webhook. (The doubles come first so that they stop after
    the gateway.)"""

    async def run(**sections: dict[str, Any]) -> Client:
        double, domain = feishu
        client: Client = await gateway(fd.config(domain, openai_double[1], **sections))
        if sections.get("feishu", {}).get("mode", "ws") != "webhook":
            await double.wait_for(lambda: double.pings >= 1)
        return client

    return run


async def answered(client: Client, double: FeishuDouble, message_id: str) -> str:
    """Everything shown in reply to `message_id`, once it is answered and the gateway idle again."""
    await double.wait_for(lambda: double.answer(message_id) is not None)
    await client.app[DISPATCHER].wait_idle()
    text = double.answer(message_id)
    assert text is not None
    return text
