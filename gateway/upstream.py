"""What every platform API client shares about HTTP: the call timeout, which answers are worth
retrying, and reading a download with a size cap."""

from __future__ import annotations

import aiohttp

from .errors import PlatformError

# Per API call: connecting may take 5 s, the whole call 15 s (a reply, a token, a card update).
API_TIMEOUT = aiohttp.ClientTimeout(total=15, sock_connect=5)
MAX_DOWNLOAD = 20 * 1024 * 1024  # bytes of one attachment
_CHUNK = 64 * 1024


class FileTooLarge(PlatformError):
    """A download over its size cap (`read_capped`): never retried, the file stays too large."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


def retryable_status(status: int) -> bool:
    """An HTTP status worth retrying: the server failed (5xx) or throttled us (429)."""
    return status >= 500 or status == 429


async def read_capped(resp: aiohttp.ClientResponse, what: str, limit: int = MAX_DOWNLOAD) -> bytes:
    """The whole body, refused (`FileTooLarge`, a `PlatformError` not retryable: the file stays too large, and
    `what` names the call) as soon as it exceeds `limit`: a declared length over it before
    reading anything, a longer stream before buffering more than `limit`."""
    if (resp.content_length or 0) > limit:
        raise FileTooLarge(f"{what}: file too large")
    payload = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        payload += chunk
        if len(payload) > limit:
            raise FileTooLarge(f"{what}: file too large")
    return bytes(payload)
