"""Detect, then extract: the whole parse of one document, as a worker process runs it.

Each parser library is imported only when a document of its kind comes (pypdf, python-docx,
openpyxl, python-pptx: 0.1–0.2 s each), so a worker pays for one of them, and the gateway process,
which never calls this, for none."""

from __future__ import annotations

from .detect import Detection, detect
from .results import Extract, ExtractFailure, Failure, Kind, Limits, Refused, Result

MAX_DETAIL = 300


def extract_document(data: bytes, name: str, limits: Limits) -> Result:
    """The extract of `data`, or the failure that says why there is none.

    A parser's own error on a malformed file (or the worker's memory limit) is `unreadable`, with the
    error's type and words as the detail, for the log."""
    kind: Kind | None = None
    reason = ""
    try:
        detection = detect(data, name, limits)
        kind = detection.kind
        return _parse(detection, data, name, limits)
    except Refused as e:
        return ExtractFailure(e.failure, name, e.detail, e.kind or kind, e.detected)
    except MemoryError:
        reason = "memory limit reached"  # what held the memory is released once this clause ends
    except RecursionError:
        reason = "nesting too deep"
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
    return ExtractFailure(Failure.UNREADABLE, name, reason[:MAX_DETAIL], kind)


def _parse(detection: Detection, data: bytes, name: str, limits: Limits) -> Extract:
    kind = detection.kind
    if kind is Kind.PDF:
        from .pdf import extract_pdf

        return extract_pdf(data, name, limits)
    if kind is Kind.DOCX:
        from .word import extract_docx

        return extract_docx(data, name, limits)
    if kind is Kind.XLSX:
        from .sheets import extract_xlsx

        return extract_xlsx(data, name, limits)
    if kind is Kind.PPTX:
        from .slides import extract_pptx

        return extract_pptx(data, name, limits)
    from .plain import extract_csv, extract_text

    assert detection.text is not None  # the text kinds come decoded
    if kind is Kind.CSV:
        return extract_csv(detection.text, name, limits, detection.delimiter)
    return extract_text(kind, detection.text, name, limits)
