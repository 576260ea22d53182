"""HTTP plumbing shared by every route: JSON errors (never a bare 500), request metrics, body limit."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from gateway.keys import CONFIG, METRICS

log = logging.getLogger(__name__)


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _route_label(request: web.Request) -> str:
    """The route template (never the raw path, which would explode label cardinality)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1].strip()[:200]


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Any) -> web.StreamResponse:
    """Oversized bodies are refused up front; aiohttp's own 404/405/413 become JSON errors; an
    unexpected exception is logged and answered with a JSON 500 instead of escaping; every response
    is counted by route template. (One middleware, not three: each layer costs every request.)"""
    status = 500
    try:
        # A declared body over `[server] max_body_bytes` gets 413 before any handler runs, on
        # every route (also those that never read a body); chunked bodies hit `client_max_size`.
        size, limit = request.content_length, request.app[CONFIG].server.max_body_bytes
        if size is not None and size > limit and request.match_info.http_exception is None:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        if status < 400:
            raise
        message = "request body too large" if status == 413 else (e.reason or "error").lower()
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return web.json_response({"error": message}, status=status, headers=headers)
    except web.RequestPayloadError as e:
        # The body itself is broken (e.g. "Content-Encoding: gzip" on bytes that are not gzip):
        # the client's fault, found only when a handler reads it.
        status = 400
        return json_error(400, f"unreadable request body: {_last_line(str(e))}")
    except ConnectionError:
        # The client went away mid-request (e.g. during a websocket handshake): not a server fault.
        # 499 is nginx's "client closed request"; nobody receives this response.
        status = 499
        log.debug("client disconnected", extra={"route": _route_label(request)})
        return web.Response(status=status)
    except Exception:
        log.exception("unhandled error", extra={"route": _route_label(request)})
        return json_error(500, "internal error")
    finally:
        request.app[METRICS].http_request(_route_label(request), status)
