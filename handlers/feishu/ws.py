"""The Feishu/Lark long connection (lark-oapi's `ws` protocol) on aiohttp, in the gateway's loop.

One session (run by `gateway.connection.ConnectionLoop`):
1. `POST {domain}/callback/ws/endpoint` with AppID/AppSecret -> websocket URL + `ClientConfig`
   (PingInterval, ReconnectCount, ReconnectInterval, ReconnectNonce; seconds).
2. Websocket with binary protobuf `Frame`s (frame.py). We ping (control frame, `type=ping`) at once
   and every PingInterval; the server's `pong` may carry a new ClientConfig as JSON payload. A
   refused upgrade explains itself in `handshake-*` headers; the two refusals the SDK gives up on
   (app banned, too many connections) raise `Refused`: retried after `REFUSED_RETRY` or on demand.
3. Data frames `type=event` carry event JSON, possibly split into `sum` parts (`seq` 0-based, by
   `message_id`); the frame completing an event is answered with itself plus a `biz_rt` header and
   payload `{"code": 200}` once the dispatcher accepted it (`{"code": 500}` asks for redelivery).
4. Liveness, twice: the link (`LinkWatch`: websocket pings after `stale_after / 2` s of silence, at
   most 20 s, as the SDK's websockets library sends them; nothing heard for `stale_after` s, 40 by
   default) and the application (no pong frame and no data frame for 2 x PingInterval). Either
   raises `StaleConnection`.
Wire details: docs/protocols/feishu.md §B.2-B.6 and lark_oapi/ws/client.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from urllib.parse import parse_qs, urlparse

import aiohttp
import orjson
from aiohttp import WSMsgType

from gateway.admission import Admission, Verdict
from gateway.backoff import Backoff
from gateway.connection import LinkWatch, Refused, StaleConnection
from gateway.errors import PlatformError
from gateway.intake import OrderedIntake
from gateway.logs import register_url_secrets

from .api import SDK_USER_AGENT, FeishuApi
from .frame import Frame, FrameError, decode, encode

log = logging.getLogger(__name__)

CONTROL, DATA = 0, 1
CONNECT_TIMEOUT = 10.0
STALE_AFTER = 40.0  # the config's default
# Closing a dead link must not delay the reconnect (aiohttp waits 10 s for the close frame).
WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0)
# A refusal the SDK treats as final (§B.8) is retried this rarely: an admin must act first
# (unban the app, close other connections), and can then press Reconnect instead of waiting.
REFUSED_RETRY = 600.0
FORBIDDEN, AUTH_FAILED, EXCEED_CONN_LIMIT = 403, 514, 1000040350
PART_TTL = 10.0  # seconds the parts of one event may take to arrive (the SDK keeps them 5 s)
PART_MAX_EVENTS = 64
PART_MAX_COUNT = 256  # parts of one event; a larger `sum` header is not believed
PART_MAX_BYTES = 8 * 1024 * 1024
MAX_FRAME_BYTES = 4 * 1024 * 1024

# The event payload -> its verdict; the frame is answered code 200 when the admission
# acknowledges it, else code 500 (Feishu redelivers it).
EventHandler = Callable[[bytes], Awaitable[Verdict]]


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """The server's pacing for this client (its defaults until the server says otherwise)."""

    ping_interval: float = 120.0
    reconnect_interval: float = 120.0

    def updated(self, data: object) -> ClientConfig:
        """Apply the keys present and valid in a ClientConfig JSON object; the SDK requires all
        four and breaks on a partial one, we keep the old value of a missing key instead.
        ReconnectCount and ReconnectNonce are not kept: a gateway retries forever, with its own
        jitter."""
        if not isinstance(data, Mapping):
            return self
        fields = {"ping_interval": "PingInterval", "reconnect_interval": "ReconnectInterval"}
        changes: dict[str, float] = {}
        for name, key in fields.items():
            value = data.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                changes[name] = float(value)
        if changes.get("ping_interval", 1.0) <= 0:
            del changes["ping_interval"]
        return replace(self, **changes)


class ServerPacedBackoff(Backoff):
    """Reconnect backoff: the first retry comes within a second; later ones wait at least the
    server's ReconnectInterval (capped like every delay), so a struggling server is not hammered."""

    def __init__(self) -> None:
        super().__init__(first=1.0, cap=60.0)
        self.floor = 0.0

    def next(self) -> float:
        first = self.attempt == 0
        delay = super().next()
        return delay if first else max(delay, min(self.floor, self.cap))


class Reassembler:
    """Joins the parts of multi-part payloads, bounded in events, bytes and time: an event whose
    parts do not all arrive within `ttl` is forgotten (Feishu redelivers unacknowledged events)."""

    def __init__(
        self, ttl: float = PART_TTL, max_events: int = PART_MAX_EVENTS, max_bytes: int = PART_MAX_BYTES
    ) -> None:
        self._ttl, self._max_events, self._max_bytes = ttl, max_events, max_bytes
        self._pending: OrderedDict[str, tuple[float, list[bytes]]] = OrderedDict()
        self._bytes = 0

    def _forget(self, key: str) -> None:
        _, parts = self._pending.pop(key)
        self._bytes -= sum(len(p) for p in parts)

    def add(self, key: str, total: int, seq: int, chunk: bytes, now: float) -> bytes | None:
        """The whole payload once `chunk` completes it, else None."""
        while self._pending and next(iter(self._pending.values()))[0] + self._ttl < now:
            self._forget(next(iter(self._pending)))
        if not 0 <= seq < total <= PART_MAX_COUNT:
            return None
        if key in self._pending and len(self._pending[key][1]) != total:
            self._forget(key)  # the same id with another part count: start over
        if key not in self._pending:
            self._pending[key] = (now, [b""] * total)
        parts = self._pending[key][1]
        self._bytes += len(chunk) - len(parts[seq])
        parts[seq] = chunk
        if all(parts):  # an empty part never counts as received (as in the SDK)
            self._forget(key)
            return b"".join(parts)
        while self._pending and (len(self._pending) > self._max_events or self._bytes > self._max_bytes):
            self._forget(next(iter(self._pending)))
        return None

    def __len__(self) -> int:
        return len(self._pending)


def _ping(service: int) -> bytes:
    return encode(Frame(seq_id=0, log_id=0, service=service, method=CONTROL, headers=(("type", "ping"),)))


def handshake_refusal(e: aiohttp.WSServerHandshakeError) -> Exception:
    """What a refused websocket upgrade means, by its `handshake-*` headers (§B.8), as the SDK
    reads them: 403 (the app is banned) and 514 with autherrcode 1000040350 (the app's connection
    limit) are final, `Refused`; anything else, headers missing included, may pass."""
    headers: Mapping[str, str] = e.headers or {}
    status, why, auth = (headers.get(h, "") for h in ("handshake-status", "handshake-msg", "handshake-autherrcode"))
    detail = f"HTTP {e.status}" + (f", handshake-status {status}" if status else "") + (f" {why}" if why else "")
    detail += f", autherrcode {auth}" if auth else ""
    if status == str(FORBIDDEN):
        return Refused(f"feishu refused the connection, the app is banned ({detail})", REFUSED_RETRY)
    if status == str(AUTH_FAILED) and auth == str(EXCEED_CONN_LIMIT):
        return Refused(
            f"feishu refused the connection, too many connections for this app, at most 50 ({detail})", REFUSED_RETRY
        )
    return PlatformError(f"feishu ws handshake refused: {detail}")


class FeishuWsClient:
    def __init__(
        self, api: FeishuApi, http: aiohttp.ClientSession, handler: EventHandler, stale_after: float = STALE_AFTER
    ) -> None:
        self._api = api
        self._http = http
        self._handler = handler
        self._stale_after = stale_after
        self.config = ClientConfig()
        self.backoff = ServerPacedBackoff()
        self._parts = Reassembler()
        self._intake: OrderedIntake | None = None  # the current connection's

    def _configure(self, config: ClientConfig) -> None:
        if config != self.config:
            log.info(
                "client config",
                extra={"platform": "feishu", "ping_interval": config.ping_interval,
                       "reconnect_interval": config.reconnect_interval},
            )
        self.config = config
        self.backoff.floor = config.reconnect_interval

    async def _endpoint(self) -> tuple[str, int, str]:
        """The websocket URL with its service id and device id (= connection id)."""
        body = await self._api.ws_endpoint()
        url = body.get("URL")
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise PlatformError("feishu ws_endpoint: answer without a websocket URL")
        register_url_secrets(url)  # its access_key and ticket: errors naming the URL must not show them
        self._configure(self.config.updated(body.get("ClientConfig")))
        query = parse_qs(urlparse(url).query)
        try:
            service = int(query["service_id"][0])
        except (KeyError, ValueError):
            raise PlatformError("feishu ws_endpoint: URL without a numeric service_id") from None
        return url, service, query.get("device_id", [""])[0]

    async def session(self, connected: Callable[[], None]) -> None:
        """One connection, served until it fails (raises) — see `ConnectionLoop`."""
        await self._api.bot_open_id()  # before connecting: group events need it to be answered
        url, service, device_id = await self._endpoint()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                ws = await self._http.ws_connect(
                    url,
                    autoping=False,  # LinkWatch answers pings and counts pongs
                    heartbeat=None,
                    headers={"User-Agent": SDK_USER_AGENT},
                    max_msg_size=MAX_FRAME_BYTES,
                    timeout=WS_TIMEOUT,
                )
        except aiohttp.WSServerHandshakeError as e:
            raise handshake_refusal(e) from e
        async with ws:
            log.info("ws connected", extra={"platform": "feishu", "device_id": device_id})
            connected()
            await self._serve(ws, service)

    async def settled(self) -> None:
        """Until every event frame read so far was answered (see `Adapter.settled`)."""
        if self._intake is not None:
            await self._intake.wait_idle()

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse, service: int) -> None:
        await ws.send_bytes(_ping(service))  # at once, as the SDK does: the pong proves the link
        watch = LinkWatch(self._stale_after)
        last_ping = last_seen = time.monotonic()
        async with OrderedIntake() as intake:
            self._intake = intake
            while True:
                now = time.monotonic()
                # Both deadlines follow the current interval, which a pong may change at any time.
                if now >= last_ping + self.config.ping_interval:
                    await ws.send_bytes(_ping(service))
                    last_ping = now
                next_ping = last_ping + self.config.ping_interval
                stale_at = last_seen + 2 * self.config.ping_interval
                if now >= stale_at:
                    raise StaleConnection(f"no pong frame or event for {now - last_seen:.1f} s")
                msg = await watch.receive_until(ws, min(next_ping, stale_at))
                if msg is None:
                    continue
                if msg.type is WSMsgType.BINARY:
                    try:
                        frame = decode(msg.data)
                    except FrameError as e:
                        log.warning("undecodable frame dropped: %s", e, extra={"platform": "feishu"})
                        continue
                    if await self._on_frame(ws, intake, frame):
                        last_seen = time.monotonic()
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    raise ConnectionError(f"server closed the connection (code {ws.close_code})")
                elif msg.type is WSMsgType.ERROR:
                    raise ConnectionError(f"websocket error: {ws.exception()}")
                # Text frames are not part of the protocol (the SDK only logs them): ignored.

    async def _on_frame(
        self, ws: aiohttp.ClientWebSocketResponse, intake: OrderedIntake, frame: Frame
    ) -> bool:
        """Handle one frame; True when it proves the server is alive (a pong or a data frame)."""
        kind = frame.header("type")
        if frame.method == CONTROL:
            if kind != "pong":
                return False  # a server ping needs no answer (as in the SDK)
            if frame.payload:
                try:
                    self._configure(self.config.updated(orjson.loads(frame.payload)))
                except orjson.JSONDecodeError:
                    log.warning("pong with an unreadable ClientConfig", extra={"platform": "feishu"})
            return True
        if frame.method != DATA:
            return False
        message_id, total, seq = (frame.header(h) or "" for h in ("message_id", "sum", "seq"))
        # More than 6 digits is no part count (and int() refuses thousands of digits outright).
        if not message_id or not all(v.isdigit() and len(v) <= 6 for v in (total, seq)):
            log.warning("data frame without message_id/sum/seq dropped", extra={"platform": "feishu"})
            return True
        payload = frame.payload or b""
        if int(total) > 1:
            joined = self._parts.add(message_id, int(total), int(seq), payload, time.monotonic())
            if joined is None:
                return True
            payload = joined
        if kind != "event":
            return True  # card callbacks etc. are not subscribed; the SDK does not answer them either
        started = time.monotonic()
        verdict = await self._handler(payload)  # never raises: a parser bug is a verdict too
        await intake.handle(verdict, partial(_respond, ws, frame, started))
        return True


async def _respond(ws: aiohttp.ClientWebSocketResponse, frame: Frame, started: float, admission: Admission) -> None:
    """Answer a data frame with itself: payload code 200 (and its handling time) when accepted,
    500 otherwise. Responses may leave in any order: the echoed headers identify each."""
    response = frame
    if admission.acknowledge:
        response = frame.with_header("biz_rt", str(round((time.monotonic() - started) * 1000)))
    response = replace(response, payload=orjson.dumps({"code": 200 if admission.acknowledge else 500}))
    await ws.send_bytes(encode(response))
