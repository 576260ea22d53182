"""A real `python run.py` against hostile clients on raw sockets: an idle keep-alive connection, a
slowloris trickling headers, a body that stalls, bodies too large for small-body routes, and a
full file descriptor table (which must not flood the log). docs/security.md "Timeouts and limits"."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from gateway.config import ServerConfig, load
from tests.process import ROOT, GatewayProcess

WAIT = 20.0  # bound on every wait for the gateway (a loaded machine is slow, not wrong)
PASSWORD = "limits-admin-password-1"  # the login reads its body only when a password is set


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: status, headers (lower-case names), body (by Content-Length)."""
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines if line)
        headers = {k.lower(): v for k, v in headers.items()}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader, within: float = WAIT) -> float:
    """Seconds until the server closes the connection (EOF or reset); TimeoutError after `within`."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass
    return time.monotonic() - started


def post(path: str, headers: str, body: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}\r\n".encode()
        + body
    )


@pytest.fixture
def limited(spawn_gateway: Callable[..., GatewayProcess]) -> Callable[..., GatewayProcess]:
    """A gateway with short header and body deadlines (and a long keep-alive, so that what closes a
    connection in these tests is the deadline under test)."""

    def start(**server: float) -> GatewayProcess:
        settings = {"keepalive_timeout": 60.0, "header_timeout": 1.0, "body_timeout": 1.0, **server}
        env = {f"BOTGATE_SERVER__{k.upper()}": str(v) for k, v in settings.items()}
        return spawn_gateway(env={"BOTGATE_ADMIN__PASSWORD": PASSWORD, **env})

    return start


def test_defaults_bound_every_wait() -> None:
    """What the shipped config and the defaults promise: idle keep-alive at most 75 s (aiohttp's own
    default for a hand-built runner is 3,630 s), headers and body in seconds."""
    for server in (ServerConfig(), load(ROOT / "config.toml", env={}).server):
        assert 0 < server.keepalive_timeout <= 75
        assert 0 < server.header_timeout <= 30
        assert 0 < server.body_timeout <= 60


async def test_idle_keepalive_connection_is_closed(limited: Callable[..., GatewayProcess]) -> None:
    gw = limited(keepalive_timeout=1.0, header_timeout=30.0)
    async with connection(gw.port) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, _ = await response(reader)
        assert status == 200 and headers.get("connection", "").lower() != "close"
        # Seen failing (runner without keepalive_timeout): still open after WAIT seconds.
        assert await closed_by_server(reader) < WAIT


async def test_slowloris_headers_are_cut_off(limited: Callable[..., GatewayProcess]) -> None:
    """One header byte every 0.2 s: the connection is closed about `header_timeout` after the first
    byte, long before the keep-alive timeout, and the gateway keeps serving."""
    gw = limited(header_timeout=1.0)
    async with connection(gw.port) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            while time.monotonic() - started < WAIT:
                writer.write(b"a")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):  # the client's pace
                        if not await reader.read(1):
                            break
        took = time.monotonic() - started
        # Seen failing without the header deadline: still open after WAIT (20 s) of trickling.
        assert took < WAIT - 5, f"slow headers held the connection for {took:.1f} s"
    async with connection(gw.port) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await response(reader))[0] == 200


async def test_stalled_body_gets_408_and_the_connection_closes(limited: Callable[..., GatewayProcess]) -> None:
    gw = limited(body_timeout=1.0)
    async with connection(gw.port) as (reader, writer):
        writer.write(post("/login", "Content-Length: 200\r\n", b'{"password": "'))
        status, headers, body = await response(reader)
        # Seen failing without the body deadline: no answer within WAIT, the handler waits forever.
        assert status == 408, body
        assert orjson.loads(body)["error"] == "request body not received within 1 s"
        assert headers.get("connection", "").lower() == "close"
        assert await closed_by_server(reader, within=5) < 5
    errors = [line for line in gw.log_lines() if line["level"] in ("ERROR", "CRITICAL")]
    assert not errors, errors  # a slow client is no server fault


@pytest.mark.parametrize("path", ["/login", "/logout", "/api/conversations/reset", "/api/reload"])
async def test_small_body_routes_refuse_a_large_declared_body_before_reading_it(
    limited: Callable[..., GatewayProcess], path: str
) -> None:
    """Content-Length 5,000 on a route whose bodies are tiny: 413 at once, without waiting for (or
    buffering) the body, before any authentication."""
    gw = limited(body_timeout=30.0)
    async with connection(gw.port) as (reader, writer):
        writer.write(post(path, "Content-Length: 5000\r\n"))
        # Seen failing with only the 1 MiB [server] max_body_bytes: the route itself answered (401, 303).
        async with asyncio.timeout(5):
            status, _, body = await response(reader)
        assert status == 413, body
        assert orjson.loads(body) == {"error": "request body too large"}


async def test_small_body_routes_cut_a_chunked_body_at_the_limit(limited: Callable[..., GatewayProcess]) -> None:
    gw = limited()
    chunk = b'{"password": "' + b"x" * 5000 + b'"}'
    chunked = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n"
    async with connection(gw.port) as (reader, writer):
        writer.write(post("/login", "Transfer-Encoding: chunked\r\n", chunked))
        status, _, body = await response(reader)
        # Seen failing without the per-route cap: 401 (the 5 KB password was read and compared).
        assert status == 413, body
    # A body within the limit still works.
    async with connection(gw.port) as (reader, writer):
        small = orjson.dumps({"password": PASSWORD})
        writer.write(post("/login", f"Content-Length: {len(small)}\r\n", small))
        assert (await response(reader))[0] == 200


NOFILE = 96  # the gateway's descriptor limit in the next test; it needs about 30 when idle


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_NOFILE and EMFILE as on Linux")
async def test_full_descriptor_table_logs_a_line_per_interval_not_per_accept(
    spawn_gateway: Callable[..., GatewayProcess],
) -> None:
    """Out of descriptors, asyncio fails every accept and logs each failure with a traceback, at a
    growing rate (100,000 lines in half a minute were seen). The gateway lets one such line through
    per 10 s, the next one saying how many were suppressed."""
    limit = f"import resource, os, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); "
    wrapper = [sys.executable, "-c", limit + "os.execv(sys.argv[1], sys.argv[1:])"]
    gw = spawn_gateway(env={"BOTGATE_SERVER__KEEPALIVE_TIMEOUT": "60"}, wrapper=wrapper)
    held: list[asyncio.StreamWriter] = []

    def exhausted() -> list[dict[str, object]]:
        return [
            line
            for line in gw.log_lines()
            if str(line["message"]).startswith("socket.accept() out of system resource")
        ]

    try:
        async with asyncio.timeout(WAIT):
            while not exhausted():  # connections that send nothing: each holds a descriptor
                _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                held.append(writer)
                assert len(held) < 2 * NOFILE + 200, "the descriptor limit was never reached"
            # A few more, queued in the listen backlog: the accepts keep failing even if the
            # gateway frees a descriptor or two meanwhile.
            for _ in range(20):
                held.append((await asyncio.open_connection("127.0.0.1", gw.port))[1])
        # asyncio retries the accept every second while the table is full; the next line let
        # through comes 10 s after the first one. Seen failing without the filter: the second line
        # came within a second, with no `suppressed` count (and thousands more followed).
        async with asyncio.timeout(WAIT):
            while True:  # polling the log file: there is no event to wait on
                if len(lines := exhausted()) >= 2:
                    break
                await asyncio.sleep(0.5)
        first, second = lines[:2]
        assert first["level"] == "ERROR" and "suppressed" not in first
        assert isinstance(second["suppressed"], int) and second["suppressed"] > 0, second
        assert len(lines) == 2, lines
    finally:
        for writer in held:
            writer.close()
    async with connection(gw.port) as (reader, writer):  # served again once descriptors are free
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await response(reader))[0] == 200
