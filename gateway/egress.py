"""Outbound HTTP: the client session every call goes out on (platform REST and tokens, the model,
alert robots, and the DingTalk Stream and Feishu websockets), and the proxy it uses.

Which proxy a request takes, decided per request URL (`ProxyPolicy.for_url`):

1. a host matching `NO_PROXY` / `no_proxy` goes direct (comma-separated names; a name also
   matches its subdomains, `*` matches everything; the rules of Python's `urllib.request`);
2. otherwise `[server] proxy` (env `BOTGATE_SERVER__PROXY`), when set, for every scheme;
3. otherwise the proxy variables: `HTTPS_PROXY` for `https://` and `wss://` (`WSS_PROXY` first,
   if set), `HTTP_PROXY` for `http://` and `ws://` (`WS_PROXY` first); lower case wins over upper
   case, as in curl and `urllib`.

Why not aiohttp's `trust_env=True`: it looks up `wss_proxy` for a `wss://` URL and never
`HTTPS_PROXY`, so the long connections would bypass a proxy that every REST call uses; and it
also reads `~/.netrc` for the hosts we call. A proxy's credentials (`http://user:pass@host:port`)
are taken out of its URL and sent as `Proxy-Authorization`, so they are in no URL aiohttp puts
into an error message; `Config.secrets()` masks them in the logs as well.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from .config import Config, is_proxy_url

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Proxy:
    url: URL  # without credentials
    auth: aiohttp.BasicAuth | None

    @classmethod
    def parse(cls, raw: str) -> Proxy | None:
        if not raw or not is_proxy_url(raw):
            return None
        url = URL(raw)
        return cls(url.with_user(None), aiohttp.BasicAuth.from_url(url))

    def __str__(self) -> str:
        """For logs and the status page: never the credentials."""
        return f"{self.url}" + (" (with credentials)" if self.auth else "")


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    http: Proxy | None = None  # for http:// and ws://
    https: Proxy | None = None  # for https:// and wss://
    ws: Proxy | None = None
    wss: Proxy | None = None
    no_proxy: str = ""
    source: str = ""  # "[server] proxy", "environment" or "" (direct)

    @classmethod
    def from_config(cls, configured: str, env: Mapping[str, str]) -> ProxyPolicy:
        def var(name: str) -> str:
            return env.get(name) or env.get(name.upper()) or ""

        no_proxy = var("no_proxy")
        if configured:
            proxy = Proxy.parse(configured)
            return cls(proxy, proxy, proxy, proxy, no_proxy, "[server] proxy")
        found = {scheme: Proxy.parse(var(f"{scheme}_proxy")) for scheme in ("http", "https", "ws", "wss")}
        for name, proxy in found.items():
            if var(f"{name}_proxy") and proxy is None:
                log.error("%s_PROXY is not an http:// proxy URL, ignored", name.upper())
        source = "environment" if any(found.values()) else ""
        return cls(found["http"], found["https"], found["ws"], found["wss"], no_proxy, source)

    def for_url(self, url: URL) -> Proxy | None:
        scheme = url.scheme
        proxy = {
            "http": self.http,
            "https": self.https,
            "ws": self.ws or self.http,
            "wss": self.wss or self.https,
        }.get(scheme)
        if proxy is None or not url.host:
            return None
        if self.no_proxy and bypassed(url.host, url.port, self.no_proxy):
            return None
        return proxy

    def describe(self) -> dict[str, str]:
        """What the log line at start and the status page say (no credentials)."""
        if not self.source:
            return {}
        used = {"http": self.http, "https": self.https, "ws": self.ws, "wss": self.wss}
        out = {scheme: str(proxy) for scheme, proxy in used.items() if proxy is not None}
        return {"source": self.source, **out, **({"no_proxy": self.no_proxy} if self.no_proxy else {})}

    def request_class(self) -> type[aiohttp.ClientRequest]:
        """aiohttp's request class with this policy: a request given no proxy of its own gets the
        policy's (redirects and websocket handshakes are requests too)."""
        policy = self

        class ProxiedRequest(aiohttp.ClientRequest):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                if self.proxy is None:
                    proxy = policy.for_url(self.url)
                    if proxy is not None:
                        self.update_proxy(proxy.url, proxy.auth, None)

        return ProxiedRequest


def bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether `NO_PROXY` exempts `host`: an entry is `*`, a name (which also covers its
    subdomains; a leading dot changes nothing), an IP address, or either with `:port`."""
    host = host.lower().rstrip(".")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.strip("[]").lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def proxy_policy(config: Config, env: Mapping[str, str] | None = None) -> ProxyPolicy:
    return ProxyPolicy.from_config(config.server.proxy, os.environ if env is None else env)


def client_session(config: Config, env: Mapping[str, str] | None = None, **kwargs: Any) -> aiohttp.ClientSession:
    """The outbound session for `config`; `kwargs` go to `aiohttp.ClientSession` (connector,
    headers, timeout). A `json=` body is written by orjson: UTF-8 as it is (the standard library's
    encoder sends every Chinese character as a six-byte `\\uXXXX` escape) and about ten times
    faster."""
    policy = proxy_policy(config, env)
    return aiohttp.ClientSession(
        request_class=policy.request_class(), trust_env=False, json_serialize=_json_text, **kwargs
    )


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()
