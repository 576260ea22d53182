"""Images an answer carries, sent as native images after the answer's text (issue 16, "Images and
files out"): Markdown images on a host of `[content] image_hosts` (Dify's `message_file` images
arrive as such, `gateway.draft`) and `data:image/...;base64,` images the model wrote.

Nothing here fetches a URL unless its host passes `gateway.sanitize`'s host rule: an image on
another host stays the plain link the sanitizer made of it, and no request goes to that host. A
redirect is followed only to an allowed host (at most `MAX_REDIRECTS`), a body is read up to
`MAX_IMAGE` bytes, and only an `image/*` answer counts. Every failure (download, upload, send)
leaves the image as the link in the text: the answer itself is delivered before this step.

A channel that can send images implements `ImageChannel.send_images`; the others get nothing more.
A channel that shows images inside the answer's own message (Feishu: `img` in the card or post)
also implements `UploadChannel.upload_answer_images`, called by `upload_ahead` before the answer is
delivered; its `send_images` then sends only the images the answer's message does not show.

The displayed text (`displayed`, applied where the answer is made safe, `gateway.answer.safe`) carries
no data URL: each becomes its alt text or "[image]" (localised), the native image follows; on a
platform whose chat cannot show an image by URL (Feishu) an allowed image is a link there, its alt
text the link text. This step reads the model's answer itself (`Exchange.draft`), not that text.

A generated file (a backend's FILE delta, Dify's non-image `message_file`) is a link in the text and,
from an allowed host (`[content] image_hosts` or the host of the agent's own `[model] base_url`, where
Dify serves its files), is downloaded (at most `MAX_FILE`) and sent as a file message by a
`FileChannel`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import urljoin, urlsplit

import aiohttp

from .capability import supports
from .errors import PlatformError
from .exchange import Delivery, Exchange, Flow, fields, log
from .i18n import N_, Locale, translator
from .messages import InboundMessage
from .sanitize import _allowed
from .upstream import API_TIMEOUT, read_capped

MAX_IMAGE = 10 * 1024 * 1024  # bytes of one image, downloaded or decoded
MAX_IMAGES = 4  # images sent per answer; the others stay links
MAX_REDIRECTS = 3
MAX_FILE = 20 * 1024 * 1024  # bytes of one generated file (DingTalk's media upload takes 20 MB)
MAX_FILES = 4  # files sent per answer; the others stay links
IMAGE_WORD = N_("image")  # "[image]": an image shown apart from the text (a native image follows)
IMAGE_MARK_ALT = N_("[image: {alt}]")
# Platforms whose messages cannot show an image by URL: an allowed image is a link in the text there.
NO_URL_IMAGES = frozenset({"feishu"})
# `![alt](url)` on an allowed host (the sanitizer left it an image), and an image data URL as an image
# or as the link the sanitizer made of it (`[alt](data:image/png;base64,...)`).
_IMAGE = re.compile(r"!\[(?P<alt>[^\[\]\n]*)\]\(\s*<?(?P<url>[^)\s>]+)")
_DATA = re.compile(r"!?\[(?P<alt>[^\[\]\n]*)\]\(\s*<?(?P<url>data:image/[A-Za-z0-9.+-]+;base64,[A-Za-z0-9+/=\s]+)")
_DATA_SHOWN = re.compile(_DATA.pattern + r"\s*>?\s*\)?")  # the whole image or link, to replace
_DATA_URL = re.compile(r"data:(?P<mime>image/[A-Za-z0-9.+-]+);base64,(?P<data>[A-Za-z0-9+/=\s]+)")


@dataclass(frozen=True, slots=True)
class OutImage:
    alt: str
    url: str  # http(s) on an allowed host, or a data URL


@dataclass(frozen=True, slots=True)
class OutFile:
    name: str  # the file name shown (e.g. "report.xlsx")
    url: str  # http(s) on an allowed host


@dataclass(frozen=True, slots=True)
class LoadedFile:
    file: OutFile
    data: bytes
    mime: str


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


@runtime_checkable
class UploadChannel(Protocol):
    async def upload_answer_images(
        self, message: InboundMessage, images: Sequence[OutImage], hosts: Sequence[str]
    ) -> None:
        """Upload the images before the answer to `message` is delivered, for its message to
        show them; a failed one is logged and skipped (it stays a link)."""


async def upload_ahead(channel: object, exchange: Exchange, answer: str) -> None:
    """Before the answer is delivered: its images uploaded where the channel shows them inside
    it (`UploadChannel`). A failure leaves them to `ImagesOut` (the links stay in the text)."""
    if not supports(channel, UploadChannel):
        return
    hosts = list(exchange.cfg.content.image_hosts)
    images = find_images(answer, hosts)
    if images:
        try:
            await channel.upload_answer_images(exchange.message, images, hosts)
        except PlatformError as e:
            log.warning("answer images not uploaded ahead: %s", e, extra=fields(exchange.message))


@runtime_checkable
class FileChannel(Protocol):
    async def send_files(self, message: InboundMessage, files: Sequence[OutFile], hosts: Sequence[str]) -> None:
        """Send each file as a native file reply to `message` (after the answer); a failed one is
        logged and skipped."""


def displayed(text: str, image_hosts: Iterable[str], locale: Locale | None, platform: str) -> str:
    """`text` (made safe already) as the chat shows it: each data-URL image its alt text or a marker;
    where the platform cannot show images by URL (`NO_URL_IMAGES`), each allowed image a link."""
    if "data:image/" not in text and (platform not in NO_URL_IMAGES or "![" not in text):
        return text
    t = translator(locale)

    def mark(m: re.Match[str]) -> str:
        alt = " ".join(m.group("alt").split())
        return t(IMAGE_MARK_ALT, alt=alt) if alt else f"[{t(IMAGE_WORD)}]"

    text = _DATA_SHOWN.sub(mark, text)
    if platform in NO_URL_IMAGES:
        hosts = _hosts(image_hosts)

        def link(m: re.Match[str]) -> str:
            if not _allowed(m.group("url"), hosts):
                return m.group()
            whole = m.group()
            alt = " ".join(m.group("alt").split()) or t(IMAGE_WORD)
            return f"[{alt}" + whole[whole.index("](") :]  # `](url`: the rest follows unchanged

        text = _IMAGE.sub(link, text)
    return text


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
    data, mime = await _download(http, image.url, image_hosts, limit, "image")
    return LoadedImage(image, data, mime)


async def load_file(
    http: aiohttp.ClientSession, file: OutFile, hosts: Iterable[str], limit: int = MAX_FILE
) -> LoadedFile:
    """A generated file's bytes and type, downloaded from an allowed host (redirects only to
    allowed hosts). Raises `PlatformError` otherwise."""
    data, mime = await _download(http, file.url, hosts, limit, "file")
    return LoadedFile(file, data, mime)


async def _download(
    http: aiohttp.ClientSession, url: str, allowed: Iterable[str], limit: int, what: str
) -> tuple[bytes, str]:
    hosts = _hosts(allowed)
    for _ in range(MAX_REDIRECTS + 1):
        if not _allowed(url, hosts):  # checked again for every redirect
            raise ImageFetchError(f"{what}: host not allowed")
        try:
            async with http.get(url, allow_redirects=False, timeout=API_TIMEOUT) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    url = urljoin(url, resp.headers["Location"])
                    continue
                if resp.status != 200:
                    raise ImageFetchError(f"{what}: HTTP {resp.status}")
                if what == "image" and not resp.content_type.startswith("image/"):
                    raise ImageFetchError(f"image: not an image ({resp.content_type})")
                return await read_capped(resp, f"{what} download", limit), resp.content_type
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ImageFetchError(f"{what}: {type(e).__name__}: {e}") from e
    raise ImageFetchError(f"{what}: too many redirects")


class ImagesOut:
    """After the answer: its allowed and data-URL images as native images, where the channel can."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    async def __call__(self, exchange: Exchange) -> Flow:
        message, draft = exchange.message, exchange.draft
        # The model's own answer: the delivered text has its data URLs replaced (`displayed`).
        answer = draft.answer if draft is not None else exchange.answer
        if not answer:
            return Flow.CONTINUE
        hosts = list(exchange.cfg.content.image_hosts)
        images = find_images(answer, hosts)
        channel = self._delivery.channel(message)
        if images and supports(channel, ImageChannel):
            try:
                await channel.send_images(message, images, hosts)
            except PlatformError as e:  # the answer is delivered: the images stay links
                log.warning("answer images not sent: %s", e, extra=fields(message))
        files = [OutFile(name, url) for name, url in (draft.files if draft is not None else [])]
        if files and supports(channel, FileChannel):
            file_hosts = [*hosts, *_base_host(exchange.cfg.model.base_url)]
            allowed = [f for f in files if _allowed(f.url, _hosts(file_hosts))][:MAX_FILES]
            try:
                if allowed:
                    await channel.send_files(message, allowed, file_hosts)
            except PlatformError as e:  # the answer is delivered: the files stay links
                log.warning("answer files not sent: %s", e, extra=fields(message))
        return Flow.CONTINUE


def _base_host(base_url: str) -> list[str]:
    """The host of the agent's backend (Dify serves its generated files there)."""
    try:
        host = urlsplit(base_url).hostname or ""
    except ValueError:
        host = ""
    return [host] if host else []
