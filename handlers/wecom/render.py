"""WeCom's markdown: an answer becomes the ordered contents of stream or markdown messages, each
within WeCom's 20,480-byte limit on `stream.content` / `markdown.content` (UTF-8), cut at
paragraph or line boundaries. The pieces join back to the text exactly: a stream that outgrows
one message is finished and continues in the next from where it was cut.

The limit is kept on the JSON-escaped text (a newline is two bytes on the wire) with headroom for
the frame around it, so a whole `aibot_respond_msg` frame stays under it too.
"""

from __future__ import annotations

import orjson

from gateway.i18n import N_, Locale, translator

CONTENT_LIMIT = 20_480  # bytes of one stream or markdown content (docs/protocols/wecom.md)
FRAME_ROOM = 400  # bytes left for the frame around the content: cmd, req_id, stream id, keys
EMPTY = N_("(empty)")  # what a reply without text shows instead of nothing


def wire_bytes(text: str) -> int:
    """The bytes `text` takes inside a JSON frame."""
    return len(orjson.dumps(text)) - 2


def cut(text: str, limit: int = CONTENT_LIMIT - FRAME_ROOM) -> int:
    """Where the first piece of `text` ends: all of it when it fits in `limit` wire bytes, else at
    the last paragraph break that fits, else the last line break, else as much as fits."""
    if wire_bytes(text) <= limit:
        return len(text)
    low, high = 0, len(text)  # the longest prefix that fits (wire size grows with the prefix)
    while low < high:
        mid = (low + high + 1) // 2
        if wire_bytes(text[:mid]) <= limit:
            low = mid
        else:
            high = mid - 1
    for sep in ("\n\n", "\n"):
        at = text.rfind(sep, 0, low)
        if at > low // 2:  # not so early that the pieces get tiny
            return at + len(sep)
    return max(low, 1)


def fit(text: str, limit: int = CONTENT_LIMIT - FRAME_ROOM) -> list[str]:
    """`text` in consecutive pieces of at most `limit` wire bytes each, which joined give `text`
    back exactly (a stream that outgrows one message continues in the next at that offset)."""
    pieces: list[str] = []
    while text:
        end = cut(text, limit)
        pieces.append(text[:end])
        text = text[end:]
    return pieces


def render(text: str, locale: Locale | None = None) -> list[str]:
    """The markdown contents to send for `text`, in order (`locale`: the message's, for the
    "(empty)" of a reply without text)."""
    return fit(text.strip() or translator(locale)(EMPTY))


def markdown(content: str) -> dict[str, object]:
    """A markdown message body (`aibot_respond_msg`, `aibot_send_msg`, a `response_url` reply)."""
    return {"msgtype": "markdown", "markdown": {"content": content}}


def stream(stream_id: str, content: str, finish: bool) -> dict[str, object]:
    """A stream message body: every frame carries the whole text so far, `finish` ends it."""
    return {"msgtype": "stream", "stream": {"id": stream_id, "finish": finish, "content": content}}


def text(content: str) -> dict[str, object]:
    """A text body (the welcome answer to `enter_chat`)."""
    return {"msgtype": "text", "text": {"content": content}}
