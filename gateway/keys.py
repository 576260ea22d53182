"""Every object shared through the aiohttp app, under a typed `web.AppKey` (no string keys)."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver

from .alerts import Monitor
from .auth import AdminAuth
from .backends import Backend
from .channel import Channel
from .config import Config
from .dispatcher import Dispatcher
from .keyage import KeyAges
from .metrics import Metrics
from .outbox import Outbox
from .reload import LiveConfig
from .responder import Responder
from .schedules import Clock, Scheduler
from .store import Store

CONFIG = web.AppKey("config", Config)  # as loaded at start; LIVE has the reloaded one
METRICS = web.AppKey("metrics", Metrics)
HTTP = web.AppKey("http", aiohttp.ClientSession)
STORE = web.AppKey("store", Store)
MODEL = web.AppKey("model", Backend)  # the backend built at start; see Responder.model
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
RESPONDER = web.AppKey("responder", Responder)
CHANNELS = web.AppKey("channels", dict[str, Channel])
STARTED_AT = web.AppKey("started_at", float)
LIVE = web.AppKey("live", LiveConfig)
AUTH = web.AppKey("auth", AdminAuth)
ALERTS = web.AppKey("alerts", Monitor)
OUTBOX = web.AppKey("outbox", Outbox)  # proactive messages: the send API, schedules, alerts
SCHEDULER = web.AppKey("scheduler", Scheduler)  # [[schedules]]: their loop, and what the status page shows
KEY_AGES = web.AppKey("key_ages", KeyAges)  # when each configured secret was first seen
# Optional: the DNS resolver of the HTTP client session (tests use it to make names fail to resolve
# without asking a real DNS server); absent = aiohttp's default.
RESOLVER = web.AppKey("resolver", AbstractResolver)
# Optional: the scheduler's clock (tests drive time with it); absent = the system clock.
SCHEDULE_CLOCK = web.AppKey("schedule_clock", Clock)
