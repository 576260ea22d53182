"""DingTalk Stream mode on aiohttp: open-connection call, websocket, frames, ACKs, SYSTEM ping and
disconnect (docs/protocols/dingtalk.md §A.3-A.7). `StreamClient.session` is the session of a `ConnectionLoop`.

Liveness: any DingTalk frame (SYSTEM ping or data) proves the connection; none for `stale_after`
seconds raises `StaleConnection`. Our websocket pings only keep NATs open and catch dead TCP; their
pongs do not count, since a half-dead server still answers those without delivering anything.
"""

from __future__ import annotations

import asyncio
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
from gateway.connection import StaleConnection
from gateway.errors import PlatformError
from gateway.intake import OrderedIntake
from gateway.upstream import retryable_status

from .parse import TOPIC

log = logging.getLogger(__name__)

OPEN_PATH = "/v1.0/gateway/connections/open"
OPEN_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)
CONNECT_TIMEOUT = 10.0
PING_INTERVAL = 20.0  # websocket pings, as the SDK's websockets client sends them
CLOSE_TIMEOUT = 2.0

# Called with the `data` string of a robot-message CALLBACK; the frame is ACKed when its
# admission says so, else left un-ACKed so DingTalk redelivers it.
OnMessage = Callable[[str], Awaitable[Verdict]]


class FrameError(ValueError):
    """A downstream frame that does not follow the envelope of §A.5."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: str  # SYSTEM | EVENT | CALLBACK
    topic: str
    message_id: str
    data: str  # a JSON document encoded as a string


def parse_frame(raw: str | bytes) -> Frame:
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise FrameError(f"not JSON: {e}") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("headers"), dict):
        raise FrameError("no headers")
    headers = envelope["headers"]
    message_id, data = headers.get("messageId"), envelope.get("data", "")
    if not isinstance(message_id, str) or not message_id or not isinstance(data, str):
        raise FrameError("messageId missing or data not a string")
    return Frame(str(envelope.get("type", "")), str(headers.get("topic", "")), message_id, data)


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
    def __init__(
        self,
        http: aiohttp.ClientSession,
        cfg: DingTalkConfig,
        budget: ApiBudget,
        on_message: OnMessage,
        backoff: Backoff,
    ) -> None:
        self._http = http
        self._cfg = cfg
        self._budget = budget
        self._on_message = on_message
        self.backoff = backoff
        self._intake: OrderedIntake | None = None  # the current connection's

    async def session(self, connected: Callable[[], None]) -> None:
        """One connection, served until the server asks to reconnect (returns) or it fails (raises)."""
        endpoint, ticket = await open_connection(self._http, self._cfg, self._budget)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                ws = await self._http.ws_connect(
                    f"{endpoint}?ticket={quote_plus(ticket)}",
                    heartbeat=PING_INTERVAL,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT),
                    max_msg_size=4 * 1024 * 1024,
                )
        except (aiohttp.ClientError, TimeoutError) as e:
            raise PlatformError(f"websocket connect failed: {type(e).__name__}: {e}") from e
        async with ws:
            connected()
            await self._serve(ws)

    async def settled(self) -> None:
        """Until every message frame read so far was submitted (and ACKed if accepted): with a
        SYSTEM ping's ACK, the barrier that says earlier frames were handled."""
        if self._intake is not None:
            await self._intake.wait_idle()

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Serve frames until the server asks us to reconnect (return) or the connection fails (raise)."""
        stale_after = self._cfg.stale_after
        async with OrderedIntake() as intake:  # drained before the close: in-flight ACKs still go out
            self._intake = intake
            while True:
                try:
                    # One deadline per DingTalk frame; ping/pong control frames do not reset it.
                    async with asyncio.timeout(stale_after):
                        msg = await ws.receive()
                except TimeoutError:
                    raise StaleConnection(f"no frame for {stale_after:g} s") from None
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    if await self._handle(ws, intake, msg.data):
                        break
                elif msg.type is WSMsgType.ERROR:
                    raise ConnectionError(f"websocket error: {ws.exception()}")
                else:  # CLOSE / CLOSING / CLOSED: only a SYSTEM disconnect is a polite goodbye
                    raise ConnectionError(f"websocket closed by the server (code {ws.close_code})")
        await ws.close()

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
            # ping (and every other SYSTEM topic) is ACKed with its data echoed (§A.6).
            await ws.send_str(ack_frame(frame.message_id, frame.data))
            if frame.topic == "disconnect":
                log.info("server asked to reconnect", extra={"platform": "dingtalk"})
                return True
            return False
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
