"""Serving the app as a service: bind (optionally TLS), tell systemd, and act on signals.

SIGTERM/SIGINT: STOPPING=1, stop listening, drain the dispatcher (`on_shutdown`), close everything,
return (run.py exits 0). SIGHUP: RELOADING=1, `gateway.app.reload_config` (re-read the config file,
apply what can change live — see `gateway.reload` — plus the TLS certificate, name the keys that need
a restart), READY=1. aiohttp's `run_app` is not used because it binds only after start-up hooks
have run, and READY=1 must follow the bind.

Every connection has deadlines (`[server] keepalive_timeout`, `header_timeout`, `body_timeout`;
`GuardedRequestHandler`): a hand-built `AppRunner` would otherwise keep an idle connection for
aiohttp's default of 3,630 s, and a client trickling its headers or body would hold a descriptor
(and the body's memory) for as long as it likes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from .app import reload_config
from .config import Config, ConfigError, ServerConfig
from .keys import LIVE
from .sdnotify import Notifier

log = logging.getLogger(__name__)


# -- connection deadlines -------------------------------------------------------------------------
class BodyTimeout(TimeoutError):
    """The client did not send the whole request body within `[server] body_timeout`. Raised by the
    handler's body read (handlers/http.py answers 408). A TimeoutError, so that aiohttp's lingering
    read of an unread body after the response ends quietly on it too."""


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol plus the two deadlines it lacks. Its own keep-alive timer
    closes a connection idle for `keepalive_timeout` (counted from the connection's start and from
    each response), but a client trickling a request in gets all of that time per request, and a
    body may trickle forever. Here:

    * the headers must be complete within `header_timeout` of the first byte of a request, or the
      connection is closed (slowloris);
    * the body must be complete within `body_timeout` of the headers, or its read fails with
      `BodyTimeout` (the handler answers 408 and the connection is closed after the response).

    Nothing changes once a connection is upgraded to a websocket (its heartbeat covers it)."""

    def __init__(self, manager: Server, *, limits: ServerConfig, **kwargs: Any) -> None:
        super().__init__(manager, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self._header_limit = limits.header_timeout
        self._body_limit = limits.body_timeout
        self._header_clock: asyncio.TimerHandle | None = None
        self._body_clock: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the body still arriving, if any

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        in_body = self._body is not None and not self._body.is_eof()
        super().data_received(data)
        if self._upgraded or self._force_close:
            self._stop_clocks()
            return
        new = self._request_count - parsed
        if new:  # headers complete: the clock for the next request starts with its first byte
            self._stop(self._header_clock)
            self._header_clock = None
            for _, payload in list(self._messages)[-new:]:
                if not payload.is_eof():
                    self._start_body_clock(payload)
        elif data and not in_body and self._header_clock is None:
            # The first bytes of a request (when a body ends within this chunk and the next
            # request starts in it too, its clock starts with the following chunk).
            self._header_clock = self._loop.call_later(self._header_limit, self._headers_late)

    def _start_body_clock(self, payload: StreamReader) -> None:
        self._stop(self._body_clock)
        self._body = payload
        self._body_clock = self._loop.call_later(self._body_limit, self._body_late, payload)
        payload.on_eof(self._body_clock.cancel)

    def _headers_late(self) -> None:
        self._header_clock = None
        log.debug("request headers not received in time, connection closed",
                  extra={"timeout": self._header_limit, "client_ip": _peer(self)})  # fmt: skip
        self.force_close()

    def _body_late(self, payload: StreamReader) -> None:
        self._body_clock = None
        if payload.is_eof() or payload.exception() is not None:
            return
        log.debug("request body not received in time",
                  extra={"timeout": self._body_limit, "client_ip": _peer(self)})  # fmt: skip
        payload.set_exception(BodyTimeout(f"request body not received within {self._body_limit:g} s"))

    @staticmethod
    def _stop(clock: asyncio.TimerHandle | None) -> None:
        if clock is not None:
            clock.cancel()

    def _stop_clocks(self) -> None:
        self._stop(self._header_clock)
        self._stop(self._body_clock)
        self._header_clock = self._body_clock = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_clocks()
        self._body = None
        super().connection_lost(exc)


def _peer(handler: RequestHandler) -> str:
    peer = handler.peername
    return str(peer[0]) if isinstance(peer, tuple) else ""


class GuardedServer(Server):
    """aiohttp's server, making a `GuardedRequestHandler` per connection."""

    def __init__(self, *args: Any, limits: ServerConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, limits=self._limits, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """`web.AppRunner` serving through `GuardedServer`: the app's start-up runs as usual, then its
    request handler is served with our connection deadlines."""

    def __init__(self, app: web.Application, limits: ServerConfig, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> Server:
        plain = await super()._make_server()  # the app's on_startup/cleanup_ctx, then freezes it
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            limits=self._limits,
            **self._kwargs,
        )

# A reload re-reads the certificate files (renewals) while serving TLS; switching TLS on or off
# needs a restart.
TLS_KEYS = frozenset({"server.tls_cert", "server.tls_key"})


# The cyclic collector's thresholds once serving (https://docs.python.org/3/library/gc.html). Every
# answer in flight holds a few hundred container objects (two HTTP exchanges, its tasks, buffers)
# for the model's whole answer time, so they outlive young collections and are walked again by each
# one until they die; and at the default (700, 10, 10) they reach the oldest generation and make a
# full collection due every few seconds. Measured on the bench machine at 1,000 answers/s: the
# collector took ~20 % of the CPU (full collections a third of that, 30-70 ms stalls of every
# message in flight: the overhead p99 of BENCHMARKS.md scenario 3). With the start-up heap frozen
# and a young collection after 20,000 net new objects instead of 700 it takes ~7 %, a full
# collection comes after 2,000,000 (every few tens of seconds at 200 msg/s) and walks only what
# came after start-up. The price is memory: ~35 MB more peak RSS on the SQLite store with 200
# conversations answered at once (BENCHMARKS.md scenario 5), garbage waiting longer for its
# collection. A young collection walks at most ~20,000 objects (~10-30 ms on that machine, every
# few seconds at 200 msg/s); the overhead p99 at 200 msg/s stayed where it was with 700.
GC_THRESHOLDS = (20_000, 10, 10)


def tune_collector() -> None:
    """Once serving: what start-up made (modules, config, the app, the clients: ~50,000 objects,
    alive until exit) moved out of the collector's sight (`gc.freeze`), so a full collection walks
    only what came after, and collections made rarer (`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server TLS context for `[server] tls_cert`/`tls_key`, or None for plain HTTP."""
    if not config.server.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, config)
    return context


def _load_chain(context: ssl.SSLContext, config: Config) -> None:
    cert, key = config.server.tls_cert, config.server.tls_key
    try:
        context.load_cert_chain(cert, key)
    except OSError as e:
        # ssl.SSLError is an OSError too; strerror is the short human part when there is one.
        why = e.strerror or str(e)
        raise ConfigError(
            f"{config.source}: server.tls_cert/tls_key: cannot load {cert} / {key}: {why}"
        ) from None


class Service:
    """One serving run of the app: `await Service(...).run()` returns after a graceful stop."""

    def __init__(
        self,
        app: web.Application,
        config: Config,
        *,
        notifier: Notifier,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._app = app
        self._config = config
        self._notifier = notifier
        self._tls = tls
        self._stop = asyncio.Event()
        self._serving = asyncio.Event()
        self._reloads: set[asyncio.Task[None]] = set()
        app.cleanup_ctx.append(notifier.watchdog)  # last: pings only while everything else is up
        if tls is not None:
            app[LIVE].add_applier(TLS_KEYS, self._reload_certificate)

    @property
    def _where(self) -> str:
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{self._config.server.host}:{self._config.server.port}"

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop gracefully. Start-up errors propagate."""
        cfg = self._config
        runner = GuardedRunner(
            self._app, cfg.server, access_log=None, shutdown_timeout=cfg.dispatcher.drain_timeout + 5
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        try:
            await runner.setup()  # every cleanup_ctx: store, model, dispatcher, channels
            site = web.TCPSite(runner, cfg.server.host, cfg.server.port, ssl_context=self._tls)
            await site.start()
            log.info("serving", extra={"listen_url": self._where})
            self._notifier.ready(f"serving on {self._where}")
            self._serving.set()
            tune_collector()
            await self._stop.wait()
            self._notifier.stopping("draining in-flight conversations")
        finally:
            for task in list(self._reloads):
                task.cancel()
            await asyncio.gather(*self._reloads, return_exceptions=True)
            await runner.cleanup()  # stop listening, drain (on_shutdown), close contexts
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _on_stop(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.info("already stopping, still draining", extra={"signal": sig.name})
            return
        log.info("stop requested", extra={"signal": sig.name})
        self._stop.set()

    def _on_hup(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload(), name="config-reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self) -> None:
        await self._serving.wait()  # a SIGHUP during start-up applies once everything is up
        self._notifier.reloading()
        try:
            await reload_config(self._app)
        except ConfigError as e:
            log.error("reload failed, keeping the running config: %s", e)
            self._notifier.reloaded(f"serving on {self._where}; last reload failed")
            return
        self._notifier.reloaded(f"serving on {self._where}")

    def _reload_certificate(self, new: Config) -> None:
        if self._tls is None:
            return
        if not new.server.tls_cert:
            raise ConfigError(f"{new.source}: server.tls_cert: turning TLS off needs a restart")
        _load_chain(self._tls, new)  # new handshakes use the renewed certificate
