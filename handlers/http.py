"""HTTP plumbing shared by every route: JSON errors (never a bare 500), request metrics (count and
duration by route template), body limits (per route, checked before the body is read) and the 408
for a body that does not arrive in time."""

from __future__ import annotations

import logging
from time import perf_counter
from typing import Any

from aiohttp import web

from gateway.keys import CONFIG, METRICS
from gateway.server import BodyTimeout

log = logging.getLogger(__name__)

# Routes whose bodies are small by nature (a password, a conversation key, nothing at all): a larger
# one is refused with 413 before a byte of it is read, whoever sends it, since the login answers
# anyone. Every other route takes up to `[server] max_body_bytes`; the webhooks cap theirs lower
# themselves (handlers/webhook.py).
SMALL_BODY = 4096
API_V1 = "/api/v1/"  # the send API (handlers/api_v1.py): messages and alert payloads are not small


def body_limit(request: web.Request) -> int:
    """The most this request's body may hold."""
    limit = request.app[CONFIG].server.max_body_bytes
    route = _route_label(request)
    if route in ("/login", "/logout") or (route.startswith("/api/") and not route.startswith(API_V1)):
        return min(limit, SMALL_BODY)
    return limit


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
    is counted and timed by route template. (One middleware, not three: each layer costs every
    request.)"""
    started = perf_counter()
    status = 500
    try:
        # A declared body over the route's limit gets 413 before any handler runs, on every route
        # (also those that never read a body); a chunked one is cut off where it passes the limit
        # (`client_max_size`, which request.read()/post()/json() enforce).
        if request.match_info.http_exception is None:
            size, limit = request.content_length, body_limit(request)
            if size is not None and size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
            if size is None and request.body_exists and limit < request.app[CONFIG].server.max_body_bytes:
                request = request.clone(client_max_size=limit)
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
    except BodyTimeout as e:
        # The body trickled in too slowly ([server] body_timeout): answer, then close.
        status = 408
        response = json_error(408, str(e))
        response.force_close()
        return response
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
        request.app[METRICS].http_request(_route_label(request), status, perf_counter() - started)
