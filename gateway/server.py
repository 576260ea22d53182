"""Serving the app as a service: bind (optionally TLS), tell systemd, and act on signals.

SIGTERM/SIGINT: STOPPING=1, stop listening, drain the dispatcher (`on_shutdown`), close everything,
return (run.py exits 0). SIGHUP: RELOADING=1, `gateway.app.reload_config` (re-read the config file,
apply what can change live — see `gateway.reload` — plus the TLS certificate, name the keys that need
a restart), READY=1. aiohttp's `run_app` is not used because it binds only after start-up hooks
have run, and READY=1 must follow the bind.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

from aiohttp import web

from .app import reload_config
from .config import Config, ConfigError
from .keys import LIVE
from .sdnotify import Notifier

log = logging.getLogger(__name__)

# A reload re-reads the certificate files (renewals) while serving TLS; switching TLS on or off
# needs a restart.
TLS_KEYS = frozenset({"server.tls_cert", "server.tls_key"})


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
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=cfg.dispatcher.drain_timeout + 5)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        try:
            await runner.setup()  # every cleanup_ctx: store, model, dispatcher, channels
            site = web.TCPSite(runner, cfg.server.host, cfg.server.port, ssl_context=self._tls)
            await site.start()
            log.info("serving", extra={"url": self._where})
            self._notifier.ready(f"serving on {self._where}")
            self._serving.set()
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
