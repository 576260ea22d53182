"""The hand-written `pbbp2.Frame` codec: byte-for-byte what lark-oapi's generated code produces."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from handlers.feishu.frame import Frame, FrameError, decode, encode

ORACLE = Path(__file__).parent / "oracles" / "lark.py"
U64 = (1 << 64) - 1
I32 = 1 << 31


def spec(frame: Frame) -> dict[str, Any]:
    return {
        "seq_id": frame.seq_id,
        "log_id": frame.log_id,
        "service": frame.service,
        "method": frame.method,
        "headers": [list(h) for h in frame.headers],
        "payload_encoding": frame.payload_encoding,
        "payload_type": frame.payload_type,
        "payload": None if frame.payload is None else frame.payload.hex(),
        "log_id_new": frame.log_id_new,
    }


def sample_frames() -> list[Frame]:
    """Edge cases plus seeded random frames (numbers at the type limits, unicode, absent vs empty)."""
    frames = [
        Frame(),
        Frame(service=33, headers=(("type", "ping"),)),  # the client ping
        Frame(seq_id=U64, log_id=U64, service=-I32, method=I32 - 1),
        Frame(service=-1, method=-5, payload=b""),
        Frame(payload_encoding="", payload_type="", log_id_new="", headers=(("", ""),)),
        Frame(seq_id=7, log_id=9, service=33, method=1, payload=b'{"code": 200}',
              headers=(("type", "event"), ("message_id", "m1"), ("sum", "1"), ("seq", "0"),
                       ("trace_id", "t"), ("biz_rt", "12"))),
        Frame(payload=bytes(range(256)) * 600, headers=(("键", "值 ✓"),)),  # > 2-byte length varint
    ]
    rng = random.Random(4)
    numbers = [0, 1, 127, 128, 300, 16383, 16384, 2**31 - 1, 2**32, 2**63, U64]
    for _ in range(150):
        frames.append(
            Frame(
                seq_id=rng.choice([*numbers, rng.randrange(U64 + 1)]),
                log_id=rng.choice([*numbers, rng.randrange(U64 + 1)]),
                service=rng.randrange(-I32, I32),
                method=rng.choice([0, 1, rng.randrange(-I32, I32)]),
                headers=tuple(
                    ("".join(rng.choices("abcé_-中", k=rng.randrange(6))), str(rng.randrange(10**9)))
                    for _ in range(rng.randrange(4))
                ),
                payload_encoding=rng.choice([None, "", "gzip"]),
                payload_type=rng.choice([None, "", "json"]),
                payload=rng.choice([None, b"", rng.randbytes(rng.randrange(400))]),
                log_id_new=rng.choice([None, "", "log-" + str(rng.randrange(1000))]),
            )
        )
    return frames


async def test_byte_compatible_with_lark_oapi_generated_code() -> None:
    frames = sample_frames()
    request = {"specs": [spec(f) for f in frames], "ours": [encode(f).hex() for f in frames]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ORACLE), "frames",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(orjson.dumps(request)), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    oracle = orjson.loads(out)
    for frame, theirs, parsed in zip(frames, oracle["encoded"], oracle["decoded"], strict=True):
        assert encode(frame).hex() == theirs, frame  # we write exactly what the SDK writes
        assert decode(bytes.fromhex(theirs)) == frame  # we read what the SDK writes
        assert parsed == spec(frame)  # the SDK reads what we write


def test_unknown_fields_skipped_and_last_scalar_wins() -> None:
    base = encode(Frame(seq_id=1, service=33, headers=(("type", "pong"),)))
    # field 15 varint, field 16 fixed64, field 17 length-delimited, field 18 fixed32, SeqID again
    extra = bytes([0x78, 0x05, 0x81, 0x01]) + bytes(8) + bytes([0x8A, 0x01, 0x02, 0x61, 0x62])
    extra += bytes([0x95, 0x01]) + bytes(4) + bytes([0x08, 0x09])
    frame = decode(base + extra)
    assert frame.seq_id == 9 and frame.service == 33 and frame.header("type") == "pong"


def test_required_fields_missing_read_as_zero() -> None:
    assert decode(b"") == Frame()
    assert decode(bytes([0x42, 0x02]) + b"hi") == Frame(payload=b"hi")


def test_malformed_input_raises_frame_error() -> None:
    for data in (
        b"\x08",  # truncated varint
        b"\x08" + b"\xff" * 11,  # overlong varint
        b"\x42\x05ab",  # length past the end
        b"\x0b",  # group start (wire type 3)
        b"\x00\x01",  # field number 0
        b"\x2a\x03\x0a\x01\xff",  # header key not UTF-8
        b"\x0a\x01a",  # SeqID length-delimited
    ):
        try:
            decode(data)
        except FrameError:
            continue
        raise AssertionError(f"{data!r} was accepted")


def test_out_of_range_numbers_refused_on_encode() -> None:
    for frame in (Frame(seq_id=-1), Frame(log_id=U64 + 1), Frame(service=I32), Frame(method=-I32 - 1)):
        try:
            encode(frame)
        except ValueError:
            continue
        raise AssertionError(f"{frame} was encoded")


texts = st.text(max_size=20)
frames = st.builds(
    Frame,
    seq_id=st.integers(0, U64),
    log_id=st.integers(0, U64),
    service=st.integers(-I32, I32 - 1),
    method=st.integers(-I32, I32 - 1),
    headers=st.lists(st.tuples(texts, texts), max_size=5).map(tuple),
    payload_encoding=st.none() | texts,
    payload_type=st.none() | texts,
    payload=st.none() | st.binary(max_size=300),
    log_id_new=st.none() | texts,
)


@given(frames)
def test_any_frame_decodes_to_what_was_encoded(frame: Frame) -> None:
    assert decode(encode(frame)) == frame


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode(data)
