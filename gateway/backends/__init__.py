"""Answer backends, one module per provider, behind `Backend` (`base`); `create_backend` picks one.

A new provider is a module with a class implementing `Backend` (usually an `http.HttpBackend`
subclass), a line in `PROVIDERS`, and its name in `gateway.config`'s provider choices.
"""

from __future__ import annotations

import aiohttp

from ..config import ModelConfig
from ..metrics import Metrics
from .base import Backend, BackendRequest, Completion, Delta, DeltaKind, Message, Source, Usage
from .coze import CozeBackend
from .dify import DifyBackend
from .echo import EchoBackend
from .fastgpt import FastGPTBackend
from .http import HttpBackend
from .openai import OpenAIBackend

__all__ = [
    "PROVIDERS",
    "Backend",
    "BackendRequest",
    "Completion",
    "Delta",
    "DeltaKind",
    "EchoBackend",
    "Message",
    "OpenAIBackend",
    "Source",
    "Usage",
    "create_backend",
    "uses_echo",
]

# `[model] provider` -> the backend class; "auto" and "echo" are settled by `uses_echo` first.
PROVIDERS: dict[str, type[HttpBackend]] = {
    "auto": OpenAIBackend,
    "openai": OpenAIBackend,
    "coze": CozeBackend,
    "dify": DifyBackend,
    "fastgpt": FastGPTBackend,
}


def uses_echo(cfg: ModelConfig) -> bool:
    """Whether `cfg` selects the echo backend (asked for, or `auto` without a base URL)."""
    return cfg.provider == "echo" or (cfg.provider == "auto" and not cfg.base_url)


def create_backend(cfg: ModelConfig, session: aiohttp.ClientSession, metrics: Metrics) -> Backend:
    if uses_echo(cfg):
        return EchoBackend()
    return PROVIDERS[cfg.provider](cfg, session, metrics)
