"""Egress through a corporate proxy: every outbound call (platform REST, tokens, the model, and the
DingTalk Stream and Feishu websockets) goes through the proxy the environment or `[server] proxy`
names, `NO_PROXY` exempts hosts, and the proxy's credentials appear nowhere.

The platforms' and the model's doubles are addressed by `*.test` names that resolve nowhere (RFC
2606) except inside the test's proxy, so an answer proves the call went through the proxy."""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from gateway.config import build, masked
from gateway.egress import ProxyPolicy, bypassed
from tests.doubles import feishu as fd
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu_events import message_event
from tests.doubles.openai import OpenAIDouble
from tests.helpers import DingTalkEnv, dingtalk_section, readiness, serve
from tests.process import GatewayProcess, env_for, self_signed

USER, PASSWORD = "corp", "pr0xy-s3cret"


@dataclass(frozen=True)
class Proxied:
    method: str
    target: str  # "host:port" for CONNECT, the absolute URI otherwise
    authorization: str  # the Proxy-Authorization header, "" if none
    upgrade: bool  # a websocket handshake


class ForwardProxy:
    """An HTTP forward proxy on 127.0.0.1, as a corporate one behaves: `CONNECT host:port` tunnels,
    and absolute-URI requests (websocket upgrades included) forwarded in origin form. It records
    every request; with `credentials` it answers 407 to a request without them. Hosts ending in
    `.test` resolve to 127.0.0.1 here, and only here."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.seen: list[Proxied] = []
        self.expected = ""  # the Proxy-Authorization it requires
        if credentials:
            self.expected = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, credentials: bool = False) -> str:
        return f"http://{USER}:{PASSWORD}@127.0.0.1:{self.port}" if credentials else f"http://127.0.0.1:{self.port}"

    def hosts(self) -> set[str]:
        return {URL(p.target).host or "" if "://" in p.target else p.target.rsplit(":", 1)[0] for p in self.seen}

    def paths(self, host: str) -> list[tuple[str, str]]:
        """(method, path) of every plain request to `host`."""
        return [(p.method, URL(p.target).path) for p in self.seen if "://" in p.target and URL(p.target).host == host]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.close()  # every copy loop then ends by itself (a cancelled handler would be logged)
        if self._tasks:
            await asyncio.wait(tuple(self._tasks), timeout=5)

    @staticmethod
    def _resolve(host: str) -> str:
        return "127.0.0.1" if host.endswith(".test") else host

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._proxy(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *lines = head.split("\r\n")
        method, target, version = request_line.split(" ", 2)
        headers = [tuple(line.split(":", 1)) for line in lines if line]
        names = {name.strip().lower(): value.strip() for name, value in headers}
        upgrade = names.get("upgrade", "").lower() == "websocket"
        self.seen.append(Proxied(method, target, names.get("proxy-authorization", ""), upgrade))
        if self.expected and names.get("proxy-authorization") != self.expected:
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            return
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(self._resolve(host), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = URL(target)
            assert url.is_absolute(), f"not a proxy request: {target}"
            up_reader, up_writer = await asyncio.open_connection(self._resolve(url.host or ""), url.port)
            # One request per connection (so each one is recorded); an upgrade keeps its Connection.
            kept = [
                (name, value) for name, value in headers
                if not name.lower().startswith("proxy-") and (upgrade or name.strip().lower() != "connection")
            ]
            if not upgrade:
                kept.append(("Connection", " close"))
            forwarded = f"{method} {url.raw_path_qs} {version}\r\n" + "".join(f"{n}:{v}\r\n" for n, v in kept)
            up_writer.write((forwarded + "\r\n").encode("latin-1"))
        self._writers.add(up_writer)
        try:
            await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
            up_writer.close()


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        sink.close()


@pytest.fixture
async def corporate_proxy() -> AsyncIterator[ForwardProxy]:
    proxy = ForwardProxy(credentials=(USER, PASSWORD))
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def open_proxy() -> AsyncIterator[ForwardProxy]:
    proxy = ForwardProxy()
    await proxy.start()
    yield proxy
    await proxy.close()


def renamed(url: str, host: str) -> str:
    """`url` (a double on 127.0.0.1) addressed by another host name."""
    return str(URL(url).with_host(host)).rstrip("/")


async def unresolvable(host: str) -> None:
    with pytest.raises(socket.gaierror):
        await asyncio.get_running_loop().getaddrinfo(host, 80)


async def test_every_call_goes_through_the_proxy_from_the_environment(
    aiohttp_server: Any,
    gateway: Any,
    openai_double: tuple[OpenAIDouble, str],
    corporate_proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for host in ("dingtalk.test", "feishu.test", "model.test"):
        await unresolvable(host)  # so nothing below can reach a double without the proxy
    monkeypatch.setenv("HTTPS_PROXY", corporate_proxy.url(credentials=True))
    monkeypatch.setenv("HTTP_PROXY", corporate_proxy.url(credentials=True))
    for name in ("NO_PROXY", "no_proxy"):  # tests/conftest.py exempts loopback for every other test
        monkeypatch.setenv(name, "")
    model, model_url = openai_double
    dingtalk = DingTalkDouble()
    await serve(aiohttp_server, dingtalk)
    dingtalk.base = renamed(dingtalk.base, "dingtalk.test")  # its sessionWebhook URLs too
    feishu, domain = await fd.start(aiohttp_server)
    config = fd.config(
        renamed(domain, "feishu.test"), renamed(model_url, "model.test"), dingtalk=dingtalk_section(dingtalk)
    )
    assert PASSWORD in config.secrets()  # masked in every log line (gateway/logs.py)
    caplog.set_level(logging.DEBUG)
    env = DingTalkEnv(dingtalk, await gateway(config))
    await env.connected()
    await feishu.wait_for(lambda: feishu.pings >= 1)

    await dingtalk.push(dingtalk.message("hello from dingtalk"))
    [answer] = await env.answers(1)
    assert answer["markdown"]["text"] == "echo: hello from dingtalk"
    await feishu.push_event(message_event("hello from feishu", message_id="om_proxy"))
    await feishu.wait_for(lambda: feishu.answer("om_proxy") is not None)
    assert feishu.answer("om_proxy") == "echo: hello from feishu"

    seen = corporate_proxy.seen
    assert corporate_proxy.hosts() == {"dingtalk.test", "feishu.test", "model.test"}
    assert all(p.authorization == corporate_proxy.expected for p in seen)  # every call authenticated
    upgrades = {URL(p.target).host: URL(p.target).path for p in seen if p.upgrade}
    assert upgrades == {"dingtalk.test": "/connect", "feishu.test": "/ws"}  # both long connections
    dingtalk_calls = corporate_proxy.paths("dingtalk.test")
    assert ("POST", "/v1.0/gateway/connections/open") in dingtalk_calls
    assert ("POST", "/robot/sendBySession") in dingtalk_calls
    feishu_calls = corporate_proxy.paths("feishu.test")
    for call in (
        ("POST", "/callback/ws/endpoint"),
        ("POST", "/open-apis/auth/v3/tenant_access_token/internal"),
        ("POST", "/open-apis/im/v1/messages/om_proxy/reply"),
    ):
        assert call in feishu_calls
    assert corporate_proxy.paths("model.test") == [("POST", "/v1/chat/completions")] * 2
    assert len(model.requests) == 2

    [started] = [r for r in caplog.records if r.getMessage() == "outbound calls go through a proxy"]
    assert started.__dict__["proxy"]["https"] == f"{corporate_proxy.url()} (with credentials)"
    assert not [r for r in caplog.records if PASSWORD in str(r.__dict__)]
    status, body = await readiness(env.client)
    assert status == 200 and PASSWORD not in str(body)


async def test_server_proxy_setting_with_no_proxy_exemption(
    aiohttp_server: Any,
    gateway: Any,
    openai_double: tuple[OpenAIDouble, str],
    open_proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "localhost")
    model, model_url = openai_double
    dingtalk = DingTalkDouble()
    await serve(aiohttp_server, dingtalk)
    dingtalk.base = renamed(dingtalk.base, "dingtalk.test")
    config = build(
        {
            "dingtalk": {**dingtalk_section(dingtalk), "api_base": dingtalk.base, "oapi_base": dingtalk.base},
            "model": {"base_url": renamed(model_url, "localhost")},
            "store": {"url": "memory://"},
            "cache": {"enabled": False},
        },
        env={"BOTGATE_SERVER__PROXY": open_proxy.url()},  # the env override of [server] proxy
        source="<test>",
    )
    assert config.server.proxy == open_proxy.url()
    env = DingTalkEnv(dingtalk, await gateway(config))
    await env.connected()
    await dingtalk.push(dingtalk.message("direct to the model"))
    [answer] = await env.answers(1)
    assert answer["markdown"]["text"] == "echo: direct to the model"
    assert open_proxy.hosts() == {"dingtalk.test"}  # the model at localhost went direct
    assert any(p.upgrade for p in open_proxy.seen)
    assert len(model.requests) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_a_gateway_process_tunnels_https_with_connect_and_logs_no_credentials(
    aiohttp_server: Any,
    corporate_proxy: ForwardProxy,
    spawn_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    """`python run.py` with the proxy in its environment: the model, served over real TLS, is
    reached through a `CONNECT` tunnel (TLS end to end inside it); the DingTalk double over plain
    HTTP through the same proxy; and no log line holds the proxy's password."""
    cert, key = self_signed(tmp_path, "model")  # for 127.0.0.1
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    model = OpenAIDouble()
    model_server = await aiohttp_server(model.app(), ssl=tls)
    dingtalk = DingTalkDouble()
    await serve(aiohttp_server, dingtalk)
    dingtalk.base = renamed(dingtalk.base, "dingtalk.test")
    env = env_for({"dingtalk": dingtalk_section(dingtalk), "model": {"base_url": str(model_server.make_url("/v1"))}})
    env.update(
        {
            "HTTPS_PROXY": corporate_proxy.url(credentials=True),
            "HTTP_PROXY": corporate_proxy.url(credentials=True),
            "NO_PROXY": "",
            "no_proxy": "",
            "SSL_CERT_FILE": str(cert),  # the process trusts the model's certificate
        }
    )
    gw = spawn_gateway(env=env, start=False)
    await asyncio.to_thread(gw.start)  # the doubles it talks to run in this loop
    await dingtalk.push(dingtalk.message("over tls"))
    await dingtalk.wait_for(lambda: len(dingtalk.session_posts) == 1)
    assert dingtalk.session_posts[0]["markdown"]["text"] == "echo: over tls"
    tunnels = [p for p in corporate_proxy.seen if p.method == "CONNECT"]
    assert [p.target for p in tunnels] == [f"127.0.0.1:{model_server.port}"]
    assert all(p.authorization == corporate_proxy.expected for p in corporate_proxy.seen)
    assert {URL(p.target).host for p in corporate_proxy.seen if "://" in p.target} == {"dingtalk.test"}
    assert await asyncio.to_thread(gw.stop) == 0
    logged = gw.output()
    assert "outbound calls go through a proxy" in logged and PASSWORD not in logged


def test_proxy_rules_per_scheme_and_exemptions() -> None:
    env = {
        "HTTPS_PROXY": "http://secure:3128",
        "http_proxy": "http://plain:3128",
        "HTTP_PROXY": "http://ignored:3128",  # lower case wins, as in curl
        "NO_PROXY": "internal.example, .corp.example,10.0.0.5:8080",
    }
    policy = ProxyPolicy.from_config("", env)
    proxy = policy.for_url(URL("wss://wss-open.dingtalk.com/connect"))
    assert proxy is not None and str(proxy.url) == "http://secure:3128"  # wss follows HTTPS_PROXY
    proxy = policy.for_url(URL("ws://plain.example/ws"))
    assert proxy is not None and str(proxy.url) == "http://plain:3128"
    assert policy.for_url(URL("https://api.internal.example/x")) is None  # a subdomain of an exempt name
    assert policy.for_url(URL("https://a.corp.example/x")) is None
    assert policy.for_url(URL("http://10.0.0.5:8080/v1")) is None
    assert policy.for_url(URL("http://10.0.0.5:9090/v1")) is not None  # another port
    assert policy.for_url(URL("https://notinternal.example/x")) is not None
    wss = ProxyPolicy.from_config("", {**env, "WSS_PROXY": "http://ws-only:3128"}).for_url(URL("wss://h/"))
    assert wss is not None and str(wss.url) == "http://ws-only:3128"
    configured = ProxyPolicy.from_config("http://u:pw-cfg-secret@cfg:8080", env)  # [server] proxy wins, NO_PROXY holds
    proxy = configured.for_url(URL("https://api.dingtalk.com/"))
    assert proxy is not None and str(proxy.url) == "http://cfg:8080" and proxy.auth is not None
    assert configured.for_url(URL("https://internal.example/")) is None
    assert "pw-cfg-secret" not in str(configured.describe())  # no credentials described
    assert bypassed("anything", None, "*")
    assert ProxyPolicy.from_config("", {}).for_url(URL("https://api.dingtalk.com/")) is None


def test_proxy_setting_is_checked_and_its_password_masked() -> None:
    cfg = build({}, env={"BOTGATE_SERVER__PROXY": "http://corp:hunter2-proxy@10.1.1.1:3128"})
    assert "hunter2-proxy" in cfg.secrets()
    assert masked(cfg)["server"]["proxy"] == "http://corp:***@10.1.1.1:3128"
    for bad in ("socks5://10.1.1.1:1080", "10.1.1.1:3128", "http://:pw@", "http://[::1"):
        with pytest.raises(Exception) as info:
            build({"server": {"proxy": bad}}, env={})
        assert "server.proxy" in str(info.value) and bad not in str(info.value)
