"""The WeCom AI bot's long connection on aiohttp, in the gateway's loop (docs/protocols/wecom.md §2).

One session (run by `gateway.connection.ConnectionLoop`):
1. Wait for the bot's connection lease (`holder.ConnectionHolder`): one connection per bot, so
   instances sharing a store take turns; the others show `standby`.
2. Open the websocket (TLS only for `wss://`), send `aibot_subscribe` with bot_id and secret, and
   wait for its answer: errcode 0 is `connected()`; 45009 (subscribing too often) waits the
   reconnect cap; any other refusal (a wrong bot_id or secret) is `Refused` for `kicked_retry`.
3. Every frame is JSON text `{cmd, headers: {req_id}, body}`; answers have no `cmd` and echo the
   `req_id` of what they answer, with `errcode`/`errmsg` (`Link.request` matches them). Our
   frames for one req_id go one at a time, each after the previous one's answer, as the SDKs send
   them. `ping` every `ping_interval`; a ping sent while two are unanswered means the link is
   dead (`StaleConnection`), as in the official SDKs.
4. `aibot_msg_callback` frames are parsed into the adapter's verdicts (in each conversation's
   order, `OrderedIntake`); WeCom expects no acknowledgement of them. `aibot_event_callback`s:
   `enter_chat` is answered with the welcome at once (it has 5 s), `disconnected_event` (another
   connection subscribed for this bot) ends the session as `Refused` without reconnecting, so the
   two do not kick each other in turn.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import WSMsgType

from gateway.admission import Admission, Verdict
from gateway.backoff import Backoff
from gateway.config import WeComConfig
from gateway.connection import Refused, StaleConnection
from gateway.errors import PlatformError, Throttled
from gateway.intake import OrderedIntake
from gateway.jsonvalues import as_str

from . import frame as wf
from .holder import ConnectionHolder, LeaseLost, Report
from .parse import EVENT, MESSAGE, Delivery, event_type

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
SUBSCRIBE_TIMEOUT = 10.0  # seconds for the subscribe answer (as LangBot waits)
ACK_TIMEOUT = 5.0  # seconds for the answer to one of our frames (the official SDKs' figure)
FREQUENCY_WAIT = 60.0  # seconds a frame refused for WeCom's frequency limit waits (its windows are minutes)
MAX_FRAME_BYTES = 4 * 1024 * 1024
WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0)

# A callback (`Delivery`) -> its verdict; an event callback -> handled (the welcome).
MessageHandler = Callable[[Delivery], Awaitable[Verdict]]
EventHandler = Callable[[Delivery, "Link"], Awaitable[None]]


class AnswerLost(PlatformError):
    """A frame went out but its answer did not come (a timeout, the link broke): it may or may
    not have been taken. Repeating a stream refresh is harmless, repeating a push is not."""


class WeComError(PlatformError):
    """WeCom answered one of our frames with a non-zero errcode."""

    def __init__(self, what: str, errcode: int, errmsg: str, *, retryable: bool = False) -> None:
        super().__init__(f"wecom {what}: errcode {errcode} {errmsg}".strip(), retryable=retryable)
        self.errcode = errcode


class Link:
    """One subscribed socket: our frames out, their answers matched by req_id."""

    _ids = itertools.count(1)

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.id = f"c{next(self._ids)}-{secrets.token_hex(3)}"  # replies to a req_id only on its link
        self._pending: dict[str, asyncio.Future[wf.Frame]] = {}
        self._turns: dict[str, asyncio.Lock] = {}  # one frame in flight per req_id
        self.closed = False

    async def request(self, frame: wf.Frame, timeout: float = ACK_TIMEOUT) -> wf.Frame:
        """Send a frame and wait for its answer; raises `WeComError` for a non-zero errcode
        (`Throttled` for WeCom's frequency limit), `PlatformError` when the link is gone or
        nothing answered in `timeout` seconds (which proves nothing about the frame's fate)."""
        rid, cmd = frame.req_id, frame.cmd
        turn = self._turns.setdefault(rid, asyncio.Lock())
        try:
            async with turn:
                if self.closed:
                    raise PlatformError(f"wecom {cmd}: the connection is gone")
                future: asyncio.Future[wf.Frame] = asyncio.get_running_loop().create_future()
                self._pending[rid] = future
                try:
                    await self.ws.send_str(frame.encode())
                    async with asyncio.timeout(timeout):
                        answer = await future
                except TimeoutError:
                    raise AnswerLost(f"wecom {cmd}: no answer within {timeout:g} s") from None
                except (ConnectionError, aiohttp.ClientError) as e:
                    raise AnswerLost(f"wecom {cmd}: {e}") from None
                finally:
                    self._pending.pop(rid, None)
        finally:
            if not turn.locked():  # nobody else waits to send on this req_id
                self._turns.pop(rid, None)
        if not answer.ok:
            code = answer.errcode if answer.errcode is not None else -1
            if code == wf.FREQUENCY_LIMIT:
                raise Throttled(f"wecom {cmd}: errcode {code} {answer.errmsg}", retry_after=FREQUENCY_WAIT)
            raise WeComError(cmd, code, answer.errmsg)
        return answer

    def answered(self, frame: wf.Frame) -> bool:
        """An answer frame for one of ours: handed to its waiter. False when nobody waits."""
        future = self._pending.get(frame.req_id)
        if future is None or future.done():
            return False
        future.set_result(frame)
        return True

    def close(self, why: str) -> None:
        self.closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError(why))
        self._pending.clear()


class SubscribeBackoff(Backoff):
    """Reconnect delays from the config; after a rate-limit answer the next one is the cap."""

    def __init__(self, first: float, cap: float) -> None:
        super().__init__(first=first, cap=cap)
        self._throttled = False

    def throttled(self) -> None:
        self._throttled = True

    def next(self) -> float:
        if self._throttled:
            self._throttled = False
            self.attempt += 1
            return self.cap
        return super().next()


class WeComWsClient:
    def __init__(
        self,
        config: Callable[[], WeComConfig],
        http: aiohttp.ClientSession,
        on_message: MessageHandler,
        on_event: EventHandler,
        holder: ConnectionHolder,
        report: Report,
        linked: asyncio.Event,
    ) -> None:
        self._config = config  # read per session: a reload's new secret applies at the next subscribe
        self._http = http
        self._on_message = on_message
        self._on_event = on_event
        self._holder = holder
        self._report = report
        cfg = config()
        self.backoff = SubscribeBackoff(cfg.reconnect_delay, cfg.reconnect_cap)
        self.link: Link | None = None
        self.linked = linked  # set while `link` is subscribed
        self._intake: OrderedIntake | None = None

    async def settled(self) -> None:
        if self._intake is not None:
            await self._intake.wait_idle()

    async def session(self, connected: Callable[[], None]) -> None:
        """One connection, served until it fails (raises) — see `ConnectionLoop`."""
        await self._holder.acquire(self._report)
        try:
            await self._connect_and_serve(connected)
        except asyncio.CancelledError:
            await self._holder.release()  # shutdown or an admin's reconnect: another may take over now
            raise

    async def _connect_and_serve(self, connected: Callable[[], None]) -> None:
        cfg = self._config()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                ws = await self._http.ws_connect(
                    cfg.ws_url,
                    autoping=True,  # the server's websocket pings; our heartbeat is the ping frame
                    heartbeat=None,
                    max_msg_size=MAX_FRAME_BYTES,
                    timeout=WS_TIMEOUT,
                )
        except aiohttp.WSServerHandshakeError as e:
            raise PlatformError(f"wecom websocket handshake refused: HTTP {e.status}") from None
        if not await self._holder.renew():  # it may have lapsed while connecting: never kick its new holder
            await ws.close()
            raise LeaseLost("another instance took over this bot's connection lease")
        link = Link(ws)
        renewer = asyncio.create_task(self._hold(ws), name="wecom:lease")
        try:
            async with ws, OrderedIntake() as intake:
                self._intake = intake
                reader = asyncio.create_task(self._read(ws, link, intake), name="wecom:read")
                try:
                    await self._subscribe(link, cfg)
                    self.link = link
                    self.linked.set()
                    connected()
                    await self._heartbeat(link, cfg.ping_interval, reader)
                finally:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
        finally:
            self.linked.clear()
            self.link = None
            link.close("the connection ended")
            lost = renewer.done()
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            if lost:
                raise LeaseLost("another instance took over this bot's connection lease")

    async def _hold(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Renew the connection lease while connected; once another instance has it, close the
        socket (the session then ends, and this instance stands by)."""
        await self._holder.renew_until_lost()
        log.warning("connection lease lost to another instance, closing", extra={"platform": "wecom"})
        await ws.close()

    async def _subscribe(self, link: Link, cfg: WeComConfig) -> None:
        try:
            await link.request(wf.subscribe(cfg.bot_id, cfg.secret), timeout=SUBSCRIBE_TIMEOUT)
        except Throttled as e:
            self.backoff.throttled()
            raise PlatformError(f"{e}: subscribing too often, next try in {self.backoff.cap:g} s") from None
        except WeComError as e:
            raise Refused(
                f"wecom refused the subscription ({e}); check [wecom] bot_id and secret "
                "(the long connection's own Secret)",
                cfg.kicked_retry,
            ) from None

    async def _heartbeat(self, link: Link, interval: float, reader: asyncio.Task[None]) -> None:
        """Ping every `interval` until the reader ends (its error is this session's end); a ping
        due while `wf.MISSED_PINGS` are unanswered means the link is dead."""
        unanswered = 0
        pings: set[asyncio.Task[None]] = set()

        async def ping() -> None:
            nonlocal unanswered
            try:
                await link.request(wf.ping(), timeout=interval * (wf.MISSED_PINGS + 1))
                unanswered = 0
            except PlatformError:
                pass  # counted as unanswered; the next ping decides

        try:
            while True:
                done, _ = await asyncio.wait((reader,), timeout=interval)
                if done:
                    reader.result()  # raises the reader's error
                    raise ConnectionError("the server closed the connection")
                if unanswered >= wf.MISSED_PINGS:
                    raise StaleConnection(f"{unanswered} pings unanswered ({interval:g} s apart)")
                unanswered += 1
                task = asyncio.create_task(ping())
                pings.add(task)
                task.add_done_callback(pings.discard)
        finally:
            for task in pings:
                task.cancel()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, link: Link, intake: OrderedIntake) -> None:
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                try:
                    frame = wf.decode(msg.data)
                except wf.FrameError as e:
                    log.warning("unreadable frame dropped: %s", e, extra={"platform": "wecom"})
                    continue
                await self._on_frame(frame, link, intake)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                link.close("closed")
                raise ConnectionError(f"server closed the connection (code {ws.close_code})")
            elif msg.type is WSMsgType.ERROR:
                link.close("error")
                raise ConnectionError(f"websocket error: {ws.exception()}")

    async def _on_frame(self, frame: wf.Frame, link: Link, intake: OrderedIntake) -> None:
        if frame.is_ack:
            if not link.answered(frame):
                log.debug("answer nobody waits for", extra={"platform": "wecom", "req_id": frame.req_id})
            return
        delivery = Delivery(frame.body or {}, frame.req_id, link.id, frame.cmd)
        if frame.cmd == MESSAGE:
            verdict = await self._on_message(delivery)
            await intake.handle(verdict, _unacknowledged(delivery))
        elif frame.cmd == EVENT:
            if event_type(delivery.body) == wf.DISCONNECTED_EVENT:
                await self._kicked(link)
            await intake.put(f"event:{frame.req_id}", lambda: self._on_event(delivery, link))
        else:
            log.info("frame of unknown cmd ignored", extra={"platform": "wecom", "cmd": frame.cmd[:40]})

    async def _kicked(self, link: Link) -> None:
        link.close("another connection took over")
        if not await self._holder.kicked():
            raise LeaseLost("another instance of this gateway took over this bot's connection")
        cfg = self._config()
        raise Refused(
            "another connection took this bot over (WeCom allows one per bot): not reconnecting "
            f"for {cfg.kicked_retry:g} s; stop the other connection, or press Reconnect to take it back",
            cfg.kicked_retry,
        )


def _unacknowledged(delivery: Delivery) -> Callable[[Admission], Awaitable[None]]:
    """WeCom takes no acknowledgement of a callback and delivers nothing again: one that was not
    accepted is said loudly."""

    async def respond(admission: Admission) -> None:
        if not admission.acknowledge:
            log.error(
                "message not accepted (%s); WeCom does not deliver it again",
                admission.value,
                extra={"platform": "wecom", "msgid": as_str(delivery.body.get("msgid"))},
            )

    return respond
