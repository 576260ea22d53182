"""A hand-written protobuf codec for the Feishu/Lark long-connection `pbbp2.Frame`.

The wire format is lark-oapi's `ws/pb/pbbp2.proto` (proto2):

    message Header { required string key = 1; required string value = 2; }
    message Frame {
      required uint64 SeqID = 1;  required uint64 LogID = 2;
      required int32 service = 3; required int32 method = 4;   // 0 control, 1 data
      repeated Header headers = 5;
      optional string payload_encoding = 6; optional string payload_type = 7;
      optional bytes payload = 8;           optional string LogIDNew = 9;
    }

Two message types do not justify a protobuf runtime. Encoding is byte-for-byte what the generated
`pbbp2_pb2` produces (fields in number order, optional fields only when set: `None` means absent),
which `tests/test_feishu_frame.py` checks against the SDK. Decoding follows protobuf's rules: unknown
fields are skipped, the last value of a scalar wins, missing required fields read as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

_U64 = (1 << 64) - 1
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class FrameError(ValueError):
    """The bytes are not a valid `pbbp2.Frame`."""


@dataclass(frozen=True, slots=True)
class Frame:
    seq_id: int = 0
    log_id: int = 0
    service: int = 0
    method: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    payload_encoding: str | None = None
    payload_type: str | None = None
    payload: bytes | None = None
    log_id_new: str | None = None

    def header(self, key: str) -> str | None:
        """The first header named `key` (the SDK's lookup rule), or None."""
        for k, v in self.headers:
            if k == key:
                return v
        return None

    def with_header(self, key: str, value: str) -> Frame:
        return replace(self, headers=(*self.headers, (key, value)))


# -- encoding ---------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _uint64(number: int, value: int) -> bytes:
    if not 0 <= value <= _U64:
        raise ValueError(f"field {number}: {value} does not fit uint64")
    return _key(number, _VARINT) + _varint(value)


def _int32(number: int, value: int) -> bytes:
    if not -(1 << 31) <= value < 1 << 31:
        raise ValueError(f"field {number}: {value} does not fit int32")
    # Negative int32 values are sign-extended to 64 bits on the wire (10 bytes), as protobuf does.
    return _key(number, _VARINT) + _varint(value & _U64)


def _bytes(number: int, value: bytes) -> bytes:
    return _key(number, _LENGTH) + _varint(len(value)) + value


def _string(number: int, value: str) -> bytes:
    return _bytes(number, value.encode())


def encode(frame: Frame) -> bytes:
    parts = [
        _uint64(1, frame.seq_id),
        _uint64(2, frame.log_id),
        _int32(3, frame.service),
        _int32(4, frame.method),
    ]
    for key, value in frame.headers:
        parts.append(_bytes(5, _string(1, key) + _string(2, value)))
    if frame.payload_encoding is not None:
        parts.append(_string(6, frame.payload_encoding))
    if frame.payload_type is not None:
        parts.append(_string(7, frame.payload_type))
    if frame.payload is not None:
        parts.append(_bytes(8, frame.payload))
    if frame.log_id_new is not None:
        parts.append(_string(9, frame.log_id_new))
    return b"".join(parts)


# -- decoding ---------------------------------------------------------------------------------
def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        byte = data[i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _U64, i + 1
        shift += 7
    raise FrameError("truncated or overlong varint")


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field, unknown ones included."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise FrameError("field number 0")
        value: int | bytes
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type in (_FIXED64, _FIXED32):
            end = pos + (8 if wire_type == _FIXED64 else 4)
            if end > len(data):
                raise FrameError("truncated fixed-width field")
            value, pos = int.from_bytes(data[pos:end], "little"), end
        elif wire_type == _LENGTH:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise FrameError("truncated length-delimited field")
            value, pos = data[pos : pos + size], pos + size
        else:
            raise FrameError(f"unsupported wire type {wire_type}")
        out.append((number, wire_type, value))
    return out


def _as_int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _text(value: int | bytes, field: str) -> str:
    if not isinstance(value, bytes):
        raise FrameError(f"{field}: expected a length-delimited field")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise FrameError(f"{field}: invalid UTF-8") from None


def _number(value: int | bytes, wire_type: int, field: str) -> int:
    if wire_type != _VARINT or not isinstance(value, int):
        raise FrameError(f"{field}: expected a varint")
    return value


def _header(data: bytes) -> tuple[str, str]:
    key = value = ""
    for number, _, raw in _fields(data):
        if number == 1:
            key = _text(raw, "Header.key")
        elif number == 2:
            value = _text(raw, "Header.value")
    return key, value


def decode(data: bytes) -> Frame:
    """Parse a frame; raises `FrameError` on malformed input, never anything else."""
    values: dict[str, object] = {}
    headers: list[tuple[str, str]] = []
    for number, wire_type, raw in _fields(data):
        if number == 1:
            values["seq_id"] = _number(raw, wire_type, "SeqID")
        elif number == 2:
            values["log_id"] = _number(raw, wire_type, "LogID")
        elif number == 3:
            values["service"] = _as_int32(_number(raw, wire_type, "service"))
        elif number == 4:
            values["method"] = _as_int32(_number(raw, wire_type, "method"))
        elif number == 5:
            if not isinstance(raw, bytes):
                raise FrameError("headers: expected a length-delimited field")
            headers.append(_header(raw))
        elif number == 6:
            values["payload_encoding"] = _text(raw, "payload_encoding")
        elif number == 7:
            values["payload_type"] = _text(raw, "payload_type")
        elif number == 8:
            if not isinstance(raw, bytes):
                raise FrameError("payload: expected a length-delimited field")
            values["payload"] = raw
        elif number == 9:
            values["log_id_new"] = _text(raw, "LogIDNew")
    return Frame(headers=tuple(headers), **values)  # type: ignore[arg-type]
