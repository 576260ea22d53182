"""Quoted replies: the message a reply quotes reaches the model, marked as quoted, before the question.

DingTalk carries the quoted message in the payload (`repliedMsg`); Feishu names it (`parent_id`)
and the adapter fetches it when the message is answered (`fetch(message, Attachment(QUOTE, id))`),
never before the ACK. A fetch that fails loses only the quote: the question is answered, and the
model is told the quote could not be read. A quoted picture or file joins the message's own
attachments, so `Images` handles it like a sent one; a quoted file is named (its attachment is
kept on the quote, for the document step to take over).
"""

from __future__ import annotations

from dataclasses import replace

import orjson

from .errors import PlatformError
from .exchange import Delivery, Exchange, Flow, fields, log
from .messages import QUOTE, QUOTE_MIME, Attachment, Quote

# Model-facing markers (not shown to users, so not translated), as Markdown block quotes.
QUOTED = "[quoted message from {sender}]"
QUOTED_UNKNOWN = "[quoted message]"
UNREADABLE = "[quoted a {kind} the bot cannot read]"
FAILED = "[quoted a message the bot could not fetch]"
PICTURE = "[picture, attached below]"
FILE = "[file: {name}]"
QUESTION = "What about the quoted message?"  # asked when the reply itself carries no text


def _header(quote: Quote) -> str:
    return QUOTED.format(sender=quote.sender) if quote.sender else QUOTED_UNKNOWN


def lines(quote: Quote) -> list[str]:
    """The quote as the model reads it, without the block-quote marks."""
    if quote.failed:
        return [FAILED]
    if quote.unreadable:
        return [UNREADABLE.format(kind="card" if quote.kind in ("interactive", "interactiveCard") else "message")]
    out = [_header(quote)]
    file_only = quote.kind in ("file", "unknownMsgType")  # its text is the file's name
    if quote.text and not file_only:
        out.extend(quote.text.splitlines())
    for attachment in quote.attachments:
        if attachment.kind == "image":
            out.append(PICTURE)
        elif attachment.kind == "file":
            out.append(FILE.format(name=attachment.name or "?"))
    if file_only and not any(a.kind == "file" for a in quote.attachments) and quote.text:
        out.append(FILE.format(name=quote.text))
    if quote.inner is not None:
        out.extend(f"> {line}" for line in lines(quote.inner))
    return out


def block(quote: Quote) -> str:
    """`> [quoted message from ...]` / `> text` lines, then a blank line."""
    return "\n".join(f"> {line}" if line else ">" for line in lines(quote)) + "\n\n"


def attachments(quote: Quote) -> tuple[Attachment, ...]:
    """The pictures and files of the quote and of the one it quotes, handed over like sent ones
    (`Images`, `gateway.document_step.Documents`; a quoted one that cannot be read is noted, the
    message is still answered)."""
    inner = quote.inner.attachments if quote.inner is not None and not quote.inner.failed else ()
    return tuple(a for a in (*quote.attachments, *inner) if a.kind in ("image", "file"))


class Quotes:
    """Fetch a pending quote (Feishu) and put the quoted message in front of the question."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    async def __call__(self, exchange: Exchange) -> Flow:
        message = exchange.message
        quote = message.quote
        if quote is None:
            return Flow.CONTINUE
        if quote.pending:
            quote = await self._fetch(exchange, quote)
        extra = attachments(quote)
        exchange.message = replace(message, quote=quote, attachments=(*message.attachments, *extra))
        exchange.question = block(quote) + (exchange.question or QUESTION)
        return Flow.CONTINUE

    async def _fetch(self, exchange: Exchange, quote: Quote) -> Quote:
        message = exchange.message
        try:
            data, mime = await self._delivery.channel(message).fetch(message, Attachment(QUOTE, quote.ref))
            if mime != QUOTE_MIME:
                raise PlatformError(f"quote fetch answered {mime}", retryable=False)
            return Quote.from_dict(orjson.loads(data))
        except (PlatformError, orjson.JSONDecodeError, TypeError, ValueError) as e:
            log.warning("quoted message not fetched: %s", e, extra=fields(message))
            return Quote(ref=quote.ref, failed=True)
