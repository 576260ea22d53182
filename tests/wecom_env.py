"""A gateway against the WeCom double (tests/doubles/wecom.py), for the tests/test_wecom_*.py files."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.keys import CHANNELS
from handlers.wecom import WeComAdapter
from tests.conftest import make_config
from tests.doubles import wecom as wd
from tests.helpers import sample


def wecom_section(double: wd.WeComDouble, **overrides: Any) -> dict[str, Any]:
    """The `[wecom]` settings of a gateway talking to the (served) double, with short timings."""
    return {
        "enabled": True,
        "bot_id": double.bot_id,
        "secret": double.secret,
        "ws_url": double.ws_url,
        "api_base": double.base_url,
        "bot_name": wd.BOT_NAME,
        "reconnect_delay": 0.05,
        "reconnect_cap": 0.2,
        "stream_interval": 0.02,
        "connection_lease": 0.6,
        **overrides,
    }


@dataclass
class WeComEnv:
    double: wd.WeComDouble
    client: TestClient[web.Request, web.Application]

    @property
    def adapter(self) -> WeComAdapter:
        adapter = self.client.app[CHANNELS]["wecom/default"]
        assert isinstance(adapter, WeComAdapter)
        return adapter

    def sample(self, name: str, **labels: str) -> float:
        return sample(self.client.app, name, **labels)

    async def connected(self) -> None:
        """The double has a subscribed socket and the loop said connected()."""
        await self.double.wait_for(lambda: self.double.live)
        async with asyncio.timeout(10):
            await self.adapter.wait_connected()


async def start(
    aiohttp_server: Callable[..., Any],
    gateway: Callable[..., Any],
    *,
    model_url: str = "",
    double: dict[str, Any] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    connect: bool = True,
    **wecom: Any,
) -> WeComEnv:
    """A double on a random port and a gateway configured against it (model: the OpenAI double or echo)."""
    served = await wd.start(aiohttp_server, **(double or {}))
    sections = dict(sections or {})
    model = {"base_url": model_url} if model_url else {}
    model.update(sections.pop("model", {}))
    config = make_config(wecom=wecom_section(served, **wecom), model=model, cache={"enabled": False}, **sections)
    env = WeComEnv(served, await gateway(config))
    if connect and config.wecom.mode != "webhook":
        await env.connected()
    return env
