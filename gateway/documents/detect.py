"""Which document a file is, by its content; the claimed name only tells CSV from Markdown from text.

- PDF: `%PDF-` at the start, or within the first 1,024 bytes (where readers look for it) with
  `%%EOF` near the end.
- DOCX/XLSX/PPTX: a zip (checked by `zipcheck` first) whose `[Content_Types].xml` declares the main
  part of a Word document, an Excel workbook (also .xlsm/.xltx/.xltm) or a PowerPoint presentation
  (also .pptm). Other zips (OpenDocument, macro Word, slide shows, plain archives) are unsupported.
- Text: no NUL byte, and valid UTF-8 (with or without BOM) or else valid GB18030 (Chinese Windows
  saves GBK), or UTF-16 with a BOM; and at most one other control character per 1,000. Then the name:
  `.csv`/`.tsv` is CSV, `.md`/`.markdown` is Markdown, anything else is plain text.
- Anything else is unsupported, with what it looked like (`detected`: Office 97–2003, RTF, image,
  audio/video, archive, binary) so the notice can say so.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from xml.etree import ElementTree

from . import zipcheck
from .results import Failure, Kind, Limits, Refused

PDF_MAGIC = b"%PDF-"
PDF_END = b"%%EOF"
RTF_MAGIC = b"{\\rtf"
PDF_HEADER_WINDOW = 1024
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
CFB_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # OLE2: Office 97–2003, and password-protected OOXML
CONTENT_TYPES = "[Content_Types].xml"
MAX_CONTENT_TYPES = 1024 * 1024

_CT = "application/vnd.openxmlformats-officedocument."
_MS = "application/vnd.ms-"
MAIN_PARTS: dict[str, Kind] = {
    _CT + "wordprocessingml.document.main+xml": Kind.DOCX,
    _CT + "spreadsheetml.sheet.main+xml": Kind.XLSX,
    _CT + "spreadsheetml.template.main+xml": Kind.XLSX,
    _MS + "excel.sheet.macroEnabled.main+xml": Kind.XLSX,
    _MS + "excel.template.macroEnabled.main+xml": Kind.XLSX,
    _CT + "presentationml.presentation.main+xml": Kind.PPTX,
    _MS + "powerpoint.presentation.macroEnabled.main+xml": Kind.PPTX,
}
# Main parts of OOXML variants the parsers refuse (python-docx reads only .docx, python-pptx no shows).
OTHER_MAIN_PARTS: dict[str, str] = {
    _CT + "wordprocessingml.template.main+xml": "docm",
    _MS + "word.document.macroEnabled.main+xml": "docm",
    _MS + "word.template.macroEnabledTemplate.main+xml": "docm",
    _CT + "presentationml.slideshow.main+xml": "ppsx",
    _CT + "presentationml.template.main+xml": "ppsx",
    _MS + "powerpoint.slideshow.macroEnabled.main+xml": "ppsx",
    _MS + "powerpoint.template.macroEnabled.main+xml": "ppsx",
}
# Stream names inside an OLE2 file (UTF-16LE in its directory), most telling first.
CFB_STREAMS: tuple[tuple[str, str], ...] = (
    ("EncryptedPackage", "encrypted"),
    ("WordDocument", "doc"),
    ("Workbook", "xls"),
    ("PowerPoint Document", "ppt"),
    ("Book", "xls"),
)
MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image"),
    (0, b"\xff\xd8\xff", "image"),
    (0, b"GIF8", "image"),
    (8, b"WEBP", "image"),
    (0, b"II*\x00", "image"),
    (0, b"MM\x00*", "image"),
    (4, b"ftyp", "media"),
    (0, b"OggS", "media"),
    (0, b"ID3", "media"),
    (0, b"Rar!", "archive"),
    (0, b"7z\xbc\xaf\x27\x1c", "archive"),
    (0, b"\x1f\x8b", "archive"),
    (0, b"\xfd7zXZ\x00", "archive"),
)
CSV_SUFFIXES: dict[str, str | None] = {".csv": None, ".tsv": "\t"}  # None: sniffed
MD_SUFFIXES = {".md", ".markdown"}
# Control characters that text may not hold more than one per `CONTROL_RATIO` of (whitespace and
# form feed are text; DEL and C0 controls are not).
_CONTROLS = re.compile(r"[\x01-\x08\x0e-\x1f\x7f]")
CONTROL_RATIO = 1000


@dataclass(frozen=True, slots=True)
class Detection:
    kind: Kind
    text: str | None = None  # text kinds: the decoded text
    encoding: str | None = None
    delimiter: str | None = None  # CSV named .tsv: tab


def detect(data: bytes, name: str, limits: Limits) -> Detection:
    """The document's kind; raises `Refused` (empty, bomb, encrypted, unsupported, unreadable)."""
    if not data:
        raise Refused(Failure.EMPTY, "no bytes")
    if _is_pdf(data):
        return Detection(Kind.PDF)
    if data.startswith(ZIP_MAGICS):
        return Detection(_ooxml_kind(data, limits))
    if data.startswith(CFB_MAGIC):
        raise _ole2(data)
    if data.startswith(RTF_MAGIC):
        raise Refused(Failure.UNSUPPORTED, "RTF document", detected="rtf")
    decoded = decode_text(data)
    if decoded is None:
        for offset, magic, label in MAGICS:  # only to name it: text is tried first, as some are ASCII
            if data[offset : offset + len(magic)] == magic:
                raise Refused(Failure.UNSUPPORTED, f"{label} file", detected=label)
        raise Refused(Failure.UNSUPPORTED, "binary file of no known type", detected="binary")
    text, encoding = decoded
    suffix = PurePosixPath(name.replace("\\", "/")).suffix.lower()
    if suffix in CSV_SUFFIXES:
        return Detection(Kind.CSV, text, encoding, CSV_SUFFIXES[suffix])
    return Detection(Kind.MD if suffix in MD_SUFFIXES else Kind.TXT, text, encoding)


def _is_pdf(data: bytes) -> bool:
    """`%PDF-` first; or later in the first 1,024 bytes (after junk, as readers allow) with `%%EOF` in
    the last 1,024, so that a text file merely mentioning the header stays text."""
    if data.startswith(PDF_MAGIC):
        return True
    return PDF_MAGIC in data[:PDF_HEADER_WINDOW] and PDF_END in data[-PDF_HEADER_WINDOW:]


def decode_text(data: bytes) -> tuple[str, str] | None:
    """(text, encoding) if the bytes are text: UTF-16 with BOM, UTF-8 (BOM or not), else GB18030."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        candidates: tuple[str, ...] = ("utf-16",)
    elif b"\x00" in data:
        return None
    else:
        candidates = ("utf-8-sig", "gb18030")
    for encoding in candidates:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if "\x00" in text or _controls(text) * CONTROL_RATIO > len(text):
            return None
        return text, encoding
    return None


def _controls(text: str) -> int:
    return sum(1 for _ in _CONTROLS.finditer(text.rstrip("\x1a")))  # DOS end-of-file marks are harmless


def _ooxml_kind(data: bytes, limits: Limits) -> Kind:
    try:
        archive = zipcheck.open_checked(data, limits)
    except zipcheck.Bomb as e:
        raise Refused(Failure.BOMB, str(e)) from e
    except zipcheck.NotAZip as e:
        raise Refused(Failure.UNREADABLE, f"damaged zip: {e}", detected="zip") from e
    with archive:
        names = set(archive.namelist())
        if any(info.flag_bits & 0x1 for info in archive.infolist()):
            raise Refused(Failure.ENCRYPTED, "zip with encrypted members", detected="zip")
        if CONTENT_TYPES not in names:
            detected = "odf" if "mimetype" in names else "zip"
            raise Refused(Failure.UNSUPPORTED, f"{detected} without {CONTENT_TYPES}", detected=detected)
        info = archive.getinfo(CONTENT_TYPES)
        if info.file_size > MAX_CONTENT_TYPES:
            raise Refused(Failure.BOMB, f"{CONTENT_TYPES} of {info.file_size} bytes")
        try:
            root = ElementTree.fromstring(archive.read(info))
        except (ElementTree.ParseError, zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
            raise Refused(Failure.UNREADABLE, f"unreadable {CONTENT_TYPES}: {e}") from e
    types = {item.get("ContentType", "") for item in root.iter() if item.tag.endswith(("}Override", "}Default"))}
    for content_type, kind in MAIN_PARTS.items():
        if content_type in types:
            return kind
    for content_type, label in OTHER_MAIN_PARTS.items():
        if content_type in types:
            raise Refused(Failure.UNSUPPORTED, f"OOXML variant {content_type}", detected=label)
    raise Refused(Failure.UNSUPPORTED, "OOXML package of no known document type", detected="zip")


def _ole2(data: bytes) -> Refused:
    for stream, label in CFB_STREAMS:
        if stream.encode("utf-16-le") in data:
            if label == "encrypted":
                return Refused(Failure.ENCRYPTED, "password-protected Office file (OLE2 EncryptedPackage)")
            return Refused(Failure.UNSUPPORTED, f"Office 97–2003 file ({label})", detected=label)
    return Refused(Failure.UNSUPPORTED, "OLE2 compound file", detected="ole2")
