"""An answer's images to DingTalk (`gateway.images_out`).

An image on an allowed host needs nothing more: it stays a Markdown image in the reply, which the
DingTalk client fetches and shows itself (the host is allowed, `[content] image_hosts`). A data
URL cannot be shown that way: it is decoded (capped), uploaded through the media upload API and
sent as an image message (`msgKey: sampleImageMsg`, `photoURL` = the media id) through the robot
send API of the conversation (group or 1:1). A failed image is logged and skipped.

A generated file is downloaded (allowed hosts only, capped), uploaded as media `type=file` and sent
as a file message (`msgKey: sampleFile`, `mediaId`, `fileName`, `fileType`) the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import aiohttp
import orjson

from gateway.errors import PlatformError
from gateway.images_out import OutFile, OutImage, load, load_file
from gateway.metrics import Metrics
from gateway.retry import retry_transient

from .api import DingTalkApi
from .parse import PLATFORM

log = logging.getLogger(__name__)

IMAGE_MSG = "sampleImageMsg"
FILE_MSG = "sampleFile"


async def send_images(
    api: DingTalkApi,
    http: aiohttp.ClientSession,
    metrics: Metrics,
    handle: dict[str, Any],
    robot_code: str,
    images: Sequence[OutImage],
    hosts: Sequence[str],
) -> None:
    for image in images:
        if not image.url.startswith("data:"):
            continue  # shown by the client from the allowed host
        try:
            loaded = await load(http, image, hosts)
            upload = partial(api.upload_media, loaded.data, loaded.mime)
            media_id = await retry_transient(upload, platform=PLATFORM, what="media upload", metrics=metrics)
            await _send(api, handle, robot_code, IMAGE_MSG, {"photoURL": media_id})
        except PlatformError as e:
            log.warning("answer image not sent, it stays a link: %s", e, extra={"platform": PLATFORM})


async def send_files(
    api: DingTalkApi,
    http: aiohttp.ClientSession,
    metrics: Metrics,
    handle: dict[str, Any],
    robot_code: str,
    files: Sequence[OutFile],
    hosts: Sequence[str],
) -> None:
    for file in files:
        try:
            loaded = await load_file(http, file, hosts)
            upload = partial(api.upload_media, loaded.data, loaded.mime, "file", file.name)
            media_id = await retry_transient(upload, platform=PLATFORM, what="media upload", metrics=metrics)
            extension = file.name.rsplit(".", 1)[-1].lower() if "." in file.name else "file"
            await _send(
                api, handle, robot_code, FILE_MSG, {"mediaId": media_id, "fileName": file.name, "fileType": extension}
            )
        except PlatformError as e:
            log.warning("answer file not sent, it stays a link: %s", e, extra={"platform": PLATFORM})


async def _send(api: DingTalkApi, handle: dict[str, Any], robot_code: str, msg_key: str, param: dict[str, str]) -> None:
    """One robot message to the conversation of `handle` (a group, or the sender 1:1)."""
    body = orjson.dumps(param).decode()
    if handle.get("conversation_type") == "2":
        await api.send_group(robot_code, handle.get("conversation_id", ""), msg_key, body)
    elif staff_id := handle.get("sender_staff_id", ""):
        await api.send_direct(robot_code, staff_id, msg_key, body)
    else:
        raise PlatformError(f"{msg_key}: the sender has no staff id", retryable=False)
