"""DingTalk's markdown subset: answers become ordered markdown parts plus the message shapes that carry them.

DingTalk markdown messages render headings, emphasis, links, quotes and lists, but no tables: a
table becomes a list (one item per row). A message body is capped, so a long answer goes out as
several messages in order, cut at paragraph or line boundaries (`gateway.render`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.i18n import N_, Locale, translator
from gateway.render import Part, split_text, tables_to_lists

# Characters per markdown message. DingTalk caps a robot message at 20 000 bytes; 3 800 characters
# of CJK text (3 bytes each in UTF-8) stay well below that, with room for the mention.
PART_LIMIT = 3800
# A proactive message (the send API) is sent whole, never split: at most what a robot message holds,
# less room for the title and the message's JSON.
PUSH_LIMIT = 19_000
TITLE_LIMIT = 20
_MARKUP = re.compile(r"[#*_>`~\[\]|]+")
EMPTY = N_("(empty)")  # what a reply without text shows instead of nothing


def render(text: str, limit: int = PART_LIMIT, locale: Locale | None = None) -> list[Part]:
    """Markdown in DingTalk's subset, split into the ordered parts to send (`locale`: the
    message's, for the "(empty)" of a reply without text)."""
    body = tables_to_lists(text.strip()) or translator(locale)(EMPTY)
    return [Part(chunk) for chunk in split_text(body, limit)]


def title_of(text: str) -> str:
    """The notification preview of a markdown message: its first line without markup ("" when it
    has none: the caller words a title in the message's language)."""
    for line in text.splitlines():
        plain = _MARKUP.sub("", line).strip(" -:")
        if plain:
            return plain if len(plain) <= TITLE_LIMIT else plain[: TITLE_LIMIT - 1] + "…"
    return ""


def session_markdown(title: str, text: str, at_user_ids: list[str]) -> dict[str, Any]:
    """A sessionWebhook markdown message (docs/protocols/dingtalk.md §A.9). The mention only highlights when the
    text itself contains "@<userId>", so the caller puts it there too."""
    body: dict[str, Any] = {"msgtype": "markdown", "markdown": {"title": title, "text": text}}
    if at_user_ids:
        body["at"] = {"atUserIds": at_user_ids}
    return body


def openapi_markdown(title: str, text: str) -> tuple[str, str]:
    """(msgKey, msgParam) of a markdown message for the robot send APIs."""
    return "sampleMarkdown", orjson.dumps({"title": title, "text": text}).decode()


def openapi_text(text: str) -> tuple[str, str]:
    """(msgKey, msgParam) of a plain text message for the robot send APIs."""
    return "sampleText", orjson.dumps({"content": text}).decode()
