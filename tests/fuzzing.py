"""Raw-socket HTTP and websocket clients plus hypothesis strategies for fuzzing a live gateway.

Raw sockets (not aiohttp's client) so tests can send what no well-behaved client would: any method
token, odd headers, garbage bytes, unmasked or reserved-bit websocket frames. Every read is bounded by
a socket timeout, so a server that neither answers nor closes fails the test instead of hanging it.
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import quote

from hypothesis import strategies as st
from orjson import dumps

TIMEOUT = 10.0


# -- what exists ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Route:
    """An endpoint and the statuses a well-formed request with a random body/headers may get."""

    path: str
    methods: frozenset[str]
    statuses: frozenset[int]
    prefix: bool = False  # also matches everything under path + "/"
    json_errors: bool = True  # False: aiohttp's file responses set 403/404 themselves, bodiless
    sample: bool = True  # False: never requested at random (an endless event stream)


ROUTES = (
    Route("/healthz", frozenset({"GET", "HEAD"}), frozenset({200})),
    Route("/readyz", frozenset({"GET", "HEAD"}), frozenset({200})),
    Route("/metrics", frozenset({"GET", "HEAD"}), frozenset({200})),
    # Admin surfaces need the login token (no password is set; a random request has none): 302 to
    # the login page for a browser's page request, else 401; 403 for a foreign Origin on a
    # state-changing request or a cookie without one (docs/security.md).
    Route("/", frozenset({"GET", "HEAD"}), frozenset({302, 401})),
    Route("/chat", frozenset({"GET", "HEAD"}), frozenset({302, 401})),
    Route("/chat/ws", frozenset({"GET", "HEAD"}), frozenset({302, 401})),  # not an upgrade request
    Route("/status/events", frozenset({"GET", "HEAD"}), frozenset({401}), sample=False),
    Route("/api/status", frozenset({"GET", "HEAD"}), frozenset({401})),
    Route("/api/reload", frozenset({"POST"}), frozenset({401, 403})),
    Route("/api/conversations/reset", frozenset({"POST"}), frozenset({401, 403})),
    Route("/api/login-token/rotate", frozenset({"POST"}), frozenset({401, 403})),
    # The login page (HTML for a form, JSON for JSON): a wrong or missing token is 401, then 429
    # once the failures exceed the limit; an unreadable body 400; a foreign Origin 403.
    Route("/login", frozenset({"GET", "HEAD", "POST"}), frozenset({200, 400, 401, 403, 429}), json_errors=False),
    Route("/logout", frozenset({"POST"}), frozenset({303, 403})),
    Route("/static", frozenset({"GET", "HEAD"}), frozenset({200, 403, 404}), prefix=True, json_errors=False),
    # Unsigned, a random request never gets past the signature (DingTalk) or the verification
    # token (Feishu, which parses the body first: 400 for what is not a JSON object).
    Route("/dingtalk/webhook", frozenset({"POST"}), frozenset({401})),
    Route("/feishu/webhook", frozenset({"POST"}), frozenset({400, 401})),
)
SAMPLE_PATHS = [route.path for route in ROUTES if route.sample] + ["/static/chat.js", "/static/nope.js"]


def route_for(path: str) -> Route | None:
    path = path.partition("?")[0]
    for route in ROUTES:
        if path == route.path or (route.prefix and path.startswith(route.path + "/")):
            return route
    return None


# -- strategies ----------------------------------------------------------------------------------
TOKEN = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~",
    min_size=1,
    max_size=12,
)
STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
# Other tokens: aiohttp's HTTP parser refuses methods it does not know with a plain-text 400.
METHODS = st.one_of(st.sampled_from(STANDARD_METHODS), TOKEN.map(str.upper))
PATH_SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=:@", max_size=12).map(
    lambda s: s.replace("%", "%25")
)
QUERY = st.text(alphabet=st.characters(codec="utf-8"), max_size=30).map(lambda s: "?" + quote(s, safe="=&"))
PATHS = st.one_of(
    st.sampled_from(SAMPLE_PATHS),
    st.tuples(st.sampled_from(SAMPLE_PATHS), QUERY).map("".join),
    st.lists(PATH_SEGMENT, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
HEADER_VALUE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
)
# Framing and upgrade headers are left out: a wrong Content-Length makes the server wait, correctly.
HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            "Accept",
            "Accept-Encoding",
            "Accept-Language",
            "Authorization",
            "Content-Type",
            "Cookie",
            "Origin",
            "Referer",
            "User-Agent",
            "X-Forwarded-For",
            "X-Request-Id",
            "Content-Encoding",
        ]
    ),
    TOKEN.map(lambda t: "X-" + t),
)
# Unique names: aiohttp refuses a repeated singleton header (Content-Type, ...) with a plain 400.
# Compressed bodies: the routes that read a body must refuse what does not decode (400), not fail.
ENCODINGS = ("gzip", "deflate", "br", "zstd")
HEADER = st.one_of(
    st.tuples(HEADER_NAMES, HEADER_VALUE),
    st.tuples(st.just("Content-Encoding"), st.sampled_from([*ENCODINGS, "identity"])),
)
HEADERS = st.lists(HEADER, max_size=8, unique_by=lambda h: h[0].lower())


def undecodable(headers: list[tuple[str, str]], body: bytes) -> bool:
    """Whether aiohttp may refuse the request with 400: a body (random bytes) claiming gzip or
    deflate, or any request claiming br or zstd, which this aiohttp cannot decode at all."""
    claimed = {v for k, v in headers if k.lower() == "content-encoding"}
    return bool(claimed & {"br", "zstd"}) or (bool(body) and bool(claimed & {"gzip", "deflate"}))


INTEGERS = st.integers(-(2**63), 2**63 - 1)  # what JSON encoders (orjson) accept
JSON = st.recursive(
    st.none() | st.booleans() | INTEGERS | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


def bodies(limit: int) -> st.SearchStrategy[bytes]:
    """Empty, random bytes, JSON, or just over the body limit."""
    return st.one_of(
        st.just(b""),
        st.binary(max_size=512),
        JSON.map(lambda v: dumps(v)),
        st.integers(min_value=limit + 1, max_value=limit + 2048).map(lambda n: b"x" * n),
    )


# -- HTTP ----------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def build_request(method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def request(port: int, raw: bytes, method: str = "GET") -> Answer:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(raw)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        body = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)


def send_raw(port: int, raw: bytes) -> bytes:
    """Send bytes, half-close, return everything the server says before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may hang up on garbage before reading all of it
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


# -- websocket -----------------------------------------------------------------------------------
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """One client frame (RFC 6455 §5.2); `masked=False`, `rsv` and odd opcodes make it invalid."""
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@dataclass
class WebSocket:
    """A raw client connection; `read()` returns (opcode, payload) or None once the server closed."""

    sock: socket.socket
    reader: BinaryIO
    close_code: int | None = None
    frames: list[tuple[int, bytes]] = field(default_factory=list)

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def send_text(self, text: str) -> bool:
        return self.send(frame(OP_TEXT, text.encode()))

    def _exact(self, n: int) -> bytes | None:
        data = self.reader.read(n)
        return data if len(data) == n else None

    def read(self) -> tuple[int, bytes] | None:
        try:
            head = self._exact(2)
            if head is None:
                return None
            n = head[1] & 0x7F
            if n == 126:
                ext = self._exact(2)
                n = struct.unpack("!H", ext)[0] if ext else 0
            elif n == 127:
                ext = self._exact(8)
                n = struct.unpack("!Q", ext)[0] if ext else 0
            payload = self._exact(n) if n else b""
        except ConnectionResetError:
            return None
        if payload is None:
            return None
        opcode = head[0] & 0xF
        if opcode == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        self.frames.append((opcode, payload))
        return opcode, payload

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def ws_connect(port: int, path: str, token: str = "") -> WebSocket:
    """A raw websocket; `token`: the admin login token, which the web chat needs."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
        ).encode()
    )
    reader = sock.makefile("rb")
    status = reader.readline()
    if b" 101 " not in status:
        raise AssertionError(f"websocket upgrade refused: {status!r}")
    while reader.readline() not in (b"\r\n", b""):
        pass
    return WebSocket(sock, reader)
