"""The typed values of document extraction: its limits, the document kinds, and its two outcomes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

MIB = 1024 * 1024


class Kind(StrEnum):
    """A document type this package reads (decided by content, see `detect`)."""

    PDF = "pdf"
    DOCX = "docx"
    XLSX = "xlsx"
    PPTX = "pptx"
    TXT = "txt"
    MD = "md"
    CSV = "csv"


class Failure(StrEnum):
    """Why a document gave no text. Each has a notice (`notices.notice`)."""

    TOO_LARGE = "too_large"  # over `Limits.max_bytes`: refused before any worker starts
    TIMEOUT = "timeout"  # the worker ran past `Limits.timeout` (or its CPU limit) and was killed
    BOMB = "bomb"  # a zip (DOCX/XLSX/PPTX) whose directory promises too much: size, members, ratio
    UNREADABLE = "unreadable"  # damaged, malformed, hit the memory limit, or the worker died
    SCANNED = "scanned"  # a PDF without a text layer (pages of images)
    ENCRYPTED = "encrypted"  # a password-protected PDF or Office file
    EMPTY = "empty"  # no bytes, or a document with no text at all
    UNSUPPORTED = "unsupported"  # a type this package does not read (`ExtractFailure.detected` says which)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one extraction. The defaults suit a chat: a 20 MiB file, a 20,000-character extract."""

    max_bytes: int = 20 * MIB  # the file itself; checked before anything reaches a worker
    max_chars: int = 20_000  # the extract's text (the truncation note comes on top)
    timeout: float = 20.0  # wall time of one worker, start to result
    memory: int = 1024 * MIB  # RLIMIT_AS of a worker: its whole address space, libraries included
    max_pages: int = 200  # PDF pages and PPTX slides read at most
    max_sheets: int = 20  # XLSX sheets read at most
    max_rows: int = 5_000  # rows read at most per XLSX sheet or CSV file, empty ones included
    max_columns: int = 50  # columns of a table shown at most
    max_cell: int = 300  # characters of one table cell shown at most
    max_members: int = 5_000  # zip members (DOCX/XLSX/PPTX), counted from the directory
    max_unzipped: int = 256 * MIB  # their declared uncompressed sizes, added up
    max_ratio: int = 200  # uncompressed / compressed size of any member of at least `ratio_floor`
    ratio_floor: int = 1 * MIB
    workers: int = 2  # documents parsed at once; more wait for a free worker

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) <= 0:
                raise ValueError(f"documents limit {name} must be positive")


@dataclass(frozen=True, slots=True)
class Extract:
    """A document's text, within `Limits.max_chars`.

    `text` is Markdown-ish plain text: headings and page/slide/sheet markers, tables as Markdown tables.
    `truncated_note` is None when `text` is the whole document, else an honest marker such as
    "(truncated: pages 1–12 of 40)", meant for the model (and the log) together with `text`."""

    kind: Kind
    name: str
    text: str
    truncated_note: str | None = None
    pages_total: int | None = None  # pages (PDF), slides (PPTX) or sheets (XLSX); None for the others
    ok: Literal[True] = True

    @property
    def truncated(self) -> bool:
        return self.truncated_note is not None

    def for_model(self) -> str:
        """The text with its truncation note, as a model should see it."""
        return f"{self.text}\n\n{self.truncated_note}" if self.truncated_note else self.text


@dataclass(frozen=True, slots=True)
class ExtractFailure:
    """No text: `failure` says why, `detail` says it for the log (English, never shown to users).

    `kind` is the detected type when the failure came after detection (a scanned PDF, a DOCX bomb);
    `detected` names what an unsupported file looked like ("doc", "image", "zip", ...; see
    `notices.DETECTED`)."""

    failure: Failure
    name: str
    detail: str
    kind: Kind | None = None
    detected: str | None = None
    ok: Literal[False] = False


Result = Extract | ExtractFailure


class Refused(Exception):
    """Raised inside the worker where a document cannot be read; becomes an `ExtractFailure`."""

    def __init__(self, failure: Failure, detail: str, *, kind: Kind | None = None, detected: str | None = None):
        super().__init__(detail)
        self.failure, self.detail, self.kind, self.detected = failure, detail, kind, detected
