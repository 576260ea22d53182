"""DingTalk Stream mode on aiohttp: open-connection call, websocket, frames, ACKs, SYSTEM ping and
disconnect (docs/protocols/dingtalk.md §A.3-A.7). `StreamClient.session` is the session of a `ConnectionLoop`.

Liveness, as in DingTalk's own SDKs: anything the server sends proves the link, a pong to our
websocket ping included (`LinkWatch`: a ping after `stale_after / 2` s of silence, at most 20 s;
nothing for `stale_after` s raises `StaleConnection`).

Warm swap: on a SYSTEM `disconnect` (with or without a messageId) the session opens the next
connection before it leaves the old one. DingTalk stops delivering on the old socket and closes it
about 10 s later; until then it is still read (a frame already on its way is handled and ACKed
there) and its in-flight ACKs still go out. One `OrderedIntake` spans both sockets, so a
conversation keeps its order across the swap, and the `ConnectionLoop` sees one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from urllib.parse import quote_plus

import aiohttp
import orjson
from aiohttp import WSMsgType

from gateway import __version__
from gateway.admission import Admission, Verdict
from gateway.backoff import Backoff
from gateway.budget import ApiBudget
from gateway.config import DingTalkConfig
from gateway.connection import LinkWatch, StaleConnection
from gateway.errors import PlatformError
from gateway.intake import OrderedIntake
from gateway.logs import register_secret
from gateway.upstream import retryable_status

from .parse import TOPIC

log = logging.getLogger(__name__)

OPEN_PATH = "/v1.0/gateway/connections/open"
OPEN_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
# How long a socket the server asked us to leave is still read: DingTalk closes it after about
# 10 s of silence (§A.7); if it does not, we close it.
RETIRE_AFTER = 15.0

# Called with the `data` string of a robot-message CALLBACK; the frame is ACKed when its
# admission says so, else left un-ACKed so DingTalk redelivers it.
OnMessage = Callable[[str], Awaitable[Verdict]]


class FrameError(ValueError):
    """A downstream frame that does not follow the envelope of §A.5."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: str  # SYSTEM | EVENT | CALLBACK
    topic: str
    message_id: str  # "" only for a SYSTEM frame, which then needs no ACK
    data: str  # a JSON document encoded as a string


def parse_frame(raw: str | bytes) -> Frame:
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise FrameError(f"not JSON: {e}") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("headers"), dict):
        raise FrameError("no headers")
    headers = envelope["headers"]
    kind, message_id, data = str(envelope.get("type", "")), headers.get("messageId"), envelope.get("data", "")
    # DingTalk's documented `disconnect` example carries no messageId (§A.7): a SYSTEM frame is
    # still honoured without one, it just cannot be ACKed. Anything else must be ACKable.
    if message_id is None and kind == "SYSTEM":
        message_id = ""
    if not isinstance(message_id, str) or not (message_id or kind == "SYSTEM") or not isinstance(data, str):
        raise FrameError("messageId missing or data not a string")
    return Frame(kind, str(headers.get("topic", "")), message_id, data)


def ack_frame(message_id: str, data: str, code: int = 200, message: str = "OK") -> str:
    """The client's ACK (§A.6): headers built afresh, `data` a JSON string."""
    return orjson.dumps(
        {
            "code": code,
            "headers": {"contentType": "application/json", "messageId": message_id},
            "message": message,
            "data": data,
        }
    ).decode()


_CALLBACK_ACK = orjson.dumps({"response": "OK"}).decode()


async def open_connection(
    http: aiohttp.ClientSession, cfg: DingTalkConfig, budget: ApiBudget
) -> tuple[str, str]:
    """Ask for a websocket endpoint and a one-time ticket (§A.3). Raises `PlatformError`."""
    budget.record("open_connection")
    body = {
        "clientId": cfg.client_id,
        "clientSecret": cfg.client_secret,
        "subscriptions": [{"type": "CALLBACK", "topic": TOPIC}],
        "ua": f"botgate/{__version__}",
        "localIp": "",
    }
    url = cfg.api_base.rstrip("/") + OPEN_PATH
    try:
        async with http.post(url, json=body, timeout=OPEN_TIMEOUT) as resp:
            status, raw = resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        raise PlatformError(f"open connection failed: {type(e).__name__}: {e}") from e
    if status >= 400:
        raise PlatformError(
            f"open connection failed: HTTP {status} {raw[:200].decode(errors='replace')}",
            retryable=retryable_status(status),
        )
    try:
        answer = orjson.loads(raw)
        endpoint, ticket = answer["endpoint"], answer["ticket"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise PlatformError("open connection: answer without endpoint/ticket") from None
    if not isinstance(endpoint, str) or not endpoint.startswith(("ws://", "wss://")) or not ticket:
        raise PlatformError(f"open connection: unusable endpoint {endpoint!r}")
    return endpoint, str(ticket)


class StreamClient:
    """`config()` is the bot's config in force, read for every connection it opens (a reload's
    new app secret opens the next one; the open one stays up)."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        config: Callable[[], DingTalkConfig],
        budget: ApiBudget,
        on_message: OnMessage,
        backoff: Backoff,
    ) -> None:
        self._http = http
        self._config = config
        self._budget = budget
        self._on_message = on_message
        self.backoff = backoff
        self._intake: OrderedIntake | None = None  # the current session's

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        """A fresh ticket and a websocket on it. Raises `PlatformError`."""
        endpoint, ticket = await open_connection(self._http, self._config(), self._budget)
        register_secret(ticket)  # it is in the URL that a refused handshake's error names
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await self._http.ws_connect(
                    f"{endpoint}?ticket={quote_plus(ticket)}",
                    autoping=False,  # LinkWatch answers pings and counts pongs
                    heartbeat=None,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT),
                    max_msg_size=4 * 1024 * 1024,
                )
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PlatformError(f"websocket connect failed: {type(e).__name__}: {e}") from e

    async def session(self, connected: Callable[[], None]) -> None:
        """Connections served until one fails (raises); a `disconnect` swaps in the next one
        without ending the session (see the module docstring)."""
        ws = await self._connect()
        sockets = {ws}
        retiring: set[asyncio.Task[None]] = set()
        try:
            # Drained before the sockets close: in-flight ACKs still go out.
            async with OrderedIntake() as intake:
                self._intake = intake
                connected()
                try:
                    while True:
                        await self._serve(ws, intake)  # until the server asks us to move
                        task = asyncio.create_task(self._retire(ws, intake, sockets))
                        retiring.add(task)
                        task.add_done_callback(retiring.discard)
                        ws = await self._connect()  # the old socket is still open and read meanwhile
                        sockets.add(ws)
                        log.info("connection swapped", extra={"platform": "dingtalk", "sockets": len(sockets)})
                finally:
                    leaving = tuple(retiring)
                    for task in leaving:  # stop reading old sockets; they stay open for ACKs
                        task.cancel()
                    await asyncio.gather(*leaving, return_exceptions=True)
        finally:
            for socket in sockets:
                await socket.close()

    async def settled(self) -> None:
        """Until every message frame read so far was submitted (and ACKed if accepted): with a
        SYSTEM ping's ACK, the barrier that says earlier frames were handled."""
        if self._intake is not None:
            await self._intake.wait_idle()

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse, intake: OrderedIntake) -> None:
        """Serve frames until the server asks us to move (return) or the connection fails (raise)."""
        watch = LinkWatch(self._config().stale_after)
        while True:
            if await self._on_ws_message(ws, intake, await watch.receive(ws)):
                log.info("server asked to reconnect", extra={"platform": "dingtalk"})
                return

    async def _retire(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        intake: OrderedIntake,
        sockets: set[aiohttp.ClientWebSocketResponse],
    ) -> None:
        """Keep reading a socket the server asked us to leave until it closes it (or
        `RETIRE_AFTER`): frames still on their way there are handled and ACKed there."""
        watch = LinkWatch(RETIRE_AFTER)
        until = watch.heard + RETIRE_AFTER
        with contextlib.suppress(ConnectionError, StaleConnection):
            while (msg := await watch.receive_until(ws, until)) is not None:
                await self._on_ws_message(ws, intake, msg)  # another disconnect: already leaving
        sockets.discard(ws)
        await ws.close()
        log.debug("left connection closed", extra={"platform": "dingtalk"})

    async def _on_ws_message(
        self, ws: aiohttp.ClientWebSocketResponse, intake: OrderedIntake, msg: aiohttp.WSMessage
    ) -> bool:
        """Handle one websocket message; True when the server asked us to disconnect."""
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            return await self._handle(ws, intake, msg.data)
        if msg.type is WSMsgType.ERROR:
            raise ConnectionError(f"websocket error: {ws.exception()}")
        # CLOSE / CLOSING / CLOSED: only a SYSTEM disconnect is a polite goodbye
        raise ConnectionError(f"websocket closed by the server (code {ws.close_code})")

    async def _handle(
        self, ws: aiohttp.ClientWebSocketResponse, intake: OrderedIntake, raw: str | bytes
    ) -> bool:
        """Answer one frame; True when the server asked us to disconnect."""
        try:
            frame = parse_frame(raw)
        except FrameError as e:
            log.warning("unparseable frame skipped: %s", e, extra={"platform": "dingtalk"})
            return False
        log.debug(
            "frame",
            extra={
                "platform": "dingtalk",
                "type": frame.type,
                "topic": frame.topic,
                "frame_id": frame.message_id,
            },
        )
        if frame.type == "SYSTEM":
            # ping (and every other SYSTEM topic) is ACKed with its data echoed (§A.6), when it
            # names itself: without a messageId there is nothing to answer.
            if frame.message_id:
                await ws.send_str(ack_frame(frame.message_id, frame.data))
            return frame.topic == "disconnect"
        if frame.type == "CALLBACK" and frame.topic == TOPIC:
            await intake.handle(await self._on_message(frame.data), partial(_acknowledge, ws, frame.message_id))
            return False
        # Nothing else is subscribed; answer like the SDK's default handlers so it is not redelivered.
        await ws.send_str(ack_frame(frame.message_id, frame.data, code=404, message="not implement"))
        return False


async def _acknowledge(ws: aiohttp.ClientWebSocketResponse, message_id: str, admission: Admission) -> None:
    """ACK a robot-message frame once its admission allows; ACKs may leave in any order, each
    names its frame's messageId (§A.6)."""
    if admission.acknowledge:
        await ws.send_str(ack_frame(message_id, _CALLBACK_ACK))
