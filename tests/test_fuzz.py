"""Property-based abuse of a live `python run.py`: random requests, garbage bytes, websocket frames and
chat messages. Never a 5xx, never a crash or an error log line, and every channel still answers after.

To cover a new HTTP endpoint, add a `Route` to `tests/fuzzing.ROUTES`; the generic tests pick it up.
The platform webhooks and long connections get their own signed fuzzing in tests/test_fuzz_platforms.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.i18n import translator
from handlers.webchat import MAX_TEXT
from tests.fuzz_gateway import Live, chat_session, live_gateway, read_json_until
from tests.fuzzing import (
    HEADERS,
    INTEGERS,
    JSON,
    METHODS,
    OP_TEXT,
    PATHS,
    ROUTES,
    STANDARD_METHODS,
    bodies,
    build_request,
    frame,
    request,
    route_for,
    send_raw,
    undecodable,
)

LIMIT = 4096
WS_MAX = 64 * 1024  # the web chat's max_msg_size
EXAMPLES = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PROBE = '{"type": "probe"}'
PROBE_ERROR = translator("zh-CN")('expected {"type": "message", "text": ...}')  # no Accept-Language
FINAL = ("done", "notice", "busy", "duplicate", "error")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_gateway(tmp_path_factory.mktemp("fuzz"), LIMIT) as gateway:
        yield gateway


def expected_statuses(method: str, path: str, body: bytes) -> frozenset[int]:
    route = route_for(path)
    if route is None:
        return frozenset({404})
    if method not in route.methods:
        return frozenset({405})
    if len(body) > LIMIT:
        return frozenset({413})
    return route.statuses


def test_random_requests_get_the_right_status_and_a_json_error(live: Live) -> None:
    @EXAMPLES
    @given(method=METHODS, path=PATHS, headers=HEADERS, body=bodies(LIMIT))
    def one(method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> None:
        answer = request(live.port, build_request(method, path, headers, body), method)
        if method not in STANDARD_METHODS or (undecodable(headers, body) and answer.status == 400):
            # aiohttp itself refuses unknown methods and bodies it cannot decompress (plain text).
            assert answer.status in {400, *expected_statuses(method, path, body)}, (
                answer.status,
                answer.body,
            )
            return
        assert answer.status in expected_statuses(method, path, body), (answer.status, answer.body)
        # Every answer the app makes, errors included, carries the security headers.
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        route = route_for(path)
        if answer.status >= 400 and method != "HEAD" and (route is None or route.json_errors):
            assert orjson.loads(answer.body)["error"]
        if answer.status == 405:
            allowed = {m.strip() for m in answer.headers["allow"].split(",")}
            assert route is not None and allowed >= route.methods - {"HEAD"}, allowed

    one()
    live.assert_healthy()


def test_oversize_body_is_413_on_every_route(live: Live) -> None:
    for route in ROUTES:
        method = sorted(route.methods - {"HEAD"})[0]
        answer = request(live.port, build_request(method, route.path, [], b"x" * (LIMIT + 1)), method)
        assert answer.status == 413, route
        assert orjson.loads(answer.body) == {"error": "request body too large"}


@pytest.mark.parametrize(
    "path",
    ["/static/../config.toml", "/static/%2e%2e/run.py", "/static/..%2fconfig.toml", "/static//etc/passwd"],
)
def test_static_files_never_escape_their_directory(live: Live, path: str) -> None:
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


def test_garbage_bytes_never_get_a_5xx(live: Live) -> None:
    @EXAMPLES
    @given(prefix=st.sampled_from(PREFIXES), noise=st.binary(max_size=1024))
    def one(prefix: bytes, noise: bytes) -> None:
        reply = send_raw(live.port, prefix + noise)
        assert not re.match(rb"HTTP/1\.[01] 5", reply), reply[:200]

    one()
    live.assert_healthy()


def test_random_websocket_frames_never_break_the_server(live: Live) -> None:
    @EXAMPLES
    @given(
        opcode=st.integers(0, 15),
        payload=st.one_of(st.binary(max_size=300), JSON.map(orjson.dumps)),
        fin=st.booleans(),
        rsv=st.sampled_from([0, 0, 0, 1, 2, 4, 7]),
        masked=st.sampled_from([True, True, True, False]),
    )
    def one(opcode: int, payload: bytes, fin: bool, rsv: int, masked: bool) -> None:
        ws = chat_session(live, "framefuzz01")
        try:
            ws.send(frame(opcode, payload, fin=fin, rsv=rsv, masked=masked))
            ws.send_text(PROBE)  # answered at once, unless the fuzzed frame made the server hang up
            while (reply := read_json_until(ws, ("error",))) is not None and reply["error"] != PROBE_ERROR:
                pass
        finally:
            ws.close()
        assert ws.close_code != 1011, ws.frames  # 1011 = the server hit an internal error

    one()
    live.assert_healthy()


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


def test_random_chat_messages_are_answered_or_refused_clearly(live: Live) -> None:
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
        ws = chat_session(live, "msgfuzz01")
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
    live.assert_healthy()
