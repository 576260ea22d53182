"""Markdown answers -> Feishu message parts: interactive cards (JSON 2.0), or a post when a card
would be rejected.

Feishu's limits (open.feishu.cn "卡片 JSON 2.0 结构" / "发送消息内容结构"): a card's JSON must stay
under 30 KB and may hold at most 5 tables. Long answers are split into ordered parts of at most
`PART_LIMIT` characters (CJK text is 3 bytes a character in UTF-8, so 7000 characters leave room for
the card's own JSON); an answer with more than 5 tables becomes a post (rich text), whose markdown
has no tables at all, so each table goes into a code block where its columns stay aligned.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.i18n import N_
from gateway.reasoning import THINKING
from gateway.render import Part, find_tables, split_text, tables_to_lists

CARD_TABLE_LIMIT = 5
PART_LIMIT = 7000
ELEMENT_ID = "answer"  # the markdown element a streaming card updates
MENTION_ID = "mention"  # the markdown element, above the answer, that @mentions the asker in a group
THINKING_ID = "thinking"  # the markdown element in a streaming card's thinking panel
# The end of the thinking a panel shows: with a whole answer part the card stays under 30 KB.
THINKING_CHARS = 1500
THINKING_PENDING = "*思考中… / Thinking…*"  # the answer's place in a card while the model only thinks
SUMMARY_CHARS = 60  # chat-list preview of a closed streaming card
MANY_TABLES_NOTE = N_("*The answer has more tables than a card can show; it follows as a rich-text message.*")

# Card and post markdown turn `<at id=all></at>` into a mention: never let model output ping people.
_AT_TAG = re.compile(r"<(/?)at\b", re.IGNORECASE)


# An open_id as Feishu writes them (`ou_` and letters, digits): anything else is never put in a tag.
_OPEN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def defuse(markdown: str) -> str:
    return _AT_TAG.sub(r"&lt;\1at", markdown)


def mention_element(open_id: str) -> dict[str, Any] | None:
    """Our own @mention of the asker, a markdown element of its own (card markdown's
    `<at id=open_id></at>`), since the answer's text is defused; None for no or a malformed id."""
    if not _OPEN_ID.fullmatch(open_id):
        return None
    return {"tag": "markdown", "element_id": MENTION_ID, "content": f"<at id={open_id}></at>"}


def card(markdown: str, mention: str = "") -> dict[str, Any]:
    """A JSON 2.0 card showing `markdown`; with `mention` (an open_id), @mentioning them above it."""
    elements: list[dict[str, Any]] = [{"tag": "markdown", "element_id": ELEMENT_ID, "content": defuse(markdown)}]
    at = mention_element(mention)
    if at is not None:
        elements.insert(0, at)
    return {"schema": "2.0", "config": {"update_multi": True}, "body": {"elements": elements}}


def folded(reasoning: str) -> str:
    """What a thinking panel shows: the end of the thinking, the newest part while it streams."""
    text = reasoning.strip()
    return text if len(text) <= THINKING_CHARS else "…" + text[-THINKING_CHARS:]


def thinking_panel(thinking: str) -> dict[str, Any]:
    """A collapsed panel (card JSON 2.0 `collapsible_panel`) holding the model's thinking, as
    `folded` made it, in a markdown element of its own that a streaming card updates."""
    return {
        "tag": "collapsible_panel",
        "expanded": False,
        "header": {
            "title": {"tag": "plain_text", "content": THINKING},
            "vertical_align": "center",
            "icon": {"tag": "standard_icon", "token": "down-small-ccm_outlined", "color": "grey", "size": "16px 16px"},
            "icon_position": "right",
            "icon_expanded_angle": -180,
        },
        "border": {"color": "grey", "corner_radius": "5px"},
        "padding": "8px 8px 8px 8px",
        "elements": [
            {"tag": "markdown", "element_id": THINKING_ID, "text_size": "notation", "content": defuse(thinking)}
        ],
    }


def streaming_card(markdown: str, thinking: str = "", mention: str = "") -> dict[str, Any]:
    """A CardKit card in streaming mode: the client types out each new text ("fast" strategy shows
    the previous text at once when a newer one arrives). With `thinking`, a collapsed panel holding
    it comes before the answer; with `mention`, the @mention comes first. The answer is last."""
    body = card(markdown, mention)
    if thinking:
        body["body"]["elements"].insert(len(body["body"]["elements"]) - 1, thinking_panel(thinking))
    body["config"] = {
        "update_multi": True,
        "streaming_mode": True,
        "streaming_config": {
            "print_frequency_ms": {"default": 30},
            "print_step": {"default": 2},
            "print_strategy": "fast",
        },
    }
    return body


def summary(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SUMMARY_CHARS else flat[: SUMMARY_CHARS - 1] + "…"


def post(markdown: str, mention: str = "") -> dict[str, Any]:
    """A post: prose as `md` paragraphs, each table verbatim in a `code_block` paragraph; with
    `mention` (an open_id), a first paragraph @mentioning them (the post `at` element)."""
    lines = markdown.split("\n")
    paragraphs: list[list[dict[str, str]]] = []
    if _OPEN_ID.fullmatch(mention):
        paragraphs.append([{"tag": "at", "user_id": mention}])

    def prose(chunk: list[str]) -> None:
        text = "\n".join(chunk).strip("\n")
        if text.strip():
            paragraphs.append([{"tag": "md", "text": defuse(text)}])

    cursor = 0
    for start, end in find_tables(markdown):
        prose(lines[cursor:start])
        paragraphs.append([{"tag": "code_block", "text": "\n".join(lines[start:end])}])
        cursor = end
    prose(lines[cursor:])
    return {"zh_cn": {"title": "", "content": paragraphs}}


def too_many_tables(text: str) -> bool:
    return len(find_tables(text)) > CARD_TABLE_LIMIT


def render(text: str, mention: str = "") -> list[Part]:
    """The ordered parts that deliver `text`: cards, or posts when it has too many tables. With
    `mention` (the asker's open_id, in a group), the first part @mentions them."""
    chunks = split_text(text, PART_LIMIT)
    make = post if too_many_tables(text) else card
    kind = "post" if make is post else "interactive"
    return [Part(chunk, kind, make(chunk, mention if i == 0 else "")) for i, chunk in enumerate(chunks)]


def stream_view(text: str) -> str:
    """What a streaming card shows of a partial answer: its first part, never more than 5 tables."""
    if too_many_tables(text):
        text = tables_to_lists(text)
    return split_text(text, PART_LIMIT)[0]
