"""What every scenario gets: cores, a work directory, the mode, and the platform doubles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dingtalk import DingTalkDouble
from .env import Cores, free_port
from .feishu import FeishuDouble
from .servers import ServerProcess, dingtalk_section, feishu_section, gateway, gateway_sections


class BenchError(Exception):
    """Something is broken (not merely slow): the bench exits non-zero, also in --quick."""


@dataclass(slots=True)
class Context:
    cores: Cores
    workdir: Path
    quick: bool

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full


def store_url(kind: str) -> str:
    return {"memory": "memory://", "sqlite": "sqlite:///bench.sqlite3"}[kind]


@dataclass(slots=True)
class Channels:
    """The platform doubles a gateway is connected to (None: that channel is not configured)."""

    dingtalk: DingTalkDouble | None = None
    feishu: FeishuDouble | None = None

    def names(self) -> str:
        names = [n for n, d in (("DingTalk Stream", self.dingtalk), ("Feishu ws", self.feishu)) if d]
        return " + ".join(names) or "none"


@asynccontextmanager
async def channel_doubles(dingtalk: bool = True, feishu: bool = True) -> AsyncIterator[Channels]:
    """Start the doubles asked for."""
    channels = Channels(
        await DingTalkDouble().start() if dingtalk else None,
        await FeishuDouble().start() if feishu else None,
    )
    try:
        yield channels
    finally:
        for double in (channels.dingtalk, channels.feishu):
            if double is not None:
                await double.stop()


def gateway_for(
    ctx: Context,
    model_url: str | None,
    channels: Channels,
    store: str = "memory",
    name: str = "gateway",
    **overrides: dict[str, Any],
) -> ServerProcess:
    sections = gateway_sections(free_port(), model_url, store_url(store), **overrides)
    if channels.dingtalk is not None:
        sections["dingtalk"] = dingtalk_section(channels.dingtalk.api_base, channels.dingtalk.sink.server.url)
    if channels.feishu is not None:
        sections["feishu"] = feishu_section(channels.feishu.domain)
    return gateway(ctx.cores, ctx.workdir, sections, name)
