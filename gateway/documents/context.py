"""The extractor's place in an aiohttp app: `app.cleanup_ctx.append(documents_context(limits))`,
then `app[DOCUMENTS]` while the app runs; its workers are killed at cleanup."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from .pool import DocumentExtractor
from .results import Limits

DOCUMENTS = web.AppKey("documents", DocumentExtractor)


def documents_context(limits: Limits | None = None) -> Callable[[web.Application], AsyncIterator[None]]:
    """A `cleanup_ctx` entry that puts a `DocumentExtractor` under `app[DOCUMENTS]`."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        extractor = DocumentExtractor(limits)
        app[DOCUMENTS] = extractor
        try:
            yield
        finally:
            await extractor.close()

    return context
