"""`WeComApi`: what one WeCom AI bot sends, and the quota it sends it under.

The AI bot has no REST API of its own: replies and pushes are frames on the long connection
(`ws.Link`), the callback mode's later reply is one POST to the callback's `response_url`, and a
user's media is a plain HTTPS download decrypted with its key. What they share is WeCom's quota:
"replies and pushes together, at most 30 messages a minute and 1,000 an hour into one
conversation" (docs/protocols/wecom.md). Each new message (a stream's first frame, a markdown
reply, a push, the welcome) takes a turn of its conversation's `RateLimiter` window first and
waits for it; refreshes of a stream are the same message and take none. A wait is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import orjson

from gateway.errors import PlatformError
from gateway.jsonvalues import as_dict
from gateway.logs import register_secret, register_url_secrets
from gateway.ratelimit import Rate, RateLimiter
from gateway.upstream import read_capped

from . import frame as wf
from .crypto import CryptoError, decrypt_media
from .ws import AnswerLost, Link

log = logging.getLogger(__name__)

QUOTA = "message"  # the limiter's API name for messages into a conversation
QUOTA_LOG_AFTER = 1.0  # seconds a message waits for its conversation's quota before that is logged
LINK_WAIT = 10.0  # seconds a send waits for the connection to come (back) before giving up
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30.0)
THREAD_ABOVE = 1 << 20  # media bigger than this is decrypted in a thread, not on the event loop
# What the first bytes of a decrypted picture say it is (the URL serves ciphertext).
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
)


def quota(per_minute: int, per_hour: int) -> RateLimiter:
    """The per-conversation message windows (0 = that one unlimited)."""
    rates = tuple(r for r in (Rate(per_minute, 60.0) if per_minute else None,
                              Rate(per_hour, 3600.0) if per_hour else None) if r is not None)
    return RateLimiter(scoped={QUOTA: rates} if rates else None)


def sniff(data: bytes, served: str) -> str:
    """The mime type of a decrypted download."""
    for magic, mime in _IMAGE_MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"%PDF"):
        return "application/pdf"
    return served if served and served != "application/octet-stream" else "application/octet-stream"


class WeComApi:
    def __init__(
        self, http: aiohttp.ClientSession, limiter: RateLimiter, link: Callable[[], Link | None], linked: asyncio.Event
    ) -> None:
        self._http = http
        self._limiter = limiter
        self._link = link  # the long connection's subscribed socket, None while there is none
        self._linked = linked

    async def turn(self, conversation: str) -> None:
        """Wait for a message's turn in `conversation`'s quota; a wait longer than
        `QUOTA_LOG_AFTER` is logged while it lasts (the message is held back, not lost)."""
        waiting = asyncio.ensure_future(self._limiter.acquire(QUOTA, conversation))
        try:
            done, _ = await asyncio.wait((waiting,), timeout=QUOTA_LOG_AFTER)
            if not done:
                log.warning(
                    "message waits for the conversation's quota (WeCom takes 30 a minute, 1000 an hour)",
                    extra={"platform": "wecom", "conversation": conversation},
                )
            await waiting
        finally:
            waiting.cancel()

    async def link(self, wait: float = LINK_WAIT) -> Link:
        """The connection to send on; waits `wait` seconds for one (a reconnect, a takeover)."""
        current = self._link()
        if current is not None and not current.closed:
            return current
        try:
            async with asyncio.timeout(wait):
                while (current := self._link()) is None or current.closed:
                    await self._linked.wait()
                    if (current := self._link()) is None or current.closed:
                        await asyncio.sleep(0.05)  # one just closed: `linked` is cleared in a moment
        except TimeoutError:
            raise PlatformError(
                "wecom: no long connection on this instance (connecting, or another instance holds it)"
            ) from None
        return current

    async def respond(self, link: Link, frame: wf.Frame) -> None:
        """A reply frame on the link its callback came on."""
        await link.request(frame)

    async def push(self, conversation: str, content: str) -> None:
        """A proactive markdown message (`aibot_send_msg`) into a group (chatid) or a single chat
        (userid). Not retried: a lost answer does not prove a lost message."""
        await self.turn(conversation)
        link = await self.link()
        try:
            await link.request(wf.send_markdown(conversation, content))
        except AnswerLost as e:  # maybe delivered: sending it again could show it twice
            raise PlatformError(str(e), retryable=False) from None

    async def response_url(self, url: str, body: dict[str, object]) -> None:
        """The callback mode's one later reply: plain JSON to the callback's `response_url`."""
        register_url_secrets(url)
        for name, value in parse_qsl(urlsplit(url).query):
            if name == "response_code":  # it works once, but only for whoever has it: not for logs
                register_secret(value)
        try:
            async with self._http.post(
                url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}, timeout=HTTP_TIMEOUT
            ) as resp:
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PlatformError(f"wecom response_url: {type(e).__name__}: {e}", retryable=False) from e
        if resp.status >= 400:
            raise PlatformError(f"wecom response_url: HTTP {resp.status}", retryable=resp.status >= 500)
        try:
            answer = as_dict(orjson.loads(raw)) if raw.strip() else {}
        except orjson.JSONDecodeError:
            answer = {}
        errcode = answer.get("errcode", 0)
        if errcode:  # WeCom's errors come inside a 200
            raise PlatformError(f"wecom response_url: errcode {errcode} {answer.get('errmsg', '')}", retryable=False)

    async def download(self, url: str, aeskey: str) -> tuple[bytes, str]:
        """A user's media: the ciphertext at `url` (valid 5 minutes), decrypted with its key."""
        register_url_secrets(url)
        try:
            async with self._http.get(url, timeout=HTTP_TIMEOUT) as resp:
                if resp.status >= 400:
                    raise PlatformError(f"wecom media download: HTTP {resp.status}", retryable=resp.status >= 500)
                data = await read_capped(resp, "wecom media download")
                served = resp.content_type or ""
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PlatformError(f"wecom media download: {type(e).__name__}: {e}") from e
        try:  # a big file off the event loop: about 70 ms for 20 MiB here
            if len(data) > THREAD_ABOVE:
                plain = await asyncio.to_thread(decrypt_media, data, aeskey)
            else:
                plain = decrypt_media(data, aeskey)
        except CryptoError as e:
            raise PlatformError(f"wecom media download: {e}", retryable=False) from None
        return plain, sniff(plain, served)
