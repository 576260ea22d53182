"""Every object shared through the aiohttp app, under a typed `web.AppKey` (no string keys)."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver

from .channel import Channel
from .config import Config
from .dispatcher import Dispatcher
from .metrics import Metrics
from .model import ModelClient
from .store import Store

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
HTTP = web.AppKey("http", aiohttp.ClientSession)
STORE = web.AppKey("store", Store)
MODEL = web.AppKey("model", ModelClient)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
CHANNELS = web.AppKey("channels", dict[str, Channel])
STARTED_AT = web.AppKey("started_at", float)
# Optional: the DNS resolver of the HTTP client session (tests use it to make names fail to resolve
# without asking a real DNS server); absent = aiohttp's default.
RESOLVER = web.AppKey("resolver", AbstractResolver)
