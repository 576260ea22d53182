"""What every scenario gets: cores, a work directory, the mode, and which prerequisites exist."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dingtalk import DingTalkDouble
from .drivers import DingTalkStreamDriver, Driver, WebChatDriver
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


def adapter(platform: str) -> bool:
    """The platform adapter is merged (handlers/dingtalk, handlers/feishu)."""
    return importlib.util.find_spec(f"handlers.{platform}") is not None


def sqlite_store() -> bool:
    from gateway.errors import StoreError
    from gateway.store import open_store

    try:
        open_store("sqlite:///probe.sqlite3", Path(tempfile.gettempdir()))
    except StoreError:
        return False
    return True


MISSING_DINGTALK = "needs the DingTalk adapter (handlers/dingtalk, branch dingtalk), not merged yet"
MISSING_FEISHU = "needs the Feishu adapter (handlers/feishu, branch feishu), not merged yet"
MISSING_SQLITE = "needs the SQLite store (gateway/store, branch store), not merged yet"


def store_url(kind: str) -> str:
    return {"memory": "memory://", "sqlite": "sqlite:///bench.sqlite3"}[kind]


@dataclass(slots=True)
class Channels:
    """The platform doubles a gateway is connected to (None where the adapter is missing)."""

    dingtalk: DingTalkDouble | None = None
    feishu: FeishuDouble | None = None

    def names(self) -> str:
        names = [n for n, d in (("DingTalk Stream", self.dingtalk), ("Feishu ws", self.feishu)) if d]
        return " + ".join(names) or "none (adapters not merged; web chat only)"


@asynccontextmanager
async def channel_doubles(dingtalk: bool = True, feishu: bool = True) -> AsyncIterator[Channels]:
    """Start the doubles for the adapters that exist (and were asked for)."""
    channels = Channels(
        await DingTalkDouble().start() if dingtalk and adapter("dingtalk") else None,
        await FeishuDouble().start() if feishu and adapter("feishu") else None,
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


def driver_for(proc: ServerProcess, channels: Channels) -> Driver:
    """Conversations over DingTalk Stream when that adapter exists, else over the web chat."""
    if channels.dingtalk is not None:
        return DingTalkStreamDriver(channels.dingtalk)
    return WebChatDriver(proc.url)
