"""Property-based abuse of a live `python run.py`: random requests, garbage bytes, websocket frames and
chat messages. Never a 5xx, never a crash or an error log line, and the web chat still answers after.

To cover a new HTTP endpoint, add a `Route` to `tests/fuzzing.ROUTES`; the generic tests pick it up.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.webchat import MAX_TEXT
from tests.fuzzing import (
    HEADERS,
    INTEGERS,
    JSON,
    METHODS,
    OP_CLOSE,
    OP_TEXT,
    PATHS,
    ROUTES,
    STANDARD_METHODS,
    WebSocket,
    bodies,
    build_request,
    frame,
    request,
    route_for,
    send_raw,
    ws_connect,
)
from tests.process import GatewayProcess

LIMIT = 4096
WS_MAX = 64 * 1024  # the web chat's max_msg_size
EXAMPLES = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PROBE = '{"type": "probe"}'
PROBE_ERROR = 'expected {"type": "message", "text": ...}'
FINAL = ("done", "notice", "busy", "duplicate", "error")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path_factory.mktemp("fuzz"), f"[server]\nmax_body_bytes = {LIMIT}\n")
    try:
        yield gw.start()
        assert gw.stop() == 0
    finally:
        gw.kill()


def chat_session(port: int, session: str) -> WebSocket:
    ws = ws_connect(port, f"/chat/ws?session={session}")
    hello = ws.read()
    assert hello is not None and orjson.loads(hello[1])["type"] == "hello"
    return ws


def read_json_until(ws: WebSocket, types: tuple[str, ...]) -> dict[str, object] | None:
    """Text frames until one of `types` (returned); None when the server closed the connection."""
    while (got := ws.read()) is not None:
        opcode, data = got
        if opcode == OP_CLOSE:
            return None
        if opcode == OP_TEXT:
            body = orjson.loads(data)
            if body["type"] in types:
                return dict(body)
    return None


def assert_still_healthy(gw: GatewayProcess) -> None:
    assert gw.proc is not None and gw.proc.poll() is None, gw.output()
    ws = chat_session(gw.port, "afterfuzz01")
    try:
        ws.send_text(
            orjson.dumps({"type": "message", "id": uuid.uuid4().hex, "text": "still there?"}).decode()
        )
        reply = read_json_until(ws, ("done", "notice", "error"))
    finally:
        ws.close()
    assert reply is not None and reply["type"] == "done" and "still there?" in str(reply["text"])
    problems = [line for line in gw.log_lines() if line["level"] in ("ERROR", "CRITICAL")]
    assert not problems, problems
    assert gw.stderr() == ""
    # Route labels stay bounded: no fuzzed path becomes a metric series.
    metrics = request(gw.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").body.decode()
    routes = set(re.findall(r'botgate_http_requests_total\{route="([^"]*)"', metrics))
    assert routes <= {r.path for r in ROUTES} | {"unmatched"}, routes


def expected_statuses(method: str, path: str, body: bytes) -> frozenset[int]:
    route = route_for(path)
    if route is None:
        return frozenset({404})
    if method not in route.methods:
        return frozenset({405})
    if len(body) > LIMIT:
        return frozenset({413})
    return route.statuses


def test_random_requests_get_the_right_status_and_a_json_error(live: GatewayProcess) -> None:
    @EXAMPLES
    @given(method=METHODS, path=PATHS, headers=HEADERS, body=bodies(LIMIT))
    def one(method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> None:
        answer = request(live.port, build_request(method, path, headers, body), method)
        if method not in STANDARD_METHODS:
            assert answer.status in {400, *expected_statuses(method, path, body)}, (
                answer.status,
                answer.body,
            )
            return
        assert answer.status in expected_statuses(method, path, body), (answer.status, answer.body)
        route = route_for(path)
        if answer.status >= 400 and method != "HEAD" and (route is None or route.json_errors):
            assert orjson.loads(answer.body)["error"]
        if answer.status == 405:
            assert route is not None and set(answer.headers["allow"].split(",")) & route.methods

    one()
    assert_still_healthy(live)


def test_oversize_body_is_413_on_every_route(live: GatewayProcess) -> None:
    for route in ROUTES:
        method = sorted(route.methods - {"HEAD"})[0]
        answer = request(live.port, build_request(method, route.path, [], b"x" * (LIMIT + 1)), method)
        assert answer.status == 413, route
        assert orjson.loads(answer.body) == {"error": "request body too large"}


@pytest.mark.parametrize(
    "path",
    ["/static/../config.toml", "/static/%2e%2e/run.py", "/static/..%2fconfig.toml", "/static//etc/passwd"],
)
def test_static_files_never_escape_their_directory(live: GatewayProcess, path: str) -> None:
    answer = request(live.port, build_request("GET", path, [], b""))
    assert answer.status in (403, 404), answer
    assert b"[server]" not in answer.body and b"import" not in answer.body and b"root:" not in answer.body


HANDSHAKE = (
    b"GET /chat/ws?session=garbage01 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
PREFIXES = [
    b"",
    b"GET /healthz HTTP/1.1\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n",
    HANDSHAKE,
]


def test_garbage_bytes_never_get_a_5xx(live: GatewayProcess) -> None:
    @EXAMPLES
    @given(prefix=st.sampled_from(PREFIXES), noise=st.binary(max_size=1024))
    def one(prefix: bytes, noise: bytes) -> None:
        reply = send_raw(live.port, prefix + noise)
        assert not re.match(rb"HTTP/1\.[01] 5", reply), reply[:200]

    one()
    assert_still_healthy(live)


def test_random_websocket_frames_never_break_the_server(live: GatewayProcess) -> None:
    @EXAMPLES
    @given(
        opcode=st.integers(0, 15),
        payload=st.one_of(st.binary(max_size=300), JSON.map(orjson.dumps)),
        fin=st.booleans(),
        rsv=st.sampled_from([0, 0, 0, 1, 2, 4, 7]),
        masked=st.sampled_from([True, True, True, False]),
    )
    def one(opcode: int, payload: bytes, fin: bool, rsv: int, masked: bool) -> None:
        ws = chat_session(live.port, "framefuzz01")
        try:
            ws.send(frame(opcode, payload, fin=fin, rsv=rsv, masked=masked))
            ws.send_text(PROBE)  # answered at once, unless the fuzzed frame made the server hang up
            while (reply := read_json_until(ws, ("error",))) is not None and reply["error"] != PROBE_ERROR:
                pass
        finally:
            ws.close()
        assert ws.close_code != 1011, ws.frames  # 1011 = the server hit an internal error

    one()
    assert_still_healthy(live)


def long_texts() -> st.SearchStrategy[str]:
    """Around the 16 000-character limit, in 1- to 4-byte characters (the last may exceed 64 KiB)."""
    return st.tuples(st.sampled_from(["a", "é", "中", "😀"]), st.integers(MAX_TEXT - 5, MAX_TEXT + 5)).map(
        lambda t: t[0] * t[1]
    )


TEXTS = st.one_of(
    st.text(),
    st.lists(
        st.sampled_from(["\u202e", "\u200b", "\x00", "\ufeff", "e\u0301", " ", "\n", "👩‍👩‍👧", "<script>"])
    ).map("".join),
    long_texts(),
)
# Mostly well-typed messages (they exercise the whole path to an answer), some of any shape.
MESSAGES = st.fixed_dictionaries(
    {
        "type": st.one_of(st.just("message"), st.just("message"), st.text(max_size=8)),
        "text": st.one_of(TEXTS, TEXTS, JSON),
    },
    optional={"id": st.one_of(st.uuids().map(str), st.text(max_size=70), INTEGERS, st.none()), "x": JSON},
)


def test_random_chat_messages_are_answered_or_refused_clearly(live: GatewayProcess) -> None:
    seen_ids: set[object] = set()

    @EXAMPLES
    @given(message=MESSAGES)
    def one(message: dict[str, object]) -> None:
        data = orjson.dumps(message)
        text = message["text"]
        valid = (
            message["type"] == "message"
            and isinstance(text, str)
            and bool(text.strip())
            and len(text) <= MAX_TEXT
        )
        ws = chat_session(live.port, "msgfuzz01")
        try:
            ws.send(frame(OP_TEXT, data))
            first = read_json_until(ws, ("accepted", *FINAL))
            final = read_json_until(ws, FINAL) if first and first["type"] == "accepted" else first
        finally:
            ws.close()
        if len(data) > WS_MAX:
            assert ws.close_code == 1009  # message too big
        elif not valid:
            assert first is not None and first["type"] == "error"
        else:
            assert first is not None
            if first["type"] == "duplicate":
                assert message.get("id") in seen_ids
            else:
                assert first["type"] == "accepted", first
                assert final is not None and final["type"] in ("done", "notice"), final
        seen_ids.add(message.get("id"))

    one()
    assert_still_healthy(live)
