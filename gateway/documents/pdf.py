"""PDF text with pypdf, page by page from the first, within the budget."""

from __future__ import annotations

import io

from pypdf import PasswordType, PdfReader
from pypdf.errors import FileNotDecryptedError, PdfReadError

from .budget import Budget, note, parts_note, span, tidy
from .results import Extract, Failure, Kind, Limits, Refused


def extract_pdf(data: bytes, name: str, limits: Limits) -> Extract:
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise Refused(Failure.ENCRYPTED, "PDF needs a password", kind=Kind.PDF)
        total = len(reader.pages)
    except FileNotDecryptedError as e:
        raise Refused(Failure.ENCRYPTED, f"PDF needs a password: {e}", kind=Kind.PDF) from e
    except PdfReadError as e:
        raise Refused(Failure.UNREADABLE, f"PDF: {e}", kind=Kind.PDF) from e
    if total == 0:
        raise Refused(Failure.EMPTY, "PDF without pages", kind=Kind.PDF)

    budget = Budget(limits.max_chars)
    shown = 0  # pages looked at and fully in the budget (pages without text count as shown)
    partial = False
    with_text = 0
    broken: list[str] = []  # pages whose text pypdf could not get: skipped, the others still read
    for number in range(min(total, limits.max_pages)):
        try:
            text = tidy(reader.pages[number].extract_text() or "")
        except (MemoryError, RecursionError):
            raise
        except Exception as e:
            broken.append(f"page {number + 1}: {type(e).__name__}: {e}")
            text = ""
        if not text:
            shown += 1
            continue
        with_text += 1
        added = budget.add_partly(f"[Page {number + 1}]\n{text}")
        if added == 2:
            shown += 1
            continue
        partial = added == 1
        break
    if not with_text and broken:
        raise Refused(Failure.UNREADABLE, f"PDF: {len(broken)} pages failed, {broken[0]}", kind=Kind.PDF)
    if not with_text:
        looked = min(total, limits.max_pages)
        raise Refused(Failure.SCANNED, f"no text layer on pages {span(1, looked)} of {total}", kind=Kind.PDF)
    truncated = None
    if shown < total:
        capped = note(f"pages {span(1, shown)} of {total:,}")
        truncated = parts_note("page", shown, partial, total) if budget.full else capped
    return Extract(Kind.PDF, name, budget.text(), truncated, total)
