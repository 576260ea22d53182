"""Zip-bomb defences for OOXML files (DOCX/XLSX/PPTX are zips), from the zip's directory alone.

Runs in the worker, before any parser opens the file:
1. The end-of-central-directory record: its member count and directory size are read without parsing
   the directory (a directory of 400,000 tiny entries would itself cost hundreds of MB as `ZipInfo`s).
2. The parsed directory: the declared uncompressed sizes added up, and each large member's
   compression ratio. `zipfile` never inflates a member past its declared size (it stops there, and a
   lying member then fails its CRC), so the declared sizes bound what the parsers can read.
What a bound cannot express (deep XML, a slow parse) the worker's memory and time limits catch.
"""

from __future__ import annotations

import io
import struct
import zipfile

from .results import Limits

EOCD = b"PK\x05\x06"
EOCD_SIZE = 22
MAX_COMMENT = 0xFFFF
ZIP64_COUNT = 0xFFFF  # the classic record's count and size when the real ones are in the zip64 record
ZIP64_SIZE = 0xFFFFFFFF
MAX_ENTRY_BYTES = 1024  # directory bytes allowed per permitted member: names, extra fields


class Bomb(Exception):
    """The zip promises more than `Limits` allows; the message says what."""


class NotAZip(Exception):
    """No end-of-central-directory record, or a directory `zipfile` cannot read."""


def open_checked(data: bytes, limits: Limits) -> zipfile.ZipFile:
    """The zip, opened once its directory passed every check; raises `Bomb` or `NotAZip`."""
    members, directory_size = _end_record(data)
    if members > limits.max_members:
        raise Bomb(f"{members} zip members (limit {limits.max_members})")
    if directory_size > limits.max_members * MAX_ENTRY_BYTES:
        raise Bomb(f"zip directory of {directory_size} bytes")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error) as e:
        raise NotAZip(str(e)) from e
    try:
        check_members(archive.infolist(), limits)
    except Bomb:
        archive.close()
        raise
    return archive


def check_members(infos: list[zipfile.ZipInfo], limits: Limits) -> None:
    """Member count, declared total size and compression ratios; raises `Bomb`."""
    if len(infos) > limits.max_members:
        raise Bomb(f"{len(infos)} zip members (limit {limits.max_members})")
    total = 0
    for info in infos:
        total += info.file_size
        if total > limits.max_unzipped:
            raise Bomb(f"zip members expand to more than {limits.max_unzipped} bytes")
        if info.file_size >= limits.ratio_floor and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            ratio = info.file_size // max(info.compress_size, 1)
            raise Bomb(f"zip member {info.filename!r} expands {ratio}x (limit {limits.max_ratio}x)")


def _end_record(data: bytes) -> tuple[int, int]:
    """(member count, central directory size) from the end-of-central-directory record."""
    tail_start = max(0, len(data) - EOCD_SIZE - MAX_COMMENT)
    at = data.rfind(EOCD, tail_start)
    if at < 0 or at + EOCD_SIZE > len(data):
        raise NotAZip("no end-of-central-directory record")
    _disk, _cd_disk, _here, members, directory_size, _offset, _comment = struct.unpack(
        "<HHHHIIH", data[at + 4 : at + EOCD_SIZE]
    )
    if members == ZIP64_COUNT or directory_size == ZIP64_SIZE:
        members, directory_size = _zip64_end_record(data, at, members, directory_size)
    return members, directory_size


def _zip64_end_record(data: bytes, eocd_at: int, members: int, directory_size: int) -> tuple[int, int]:
    """The zip64 end record's count and directory size (its locator sits just before the classic record)."""
    locator = data[max(0, eocd_at - 20) : eocd_at]
    if len(locator) != 20 or locator[:4] != b"PK\x06\x07":
        return members, directory_size  # no zip64 record: the classic values are the real ones
    (record_at,) = struct.unpack("<Q", locator[8:16])
    record = data[record_at : record_at + 56]
    if len(record) != 56 or record[:4] != b"PK\x06\x06":
        raise NotAZip("bad zip64 end record")
    members64, size64 = struct.unpack("<QQ", record[32:48])
    return int(members64), int(size64)
