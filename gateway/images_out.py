"""Images an answer carries, sent as native images after the answer's text (issue 16, "Images and
files out"): Markdown images on a host of `[content] image_hosts` (Dify's `message_file` images
arrive as such, `gateway.draft`) and `data:image/...;base64,` images the model wrote.

Nothing here fetches a URL unless its host passes `gateway.sanitize`'s host rule: an image on
another host stays the plain link the sanitizer made of it, and no request goes to that host. A
redirect is followed only to an allowed host (at most `MAX_REDIRECTS`), a body is read up to
`MAX_IMAGE` bytes, and only an `image/*` answer counts. Every failure (download, upload, send)
leaves the image as the link in the text: the answer itself is delivered before this step.

A channel that can send images implements `ImageChannel.send_images`; the others get nothing more.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import urljoin

import aiohttp

from .errors import PlatformError
from .exchange import Delivery, Exchange, Flow, fields, log
from .messages import InboundMessage
from .sanitize import _allowed
from .upstream import API_TIMEOUT, read_capped

MAX_IMAGE = 10 * 1024 * 1024  # bytes of one image, downloaded or decoded
MAX_IMAGES = 4  # images sent per answer; the others stay links
MAX_REDIRECTS = 3
# `![alt](url)` on an allowed host (the sanitizer left it an image), and an image data URL as an image
# or as the link the sanitizer made of it (`[alt](data:image/png;base64,...)`).
_IMAGE = re.compile(r"!\[(?P<alt>[^\[\]\n]*)\]\(\s*<?(?P<url>[^)\s>]+)")
_DATA = re.compile(r"!?\[(?P<alt>[^\[\]\n]*)\]\(\s*<?(?P<url>data:image/[A-Za-z0-9.+-]+;base64,[A-Za-z0-9+/=\s]+)")
_DATA_URL = re.compile(r"data:(?P<mime>image/[A-Za-z0-9.+-]+);base64,(?P<data>[A-Za-z0-9+/=\s]+)")


@dataclass(frozen=True, slots=True)
class OutImage:
    alt: str
    url: str  # http(s) on an allowed host, or a data URL


@dataclass(frozen=True, slots=True)
class LoadedImage:
    image: OutImage
    data: bytes
    mime: str


class ImageFetchError(PlatformError):
    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@runtime_checkable
class ImageChannel(Protocol):
    async def send_images(self, message: InboundMessage, images: Sequence[OutImage], hosts: Sequence[str]) -> None:
        """Send each image as a native image reply to `message` (after the answer); a failed one
        is logged and skipped."""


def _hosts(image_hosts: Iterable[str]) -> tuple[str, ...]:
    return tuple(h.strip().lower().rstrip(".") for h in image_hosts if h.strip())


def find_images(text: str, image_hosts: Iterable[str]) -> list[OutImage]:
    """The images of `text` to send natively, in order, each once, at most `MAX_IMAGES`."""
    hosts = _hosts(image_hosts)
    found: list[tuple[int, OutImage]] = []
    for m in _IMAGE.finditer(text):
        if _allowed(m.group("url"), hosts):
            found.append((m.start(), OutImage(m.group("alt"), m.group("url"))))
    for m in _DATA.finditer(text):
        found.append((m.start(), OutImage(m.group("alt"), "".join(m.group("url").split()))))
    images: list[OutImage] = []
    for _, image in sorted(found, key=lambda item: item[0]):
        if image not in images:
            images.append(image)
    return images[:MAX_IMAGES]


def decode_data_url(url: str, limit: int = MAX_IMAGE) -> tuple[bytes, str]:
    m = _DATA_URL.fullmatch(url)
    if m is None:
        raise ImageFetchError("image: not a base64 image data URL")
    payload = "".join(m.group("data").split())
    if len(payload) // 4 * 3 > limit + 3:
        raise ImageFetchError("image: data URL too large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageFetchError(f"image: bad base64: {e}") from e
    if len(data) > limit:
        raise ImageFetchError("image: data URL too large")
    return data, m.group("mime")


async def load(
    http: aiohttp.ClientSession, image: OutImage, image_hosts: Iterable[str], limit: int = MAX_IMAGE
) -> LoadedImage:
    """The image's bytes and type: a data URL decoded, an allowed URL downloaded (redirects
    only to allowed hosts). Raises `PlatformError` otherwise."""
    if image.url.startswith("data:"):
        data, mime = decode_data_url(image.url, limit)
        return LoadedImage(image, data, mime)
    hosts = _hosts(image_hosts)
    url = image.url
    for _ in range(MAX_REDIRECTS + 1):
        if not _allowed(url, hosts):  # checked again for every redirect
            raise ImageFetchError("image: host not allowed")
        try:
            async with http.get(url, allow_redirects=False, timeout=API_TIMEOUT) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    url = urljoin(url, resp.headers["Location"])
                    continue
                if resp.status != 200:
                    raise ImageFetchError(f"image: HTTP {resp.status}")
                if not resp.content_type.startswith("image/"):
                    raise ImageFetchError(f"image: not an image ({resp.content_type})")
                data = await read_capped(resp, "image download", limit)
                return LoadedImage(image, data, resp.content_type)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ImageFetchError(f"image: {type(e).__name__}: {e}") from e
    raise ImageFetchError("image: too many redirects")


class ImagesOut:
    """After the answer: its allowed and data-URL images as native images, where the channel can."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    async def __call__(self, exchange: Exchange) -> Flow:
        answer, message = exchange.answer, exchange.message
        if not answer:
            return Flow.CONTINUE
        hosts = list(exchange.cfg.content.image_hosts)
        images = find_images(answer, hosts)
        channel = self._delivery.channel(message)
        if not images or not isinstance(channel, ImageChannel):
            return Flow.CONTINUE
        try:
            await channel.send_images(message, images, hosts)
        except PlatformError as e:  # the answer is delivered: the images stay links
            log.warning("answer images not sent: %s", e, extra=fields(message))
        return Flow.CONTINUE
