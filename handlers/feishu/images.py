"""An answer's images to Feishu (`gateway.images_out`): each downloaded (allowed hosts only) or
decoded, uploaded through the image API and replied as an image message (`msg_type: image`,
`{"image_key": ...}`) after the answer, idempotent per image by its reply uuid. A card cannot show
an image by URL, so the answer's text has a link there (`gateway.images_out.displayed`); a failed
image is logged and skipped. A generated file is uploaded through the file API and replied as a file
message (`msg_type: file`, `{"file_key": ...}`) the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

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


async def send_images(
    api: FeishuApi,
    http: aiohttp.ClientSession,
    reply_parts: ReplyParts,
    metrics: Metrics,
    message: InboundMessage,
    images: Sequence[OutImage],
    hosts: Sequence[str],
) -> None:
    for index, image in enumerate(images):
        try:
            loaded = await load(http, image, hosts)
            upload = partial(api.upload_image, loaded.data, loaded.mime)
            key = await retry_transient(upload, platform=PLATFORM, what="image upload", metrics=metrics)
            await reply_parts(message, [image_part(key, image.alt)], "image", index)
        except PlatformError as e:
            log.warning("answer image not sent, it stays a link: %s", e, extra={"platform": PLATFORM})


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
