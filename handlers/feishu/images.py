"""An answer's images to Feishu (`gateway.images_out`): each downloaded (allowed hosts only) or
decoded and uploaded through the image API before the answer is delivered (`upload_images`), then
shown inside the answer's last message: `img` elements at the end of a card (appended through
CardKit to a streamed card), `img` paragraphs at the end of a post (`with_images`). An answer sent
as a plain text message (or a card that took no images) gets them as image messages after it
(`msg_type: image`, `{"image_key": ...}`), idempotent per image by its reply uuid. A card cannot show
an image by URL, so the answer's text keeps a link there (`gateway.images_out.displayed`); a failed
upload is logged and the image stays that link. A generated file is uploaded through the file API
and replied as a file message (`msg_type: file`, `{"file_key": ...}`) after the answer.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp

from gateway.errors import PlatformError
from gateway.images_out import OutFile, OutImage, load, load_file
from gateway.messages import InboundMessage
from gateway.metrics import Metrics
from gateway.render import Part
from gateway.retry import retry_transient

from .api import FeishuApi
from .parse import PLATFORM

log = logging.getLogger(__name__)

ReplyParts = Callable[[InboundMessage, Sequence[Part], str, int], Awaitable[None]]


def image_part(image_key: str, alt: str = "") -> Part:
    return Part(alt, "image", {"image_key": image_key})


@dataclass
class Uploaded:
    """An answer's images uploaded before it is delivered: (alt text, image_key) in order, and
    whether the answer's message shows them (`shown`), else they follow as image messages."""

    keys: list[tuple[str, str]] = field(default_factory=list)
    shown: bool = False


def card_images(uploaded: Uploaded) -> list[dict[str, Any]]:
    """Card JSON 2.0 `img` elements, one per uploaded image."""
    return [
        {
            "tag": "img",
            "element_id": f"answer_img_{i}",
            "img_key": key,
            "alt": {"tag": "plain_text", "content": alt},
        }
        for i, (alt, key) in enumerate(uploaded.keys)
    ]


def with_images(parts: list[Part], uploaded: Uploaded | None) -> list[Part]:
    """`parts` with the uploaded images at the end of the last one when it is a card (`img`
    elements) or a post (`img` paragraphs), which marks them `shown`; else `parts` as they are."""
    if uploaded is None or not uploaded.keys or not parts or parts[-1].msg_type not in ("interactive", "post"):
        return parts
    last = parts[-1]
    content = copy.deepcopy(dict(last.content))
    if last.msg_type == "interactive":
        content["body"]["elements"].extend(card_images(uploaded))
    else:
        paragraphs = next(iter(content.values()))["content"]
        paragraphs.extend([{"tag": "img", "image_key": key}] for _, key in uploaded.keys)
    uploaded.shown = True
    return [*parts[:-1], Part(last.text, last.msg_type, content)]


async def upload_images(
    api: FeishuApi, http: aiohttp.ClientSession, metrics: Metrics, images: Sequence[OutImage], hosts: Sequence[str]
) -> Uploaded:
    """Each image loaded and uploaded; a failed one is logged and left out (it stays a link)."""
    uploaded = Uploaded()
    for image in images:
        try:
            loaded = await load(http, image, hosts)
            upload = partial(api.upload_image, loaded.data, loaded.mime)
            key = await retry_transient(upload, platform=PLATFORM, what="image upload", metrics=metrics)
        except PlatformError as e:
            log.warning("answer image not uploaded, it stays a link: %s", e, extra={"platform": PLATFORM})
            continue
        uploaded.keys.append((image.alt, key))
    return uploaded


async def send_uploaded(reply_parts: ReplyParts, message: InboundMessage, uploaded: Uploaded) -> None:
    """Uploaded images the answer does not show, as image messages after it."""
    for index, (alt, key) in enumerate(uploaded.keys):
        try:
            await reply_parts(message, [image_part(key, alt)], "image", index)
        except PlatformError as e:
            log.warning("answer image not sent, it stays a link: %s", e, extra={"platform": PLATFORM})


async def send_images(
    api: FeishuApi,
    http: aiohttp.ClientSession,
    reply_parts: ReplyParts,
    metrics: Metrics,
    message: InboundMessage,
    images: Sequence[OutImage],
    hosts: Sequence[str],
) -> None:
    await send_uploaded(reply_parts, message, await upload_images(api, http, metrics, images, hosts))


# Feishu's `file_type` of an upload by the file's extension; anything else is a "stream".
FILE_TYPES = {"pdf": "pdf", "doc": "doc", "docx": "doc", "xls": "xls", "xlsx": "xls", "ppt": "ppt", "pptx": "ppt"}


def file_type(name: str) -> str:
    return FILE_TYPES.get(name.rsplit(".", 1)[-1].lower() if "." in name else "", "stream")


async def send_files(
    api: FeishuApi,
    http: aiohttp.ClientSession,
    reply_parts: ReplyParts,
    metrics: Metrics,
    message: InboundMessage,
    files: Sequence[OutFile],
    hosts: Sequence[str],
) -> None:
    for index, file in enumerate(files):
        try:
            loaded = await load_file(http, file, hosts)
            upload = partial(api.upload_file, loaded.data, file.name, file_type(file.name))
            key = await retry_transient(upload, platform=PLATFORM, what="file upload", metrics=metrics)
            await reply_parts(message, [Part(file.name, "file", {"file_key": key})], "file", index)
        except PlatformError as e:
            log.warning("answer file not sent, it stays a link: %s", e, extra={"platform": PLATFORM})
