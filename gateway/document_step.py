"""Documents users send (PDF, Word, Excel, PowerPoint, TXT, Markdown, CSV): downloaded through the
platform, read by the isolated `gateway.documents` extractor, and put into the user's turn with
their question (the file alone: "summarise this file"). A file that gives no text gets its notice
and no model call. See docs/content.md "Documents".

The extract the model gets is within `[content] document_chars`; the turn kept in the
conversation's context holds as much of it as fits two thirds of `[context] max_chars` (the rest is
left for the answer), so a follow-up question can still refer to the document.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from .config import ContentConfig
from .documents import DOCUMENTS, Extract, ExtractFailure, Failure, Limits, notice
from .documents.notices import TRUNCATED
from .errors import PlatformError
from .exchange import Delivery, Exchange, Flow, fields, log
from .i18n import N_, translator
from .messages import Attachment
from .upstream import FileTooLarge

if TYPE_CHECKING:
    from .documents import DocumentExtractor

# What the model is told (in the message's language): the file's name and its text, then the question.
FILE_BLOCK = N_("The user sent the file “{name}”:\n{text}")
SUMMARISE = N_("Summarise this file.")  # the question for a file sent without one
# Where the kept copy of an extract (the conversation's context) was cut shorter than the model's.
KEPT_CUT = N_("(The rest of the file is left out here.)")
UNNAMED = N_("unnamed file")
QUOTED_UNREAD = N_("[The quoted file “{name}” could not be read.]")
# The platform would not hand the file over (an expired or unknown download code, an outage past
# the retries): the user can send it again; it is not the gateway's failure to apologise for.
NOT_DOWNLOADED = N_("I couldn't download this file. Please send it again in a moment.")
NAME_CHARS = 120
_NOT_IN_NAME = re.compile(r"[\x00-\x1f\x7f\u2028\u2029“”《》]+")
CONTEXT_SHARE = 2 / 3  # of `[context] max_chars`, at most, for the kept extracts of one turn


def document_limits(content: ContentConfig) -> Limits:
    """The extractor's limits from `[content]` (read at start: a reload applies after a restart)."""
    return Limits(max_bytes=content.max_file_bytes, max_chars=content.document_chars)


class Documents:
    """A message's file attachments as text for the model. `extractor` is bound while the app
    runs (`documents_ctx`)."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery
        self.extractor: DocumentExtractor | None = None

    async def __call__(self, exchange: Exchange) -> Flow:
        files = [a for a in exchange.message.attachments if a.kind == "file"]
        if not files:
            return Flow.CONTINUE
        message = exchange.message
        _ = translator(message.locale)
        limits = document_limits(exchange.cfg.content)
        extracts: list[tuple[str, Extract]] = []
        unread: list[str] = []  # quoted files that gave no text: noted for the model
        for attachment in files:
            quoted = bool(attachment.source)  # a quoted message's file: the question stands without it
            try:
                result, size = await self._read(exchange, attachment, limits)
            except PlatformError as e:
                log.warning("document not downloaded: %s", e, extra={**fields(message), "quoted": quoted})
                if quoted:
                    unread.append(_(QUOTED_UNREAD, name=attachment.name or _(UNNAMED)))
                    continue
                await self._delivery.notify(message, _(NOT_DOWNLOADED))
                return Flow.DONE
            if isinstance(result, ExtractFailure):
                log.info(
                    "document not read: %s (%s)",
                    result.failure.value,
                    result.detail,
                    extra={**fields(message), "failure": result.failure.value, "bytes": size, "quoted": quoted},
                )
                if quoted:
                    unread.append(_(QUOTED_UNREAD, name=attachment.name or _(UNNAMED)))
                    continue
                await self._delivery.notify(message, notice(result, limits, size, message.locale))
                return Flow.DONE
            log.info(
                "document read",
                extra={
                    **fields(message),
                    "kind": result.kind.value,
                    "bytes": size,
                    "chars": len(result.text),
                    "truncated": result.truncated,
                },
            )
            extracts.append((display_name(attachment, result, _(UNNAMED)), result))
        if not extracts:  # only quoted files, none readable: the question as it was, with the note
            exchange.question = "\n\n".join([*unread, exchange.question])
            return Flow.CONTINUE
        question, text = exchange.question or _(SUMMARISE), exchange.text or _(SUMMARISE)
        shown = [*unread, *(_(FILE_BLOCK, name=name, text=extract.for_model()) for name, extract in extracts)]
        exchange.question = "\n\n".join([*shown, question])
        budget = int(exchange.cfg.context.max_chars * CONTEXT_SHARE) - len(text)
        exchange.text = "\n\n".join([*kept(extracts, budget, _), text])
        if any(extract.truncated for _name, extract in extracts):
            exchange.prefix += _(TRUNCATED) + "\n\n"
        return Flow.CONTINUE

    async def _read(
        self, exchange: Exchange, attachment: Attachment, limits: Limits
    ) -> tuple[Extract | ExtractFailure, int | None]:
        message = exchange.message
        name = attachment.name
        try:
            data, _mime = await self._delivery.channel(message).fetch(message, attachment)
        except FileTooLarge as e:
            return ExtractFailure(Failure.TOO_LARGE, name, str(e)), None
        if len(data) > limits.max_bytes:
            return ExtractFailure(Failure.TOO_LARGE, name, f"{len(data)} bytes"), len(data)
        extractor = self.extractor
        if extractor is None:  # a responder outside an app (no worker pool): nothing can read it
            log.error("document not read: no document extractor in this process", extra=fields(message))
            return ExtractFailure(Failure.UNREADABLE, name, "no extractor"), len(data)
        started = time.monotonic()
        result = await extractor.extract(data, name)
        log.debug("document extraction took %.2f s", time.monotonic() - started, extra=fields(message))
        return result, len(data)


def display_name(attachment: Attachment, extract: Extract, unnamed: str) -> str:
    """The file's name as the model sees it: one line, no quote marks of its own, bounded."""
    name = _NOT_IN_NAME.sub(" ", attachment.name or extract.name).strip()[:NAME_CHARS].strip()
    return name or unnamed


def kept(extracts: list[tuple[str, Extract]], budget: int, _: Callable[..., str]) -> list[str]:
    """The file blocks as the conversation's context keeps them: within `budget` characters in all."""
    blocks = []
    for name, extract in extracts:
        budget -= 2  # the blank line after it
        full = _(FILE_BLOCK, name=name, text=extract.for_model())
        if len(full) <= budget:
            blocks.append(full)
            budget -= len(full)
            continue
        room = max(0, budget - len(full) + len(extract.text) - len(_(KEPT_CUT)) - 2)
        blocks.append(_(FILE_BLOCK, name=name, text=f"{extract.text[:room]}\n\n{_(KEPT_CUT)}"))
        budget = 0
    return blocks


async def documents_ctx(app: web.Application) -> AsyncIterator[None]:
    """The extractor's `cleanup_ctx` entry (after the responder's): a `DocumentExtractor` with the
    `[content]` limits under `app[DOCUMENTS]`, bound to the responder's `Documents` step while the
    app runs; its workers are killed at cleanup."""
    from .documents import DocumentExtractor
    from .keys import CONFIG, RESPONDER  # late: keys imports the responder, which imports this

    extractor = DocumentExtractor(document_limits(app[CONFIG].content))
    app[DOCUMENTS] = extractor
    steps = [s for s in app[RESPONDER].steps if isinstance(s, Documents)] if RESPONDER in app else []
    for step in steps:
        step.extractor = extractor
    try:
        yield
    finally:
        for step in steps:
            step.extractor = None
        await extractor.close()
