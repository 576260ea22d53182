"""Property-based abuse of the platform edges of a live `python run.py` (tests/fuzz_gateway.py):

- webhooks with correctly signed bodies of random shape: 200 and answered or ignored (DingTalk: 400
  for what is not a robot message at all), never a 5xx; random extra headers change nothing; stale
  timestamps and bad signatures are 401 before the body is looked at;
- random and malformed frames pushed by the doubles down the long connections (DingTalk CALLBACK
  JSON, Feishu protobuf): each connection survives, and a frame sent after them is still handled.

Every test ends with `Live.assert_healthy()`: no ERROR line, no traceback, every channel answers.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from Crypto.Cipher import AES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.feishu.frame import Frame, encode
from tests.doubles.dingtalk import TOPIC
from tests.doubles.feishu import SERVICE_ID
from tests.doubles.feishu_events import message_event
from tests.fuzz_gateway import ENCRYPT_KEY, VERIFICATION_TOKEN, Live, live_gateway
from tests.fuzzing import HEADER_VALUE, HEADERS, INTEGERS, JSON, bodies, build_request, request, undecodable

LIMIT = 64 * 1024
EXAMPLES = settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
TEXTS = st.one_of(st.text(max_size=200), st.sampled_from(["hi", "/help", "/reset", "", "  ", "\u202e\x00"]))
IDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
OBJECTS = st.dictionaries(st.text(max_size=10), JSON, max_size=4)
# Digits, but too many for any count or time (int() refuses more than 4300; floats overflow sooner).
LONG_DIGITS = st.integers(16, 6000).map(lambda n: "9" * n)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_gateway(tmp_path_factory.mktemp("fuzzplatforms"), LIMIT) as gateway:
        yield gateway


def post(live: Live, path: str, body: bytes, headers: list[tuple[str, str]]) -> tuple[int, Any]:
    answer = request(live.port, build_request("POST", path, headers, body), "POST")
    assert answer.status < 500, (answer.status, answer.body)
    if answer.headers.get("content-type", "").startswith("application/json"):
        return answer.status, orjson.loads(answer.body)
    return answer.status, answer.body.decode(errors="replace")  # aiohttp's own plain-text 400s


# -- DingTalk webhook ------------------------------------------------------------------------------
def dingtalk_content(msgtype: str) -> st.SearchStrategy[dict[str, Any]]:
    """The `content` of non-text robot messages, shaped as DingTalk sends them
    (docs/protocols/dingtalk.md §A.8), values random."""
    item = st.one_of(
        st.fixed_dictionaries({"text": st.text(max_size=50)}),
        st.fixed_dictionaries({"downloadCode": IDS, "type": st.sampled_from(["picture", "video", "x"])}),
    )
    shapes: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "picture": st.fixed_dictionaries({}, optional={"downloadCode": IDS, "pictureDownloadCode": IDS}),
        "richText": st.fixed_dictionaries({"richText": st.lists(item, max_size=4)}),
        "audio": st.fixed_dictionaries(
            {}, optional={"recognition": st.text(max_size=50), "duration": INTEGERS}
        ),
        "file": st.fixed_dictionaries({"downloadCode": IDS, "fileName": st.text(max_size=20)}),
    }
    return shapes.get(msgtype, OBJECTS)


@st.composite
def robot_messages(draw: st.DrawFn, live: Live) -> dict[str, Any]:
    """A robot message as DingTalk would send it, with random content, type, mentions, extra keys."""
    msgtype = draw(st.sampled_from(["text", "text", "picture", "richText", "audio", "file", "video", "card"]))
    body = live.dingtalk.message(
        draw(TEXTS),
        group=draw(st.booleans()),
        at=draw(st.booleans()),
        staff_id=draw(IDS),
        nick=draw(st.text(max_size=20)),
        msgtype=msgtype,
        content=None if msgtype == "text" else draw(dingtalk_content(msgtype)),
    )
    names = ["senderNick", "conversationTitle", "chatbotCorpId", "senderCorpId", "robotCode"]
    body.update(draw(st.dictionaries(st.sampled_from(names), st.text(max_size=30), max_size=3)))
    if draw(st.booleans()):
        body["atUsers"] = draw(
            st.lists(st.fixed_dictionaries({"dingtalkId": st.text(max_size=20)}), max_size=3)
        )
    extra = st.text(min_size=1, max_size=12).filter(lambda key: key not in body)
    body.update(draw(st.dictionaries(extra, JSON, max_size=3)))
    return body


def test_dingtalk_signed_messages_are_answered_or_ignored(live: Live) -> None:
    @EXAMPLES
    @given(data=st.data(), headers=HEADERS)
    def one(data: st.DataObject, headers: list[tuple[str, str]]) -> None:
        body = orjson.dumps(data.draw(robot_messages(live)))
        status, answer = post(live, "/dingtalk/webhook", body, live.dingtalk_headers() + headers)
        if undecodable(headers, body):
            assert status == 400, (status, answer)  # from aiohttp, or from us: unreadable body
        else:
            assert (status, answer) == (200, {"msgtype": "empty"})

    one()
    live.assert_healthy()


def test_dingtalk_signed_garbage_is_refused_as_not_a_message(live: Live) -> None:
    @EXAMPLES
    @given(body=st.one_of(bodies(LIMIT), OBJECTS.map(orjson.dumps)))
    def one(body: bytes) -> None:
        status, answer = post(live, "/dingtalk/webhook", body, live.dingtalk_headers())
        assert status in (400, 413), (status, answer)
        assert answer["error"].startswith(
            ("not a robot message", "body is not JSON", "request body too large")
        )

    one()
    live.assert_healthy()


def test_dingtalk_stale_or_forged_signatures_are_401(live: Live) -> None:
    hour_ms = 3_600_000

    @EXAMPLES
    @given(
        skew=st.one_of(st.integers(hour_ms + 1000, 10**12), st.integers(-(10**12), -hour_ms - 1000)),
        forged=st.one_of(st.none(), HEADER_VALUE, st.just("wrong-secret")),
        timestamp=st.one_of(
            st.none(),
            HEADER_VALUE.filter(lambda t: not t.isdigit()),
            LONG_DIGITS,
        ),
    )
    def one(skew: int, forged: str | None, timestamp: str | None) -> None:
        body = orjson.dumps(live.dingtalk.message("forged?"))
        if timestamp is not None:
            headers = [("timestamp", timestamp), ("sign", "x")]
        elif forged is None:  # correctly signed, but long ago (or far ahead)
            headers = live.dingtalk_headers(int(time.time() * 1000) + skew)
        elif forged == "wrong-secret":
            headers = live.dingtalk_headers(secret="not-the-secret")
        else:
            headers = [("timestamp", str(int(time.time() * 1000))), ("sign", forged)]
        status, answer = post(live, "/dingtalk/webhook", body, headers)
        # One answer whatever was wrong (docs/security.md): no oracle for which check failed.
        assert (status, answer) == (401, {"error": "unauthorized"})

    one()
    live.assert_healthy()


def test_odd_signature_headers_are_401(live: Live) -> None:
    """Found by fuzzing: a header value that is not UTF-8 reaches the handler surrogate-escaped, and
    encoding it for the constant-time comparison raised; a timestamp of thousands of digits made
    int() raise. Both were a 500, the second without any signature."""
    body = orjson.dumps(live.dingtalk.message("odd bytes"))
    [(_, ts), _] = live.dingtalk_headers()
    assert post(live, "/dingtalk/webhook", body, [("timestamp", ts), ("sign", "\x80\xff")])[0] == 401
    headers = [*live.feishu_headers(body)[:2], ("X-Lark-Signature", "\x80" * 64)]
    assert post(live, "/feishu/webhook", body, headers)[0] == 401
    # Nor may a timestamp of thousands of digits (int() refuses those) get past the check.
    status, answer = post(live, "/dingtalk/webhook", body, [("timestamp", "9" * 5000), ("sign", "x")])
    assert (status, answer["error"]) == (401, "unauthorized")
    headers = live.feishu_headers(body, timestamp="9" * 5000)
    assert post(live, "/feishu/webhook", body, headers)[0] == 401


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_cannot_be_decoded_is_400(live: Live, encoding: str) -> None:
    """Found by probing the fuzzer's header space: "Content-Encoding: gzip" on bytes that are not
    gzip failed inside the handler's read, a 500 and two ERROR lines."""
    body = orjson.dumps(live.dingtalk.message("compressed?"))
    extra = [("Content-Encoding", encoding)]
    for path, headers in (
        ("/dingtalk/webhook", live.dingtalk_headers()),
        ("/feishu/webhook", live.feishu_headers(body)),
    ):
        status, answer = post(live, path, body, headers + extra)
        assert (
            status == 400
            and answer["error"] == f"unreadable request body: Can not decode content-encoding: {encoding}"
        )
    live.assert_healthy()


# -- Feishu webhook --------------------------------------------------------------------------------
def encrypt(plain: bytes) -> str:
    """What Feishu sends: base64(IV + AES-256-CBC(SHA-256(key), IV, PKCS#7(plain)))."""
    iv, pad = os.urandom(16), 16 - len(plain) % 16
    cipher = AES.new(hashlib.sha256(ENCRYPT_KEY.encode()).digest(), AES.MODE_CBC, iv)
    return base64.b64encode(iv + cipher.encrypt(plain + bytes([pad]) * pad)).decode()


@st.composite
def feishu_events(draw: st.DrawFn) -> dict[str, Any]:
    """An event with the right verification token: a message of random type, content and chat, or
    an event type botgate does not subscribe to, with a random body."""
    if draw(st.booleans()):
        event = message_event(
            draw(TEXTS),
            message_id=f"om_{uuid.uuid4().hex}",
            chat_type=draw(st.sampled_from(["p2p", "group", "topic", "x"])),
            message_type=draw(st.sampled_from(["text", "post", "image", "file", "audio", "sticker", "x"])),
            content=draw(st.one_of(st.none(), OBJECTS)),
            sender_type=draw(st.sampled_from(["user", "user", "app"])),
            create_time=draw(st.one_of(st.none(), st.floats(0, 4e9))),
        )
        odd_time = draw(st.one_of(st.none(), st.text(max_size=20), INTEGERS.map(str), LONG_DIGITS))
        if odd_time is not None:
            event["event"]["message"]["create_time"] = event["header"]["create_time"] = odd_time
        return event
    header = {
        "event_id": uuid.uuid4().hex,
        "event_type": draw(st.text(max_size=30)),
        "token": VERIFICATION_TOKEN,
    }
    return {"schema": "2.0", "header": header, "event": draw(JSON)}


def test_feishu_signed_events_are_answered_or_ignored(live: Live) -> None:
    @EXAMPLES
    @given(event=feishu_events(), encrypted=st.booleans(), headers=HEADERS)
    def one(event: dict[str, Any], encrypted: bool, headers: list[tuple[str, str]]) -> None:
        plain = orjson.dumps(event)
        body = orjson.dumps({"encrypt": encrypt(plain)}) if encrypted else plain
        status, answer = post(live, "/feishu/webhook", body, live.feishu_headers(body) + headers)
        if undecodable(headers, body):
            assert status == 400, (status, answer)
        else:
            assert (status, answer) == (200, {"msg": "success"})

    one()
    live.assert_healthy()


def test_feishu_signed_garbage_is_refused(live: Live) -> None:
    @EXAMPLES
    @given(body=st.one_of(bodies(LIMIT), OBJECTS.map(orjson.dumps)))
    def one(body: bytes) -> None:
        status, answer = post(live, "/feishu/webhook", body, live.feishu_headers(body))
        assert status in (400, 401, 413) and answer["error"], (status, answer)

    one()
    live.assert_healthy()


def test_feishu_stale_or_forged_signatures_are_401(live: Live) -> None:
    @EXAMPLES
    @given(
        skew=st.one_of(st.integers(3601, 10**9), st.integers(-(10**9), -3601)),
        forged=st.one_of(st.none(), st.text(alphabet="0123456789abcdef", max_size=64)),
    )
    def one(skew: int, forged: str | None) -> None:
        body = orjson.dumps(message_event("replayed", message_id=f"om_{uuid.uuid4().hex}"))
        if forged is None:
            headers = live.feishu_headers(body, int(time.time()) + skew)
        else:
            headers = [*live.feishu_headers(body)[:2], ("X-Lark-Signature", forged)]
        status, answer = post(live, "/feishu/webhook", body, headers)
        assert (status, answer) == (401, {"error": "unauthorized"})

    one()
    live.assert_healthy()


# -- long connections, fuzzed from the platform's side ---------------------------------------------
SYSTEM_TOPICS = ["ping", "KEEPALIVE", "other"]  # not "disconnect": that one asks for a reconnect


@st.composite
def dingtalk_frames(draw: st.DrawFn, live: Live) -> str | bytes:
    kind = draw(st.sampled_from(["text", "bytes", "envelope", "callback", "callback"]))
    if kind == "text":
        return draw(st.text(max_size=300))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    headers = draw(
        st.one_of(JSON, st.fixed_dictionaries({"messageId": st.one_of(st.text(max_size=20), JSON)}))
    )
    data: Any = draw(st.one_of(st.text(max_size=100), JSON, JSON.map(lambda v: orjson.dumps(v).decode())))
    envelope: dict[str, Any] = {
        "type": draw(st.sampled_from(["CALLBACK", "EVENT", "SYSTEM", "x"])),
        "data": data,
    }
    if kind == "callback":  # well-framed, a random robot message (or something else) inside
        message = draw(st.one_of(robot_messages(live), OBJECTS))
        envelope = {"type": "CALLBACK", "data": orjson.dumps(message).decode()}
        headers = {"messageId": uuid.uuid4().hex, "topic": draw(st.sampled_from([TOPIC, TOPIC, "other"]))}
    elif envelope["type"] == "SYSTEM" and isinstance(headers, dict):
        headers["topic"] = draw(st.sampled_from(SYSTEM_TOPICS))
    envelope["headers"] = headers
    return orjson.dumps(envelope).decode()


def test_dingtalk_stream_survives_random_frames(live: Live) -> None:
    double, server = live.dingtalk, live.dingtalk_server
    connections = double.connections

    @EXAMPLES
    @given(frames=st.lists(dingtalk_frames(live), min_size=1, max_size=3))
    def one(frames: list[str | bytes]) -> None:
        for frame in frames:
            server.run(double.raw(frame))
        # Frames are read in order: once this ping is ACKed, the fuzzed ones were read (a valid
        # message among them may still be in flight; it cannot break the connection either).
        barrier = server.run(double.system("ping", {"barrier": uuid.uuid4().hex}))
        server.run(double.wait_for(lambda: double.acked(barrier) is not None))
        assert double.connections == connections

    one()
    live.assert_healthy()


PACING = st.one_of(
    st.integers(1, 600),
    st.integers(-(2**63), 0),  # orjson encodes 64-bit integers
    st.floats(max_value=0, allow_nan=False),
    JSON.filter(lambda v: not isinstance(v, int | float) or isinstance(v, bool)),
)


@st.composite
def feishu_frames(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300))  # not a Frame at all (or a strange one)
    header_names = st.sampled_from(["type", "message_id", "sum", "seq", "trace_id", "biz_rt", "x"])
    header_values = st.one_of(
        st.sampled_from(["event", "card", "ping", "pong", "0", "1", "2", "256", "-1"]),
        st.text(max_size=20),
        LONG_DIGITS,
    )
    payload = st.one_of(
        st.none(),
        st.binary(max_size=200),
        JSON.map(orjson.dumps),
        st.builds(lambda text: orjson.dumps(message_event(text, message_id=f"om_{uuid.uuid4().hex}")), TEXTS),
        # A pong's ClientConfig: odd values are ignored, plausible ones obeyed (a sub-second
        # interval is obeyed too, as by the SDK; tests/test_feishu_ws.py relies on that).
        st.fixed_dictionaries(
            {}, optional={"PingInterval": PACING, "ReconnectInterval": PACING, "ReconnectCount": PACING}
        ).map(orjson.dumps),
    )
    frame = Frame(
        seq_id=draw(st.integers(0, 2**64 - 1)),
        log_id=draw(st.integers(0, 2**64 - 1)),
        service=draw(st.sampled_from([SERVICE_ID, 0, 7])),
        method=draw(st.sampled_from([0, 1, 1, 2])),
        headers=tuple(draw(st.lists(st.tuples(header_names, header_values), max_size=5))),
        payload=draw(payload),
    )
    return encode(frame)


def test_feishu_ws_survives_random_frames(live: Live) -> None:
    double, server = live.feishu, live.feishu_server
    connections = double.connections

    @EXAMPLES
    @given(frames=st.lists(feishu_frames(), min_size=1, max_size=3))
    def one(frames: list[bytes]) -> None:
        for frame in frames:
            server.run(double.raw(frame))
        # An event nobody subscribed to is acknowledged at once: once its response is back, the
        # fuzzed frames before it were handled.
        barrier = {
            "schema": "2.0",
            "header": {"event_id": uuid.uuid4().hex, "event_type": "x.y"},
            "event": {},
        }
        frame_id = server.run(double.push_event(barrier))
        assert server.run(double.response(frame_id)) == {"code": 200}
        assert double.connections == connections

    one()
    live.assert_healthy()
