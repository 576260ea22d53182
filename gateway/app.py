"""The app factory: composes the core's resources as `cleanup_ctx` contexts, in dependency order.

Up: HTTP client session -> store -> model client -> dispatcher -> outbox -> whatever `setup`
functions add (the platform adapters and routes, from `handlers`) -> the inbox resumed and the
outbox's courier, once the adapters can deliver -> the scheduler (`[[schedules]]`). Down in reverse. Intake
stops and the dispatcher drains in the first `on_shutdown` hook, i.e. while adapters can still
deliver replies; adapters' own `on_shutdown` hooks (closing client sockets) run after it.
`reload_config` (admin API, SIGHUP via `gateway.server`) applies a re-read config file. At start
and after every reload the configured secrets' first-seen dates are recorded (`gateway.keyage`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable

import aiohttp
from aiohttp import web

from . import __version__
from .auth import AdminAuth
from .backends import Backend, create_backend
from .channel import Channel
from .config import Config
from .dispatcher import Dispatcher
from .document_step import documents_ctx
from .egress import client_session, proxy_policy
from .errors import StoreError
from .keyage import KEY_AGES_FILE, KeyAges
from .keys import (
    CHANNELS,
    CONFIG,
    DISPATCHER,
    HTTP,
    KEY_AGES,
    LIVE,
    METRICS,
    MODEL,
    OUTBOX,
    RESOLVER,
    RESPONDER,
    STARTED_AT,
    STORE,
)
from .metrics import Metrics
from .outbox import Outbox
from .reload import LiveConfig, ReloadReport, apply_logging, plan, read_config
from .responder import Responder
from .schedules import schedules_ctx
from .store import open_store
from .tasks import stop_task

log = logging.getLogger(__name__)

Setup = Callable[[web.Application], None]
ADOPT_INTERVAL = 30.0  # seconds between looks for a dead instance's unanswered messages


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    # Every model call in flight holds a connection, and its replies (streaming card pushes, reply
    # POSTs) need more at the same time: a pool smaller than that queues replies behind model calls
    # (bench: web chat p99 267 ms with limit=200, 12.6 ms unbounded). So: two per concurrent answer
    # plus room for token, endpoint and attachment calls; no per-host cap (one model host).
    limit = 2 * app[CONFIG].dispatcher.max_concurrency + 64
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, ttl_dns_cache=300, resolver=app.get(RESOLVER)
    )
    # Every outbound call, websockets included, honours the proxy settings (gateway/egress.py).
    proxy = proxy_policy(app[CONFIG]).describe()
    if proxy:
        log.info("outbound calls go through a proxy", extra={"proxy": proxy})
    async with client_session(
        app[CONFIG], connector=connector, headers={"User-Agent": f"botgate/{__version__}"}
    ) as session:
        app[HTTP] = session
        yield


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    store = open_store(cfg.store.url, cfg.state_dir, cfg.store.durability)
    await store.open()
    app[STORE] = store
    try:
        yield
    finally:
        await store.close()


async def _key_ages_ctx(app: web.Application) -> AsyncIterator[None]:
    await asyncio.to_thread(app[KEY_AGES].record, app[LIVE].config)
    yield


async def _model_ctx(app: web.Application) -> AsyncIterator[None]:
    app[MODEL] = create_backend(app[CONFIG].model, app[HTTP], app[METRICS])
    yield


async def _dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    channels: dict[str, Channel] = app[CHANNELS]
    responder = Responder(cfg, app[STORE], app[MODEL], channels, app[METRICS], agent_clients(app, cfg))
    dispatcher = Dispatcher(cfg.dispatcher, app[STORE], app[METRICS], responder, answers=responder.answers)
    app[RESPONDER] = responder
    app[DISPATCHER] = dispatcher
    yield
    # Normally drained already in on_shutdown; this is the backstop (e.g. a failed startup).
    await dispatcher.drain(0.0 if not dispatcher.accepting else cfg.dispatcher.drain_timeout)


async def _outbox_ctx(app: web.Application) -> AsyncIterator[None]:
    live, channels = app[LIVE], app[CHANNELS]
    app[OUTBOX] = Outbox(app[STORE], channels, app[METRICS], lambda: live.in_force.api)
    yield


async def _courier_ctx(app: web.Application) -> AsyncIterator[None]:
    """Deliver the outbox once the adapters run (what a previous process queued, too)."""
    task = asyncio.create_task(app[OUTBOX].run(), name="outbox")
    yield
    await stop_task(task)


def agent_clients(
    app: web.Application, cfg: Config, running: Config | None = None
) -> dict[str, Backend]:
    """A model client per `[[agents]]` entry (the default agent's is `app[MODEL]`). After a
    reload, an agent whose settings did not change keeps its client (and its keys' cooldowns)."""
    kept: dict[str, Backend] = {}
    if running is not None:
        before = {a.name: a for a in running.agents}
        current = app[RESPONDER].agents
        kept = {a.name: current[a.name] for a in cfg.agents if before.get(a.name) == a and a.name in current}
    return {
        a.name: kept.get(a.name) or create_backend(a.model, app[HTTP], app[METRICS])
        for a in cfg.agents
    }


async def reload_config(app: web.Application) -> ReloadReport:
    """Re-read the config file and apply what can change live (see `gateway.reload`).

    Raises `ConfigError` (the running config stays in force) when the new file is invalid."""
    live = app[LIVE]
    async with live.lock:
        new = await asyncio.to_thread(read_config, live.config.source)
        report = plan(live, new)
        for _, apply in live.appliers:
            apply(new)  # may refuse (ConfigError) while nothing has changed yet
        responder = app[RESPONDER]
        model = responder.model
        if any(key.startswith("model.") for key in report.applied):
            model = create_backend(new.model, app[HTTP], app[METRICS])
        agents = agent_clients(app, new, live.in_force) if "agents" in report.applied else None
        responder.reconfigure(new, model, agents)
        if new.log != live.config.log or new.secrets() != live.config.secrets():
            apply_logging(new)
        if new.admin != live.config.admin:
            AdminAuth.warn_if_ephemeral(new.admin)
        live.follow(new)  # the platform bots' secrets: nothing refuses the reload any more
        await asyncio.to_thread(app[KEY_AGES].record, new)  # before the status pages refresh
        live.commit(new, report)
    return report


async def _resume_inbox(app: web.Application) -> AsyncIterator[None]:
    """Answer what a previous process accepted but never answered (after adapters are up).

    On a shared store, keep looking now and then for entries of an instance that died and is not
    coming back; the age limit leaves live instances time to answer their own."""
    dispatcher, cfg = app[DISPATCHER], app[CONFIG].dispatcher
    try:
        await dispatcher.resume()
    except StoreError as e:
        log.error("could not read the inbox: %s", e)
    task = None
    if app[STORE].backend == "redis":
        older_than = cfg.deadline + 2 * cfg.lease_ttl
        task = asyncio.create_task(_adopt_orphans(dispatcher, older_than), name="adopt-orphans")
    yield
    await stop_task(task)


async def _adopt_orphans(dispatcher: Dispatcher, older_than: float) -> None:
    while True:
        await asyncio.sleep(ADOPT_INTERVAL)
        if not dispatcher.accepting:
            return
        try:
            await dispatcher.resume(older_than)
        except StoreError as e:
            log.warning("could not look for orphaned inbox entries: %s", e)


async def _drain(app: web.Application) -> None:
    if DISPATCHER in app:
        dispatcher, timeout = app[DISPATCHER], app[CONFIG].dispatcher.drain_timeout
        log.info(
            "shutting down: intake stopped, finishing in-flight work",
            extra={"queued": dispatcher.depth, "inflight": dispatcher.inflight, "timeout_s": timeout},
        )
        await dispatcher.drain(timeout)


def create_app(config: Config, setup: Iterable[Setup] = ()) -> web.Application:
    """Build the application. `setup` functions (from `handlers`) add routes and adapters."""
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[CHANNELS] = {}
    app[STARTED_AT] = time.time()
    app[LIVE] = LiveConfig(config)
    # `memory://` keeps nothing on disk (as for the login token): the dates then last one run.
    on_disk = not config.store.url.startswith("memory://")
    app[KEY_AGES] = KeyAges(config.state_dir / KEY_AGES_FILE if on_disk else None)
    app.cleanup_ctx.extend([_http_ctx, _store_ctx, _key_ages_ctx, _model_ctx, _dispatcher_ctx, _outbox_ctx])
    app.cleanup_ctx.append(documents_ctx)  # after the responder: binds its `Documents` step
    app.on_shutdown.append(_drain)
    for fn in setup:
        fn(app)
    app.cleanup_ctx.extend([_resume_inbox, _courier_ctx, schedules_ctx])
    return app

