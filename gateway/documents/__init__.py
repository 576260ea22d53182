"""Documents users send (PDF, DOCX, XLSX, PPTX, TXT, MD, CSV) as text for the model.

Platform-independent: an adapter downloads the file, then `await extractor.extract(data, name)`
gives an `Extract` (text within a character budget, tables as Markdown, an honest truncation note)
or an `ExtractFailure` (typed: too large, timeout, zip bomb, unreadable, scanned, encrypted, empty,
unsupported), for which `notice` gives the user's text. The type is detected by content (`detect`);
parsing runs in a confined worker process per document (`pool`, `worker`); see docs/content.md.

The gateway process imports no parser library (they load in the workers only), and a worker imports
neither asyncio nor aiohttp: the extractor (`pool`) and its aiohttp context (`context`) load on
first use of their names here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .notices import notice
from .results import Extract, ExtractFailure, Failure, Kind, Limits, Result

if TYPE_CHECKING:
    from .context import DOCUMENTS, documents_context
    from .pool import DocumentExtractor

__all__ = [
    "DOCUMENTS",
    "DocumentExtractor",
    "Extract",
    "ExtractFailure",
    "Failure",
    "Kind",
    "Limits",
    "Result",
    "documents_context",
    "notice",
]


def __getattr__(name: str) -> Any:
    if name == "DocumentExtractor":
        from .pool import DocumentExtractor

        return DocumentExtractor
    if name in ("DOCUMENTS", "documents_context"):
        from . import context

        return getattr(context, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
