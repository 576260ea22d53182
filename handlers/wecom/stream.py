"""Answers as WeCom streams (docs/wecom.md "Replies").

Long connection (`LinkStream`): the answer to a callback is `aibot_respond_msg` stream frames with
the callback's req_id, on the connection it came on: one `stream.id`, each frame the whole text so
far (a refresh replaces what the user sees), `finish = true` at the end. Refreshes go out at most
every `stream_interval` and one at a time (each after WeCom answered the previous one). A text
that outgrows one message (20,480 bytes) finishes that stream and continues in a new one. WeCom
takes refreshes for `stream_life` seconds from a stream's first frame: shortly before, the stream
is finished with what it has, and the rest of the answer follows as proactive messages
(`aibot_send_msg`), as it does when the req_id is gone (a reconnect, another instance's
connection) or WeCom refuses it (846605, 846608). The user gets the whole answer once.

Callback mode (`PolledStream`): WeCom asks for the stream itself, polling the callback URL with
the stream's id; the webhook answers each poll with the text as it is now (`Poll`). After the
stream life, what is left goes to the callback's `response_url`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

from gateway.errors import PlatformError, StoreError
from gateway.jsonvalues import as_dict, as_str
from gateway.messages import InboundMessage
from gateway.metrics import Metrics
from gateway.retry import retry_transient
from gateway.store import Store

from . import frame as wf
from .api import WeComApi
from .render import fit
from .ws import Link, WeComError

log = logging.getLogger(__name__)

# Finish a stream this long before WeCom stops taking its refreshes (a frame in flight, clocks).
LIFE_MARGIN = 15.0
GONE = (wf.INVALID_REQ_ID, wf.STREAM_EXPIRED)  # the stream takes no more frames: push the rest

# Sends text that no stream can carry any more, as proactive messages.
Deliver = Callable[[str], Awaitable[None]]


def life_margin(life: float) -> float:
    return min(LIFE_MARGIN, life / 6)


def rest_of(text: str, shown: str) -> str:
    """What of `text` the user has not seen, when `shown` went out already. Answers grow at the
    end; one that changed what was shown goes out whole (twice rather than lost)."""
    return text[len(shown) :] if text.startswith(shown) else text


class LinkStream:
    """One answer on the long connection (a `ReplyStream`)."""

    def __init__(
        self,
        api: WeComApi,
        link: Link,
        message: InboundMessage,
        interval: float,
        life: float,
        metrics: Metrics,
        deliver: Deliver,
    ) -> None:
        self._api = api
        self._link = link
        self._req_id = str(message.reply_handle.get("req_id", ""))
        self._conversation = message.conversation_id
        self._request_id = message.request_id
        self._interval = interval
        self._life = life
        self._metrics = metrics
        self._deliver = deliver
        self._base = secrets.token_hex(8)
        self._segments = 0
        self._done = ""  # the text of finished streams (the answer's beginning)
        self._shown = ""  # what the open stream shows; "" while none is open
        self._opened_at = 0.0  # monotonic, the open stream's first frame
        self._last_push = 0.0
        self._gone = False  # the req_id takes no more frames
        self._lock = asyncio.Lock()
        self._closer: asyncio.Task[None] | None = None

    # -- ReplyStream -------------------------------------------------------------------------------
    def wants_update(self) -> bool:
        if self._gone or self._lock.locked():
            return False
        return not self._shown or time.monotonic() - self._last_push >= self._interval

    def fold(self, reasoning: str) -> None:
        """WeCom shows no thinking apart from the answer: ignored."""

    async def update(self, text: str) -> None:
        if not self.wants_update():
            return
        async with self._lock:
            await self._show(text, final=False)

    async def finish(self, text: str) -> None:
        async with self._lock:
            if self._closer is not None:
                self._closer.cancel()
            await self._show(text, final=True)
            rest = rest_of(text, self._done)
            if self._gone and rest.strip():
                await self._deliver(rest)

    # -- the streams -------------------------------------------------------------------------------
    async def _show(self, text: str, final: bool) -> None:
        """Put `text` into streams: finished ones for every full piece, the open one for the last
        (finished too when `final`). Once the req_id is gone, nothing more is sent here."""
        if self._gone:
            return
        pieces = fit(rest_of(text, self._done))
        if not pieces:
            pieces = [""]
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            if last and not final and piece == self._shown:
                return
            finish = final or not last
            if not await self._frame(piece, finish):
                return

    async def _frame(self, content: str, finish: bool) -> bool:
        """Send one frame of the open stream (opening one first); False once the req_id is gone."""
        if not self._shown:
            await self._api.turn(self._conversation)  # a new stream is a new message
            self._segments += 1
            self._opened_at = time.monotonic()
        stream_id = f"{self._base}-{self._segments}"
        frame = wf.stream_reply(self._req_id, stream_id, content or " ", finish)
        try:
            # A refresh repeats the whole text: sending it again cannot show anything twice.
            await retry_transient(
                lambda: self._api.respond(self._link, frame),
                platform="wecom",
                what="stream frame",
                metrics=self._metrics,
            )
        except PlatformError as e:
            gone = isinstance(e, WeComError) and e.errcode in GONE
            log.warning(
                "stream ended, the rest of the answer follows as messages: %s",
                e,
                extra={"platform": "wecom", "request_id": self._request_id, "expired": gone},
            )
            self._gone = True
            return False
        self._last_push = time.monotonic()
        if finish:
            self._done += content
            self._shown = ""
            if self._closer is not None:
                self._closer.cancel()
                self._closer = None
        else:
            first = not self._shown
            self._shown = content
            if first:
                self._closer = asyncio.create_task(self._close_in_time(), name="wecom:stream-life")
        return True

    async def _close_in_time(self) -> None:
        """Shortly before the open stream's life ends, finish it with what it shows; the rest of
        the answer then follows as messages."""
        await asyncio.sleep(max(0.0, self._opened_at + self._life - life_margin(self._life) - time.monotonic()))
        async with self._lock:
            if not self._shown or self._gone:
                return
            log.info(
                "stream life nearly over, finished; the rest follows as messages",
                extra={"platform": "wecom", "request_id": self._request_id},
            )
            self._closer = None  # this task: finishing must not cancel itself
            shown = self._shown
            if await self._frame(shown, finish=True):
                self._gone = True


@dataclass
class Poll:
    """A callback-mode stream as the webhook answers WeCom's refresh polls about it."""

    stream_id: str
    opened_at: float = field(default_factory=time.time)  # wall clock: instances compare it
    text: str = ""  # what the next poll is answered with
    finished: bool = False
    served: str = ""  # what the last poll was answered with: what the user sees
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def set(self, text: str, finished: bool) -> None:
        self.text, self.finished = text, finished
        self.changed.set()
        self.changed = asyncio.Event()


class Polls:
    """The open callback-mode streams of one bot, by stream id (bounded: old ones are forgotten).

    On a shared store WeCom's polls may reach any instance, not the one writing the answer: each
    change is also put in the store (`wecom-poll:<bot>:<stream id>`, kept for the stream life),
    where the other instances read it (`remote`). A store failure costs only that."""

    def __init__(self, bot: str, life: float, keep: int = 1024) -> None:
        self._bot = bot
        self._life = life
        self._polls: OrderedDict[str, Poll] = OrderedDict()
        self._keep = keep
        self.store: Store | None = None  # a shared store, once the app runs

    def open(self, stream_id: str, opened_at: float | None = None) -> Poll:
        poll = self._polls.get(stream_id)
        if poll is None:
            poll = self._polls[stream_id] = Poll(stream_id, opened_at or time.time())
            while len(self._polls) > self._keep:
                self._polls.popitem(last=False)
        return poll

    def get(self, stream_id: str) -> Poll | None:
        return self._polls.get(stream_id)

    def forget(self, stream_id: str) -> None:
        self._polls.pop(stream_id, None)

    def _key(self, stream_id: str) -> str:
        return f"wecom-poll:{self._bot}:{stream_id}"

    async def publish(self, poll: Poll) -> None:
        if self.store is None:
            return
        value = orjson.dumps({"text": poll.text, "finished": poll.finished, "opened_at": poll.opened_at}).decode()
        try:
            await self.store.cache_put(self._key(poll.stream_id), value, self._life + 60.0)
        except StoreError as e:
            log.warning("stream text not shared through the store: %s", e, extra={"platform": "wecom"})

    async def remote(self, stream_id: str) -> Poll | None:
        """The stream as another instance last wrote it, if one does."""
        if self.store is None:
            return None
        try:
            raw = await self.store.cache_get(self._key(stream_id))
        except StoreError as e:
            log.warning("stream text not readable from the store: %s", e, extra={"platform": "wecom"})
            return None
        data = as_dict(orjson.loads(raw)) if raw else {}
        if not data:
            return None
        opened_at = data.get("opened_at")
        poll = Poll(stream_id, float(opened_at) if isinstance(opened_at, int | float) else time.time())
        poll.set(as_str(data.get("text")), data.get("finished") is True)
        return poll


def poll_stream_id(message_id: str) -> str:
    """The stream id of a callback's answer, the same for WeCom's repeated deliveries of it."""
    return f"m-{message_id}"[:64]


class PolledStream:
    """One answer in callback mode (a `ReplyStream`): the text goes into its `Poll`; after the
    stream life (counted from the callback) the rest goes to `deliver` (the response_url)."""

    def __init__(self, polls: Polls, poll: Poll, life: float, deliver: Deliver) -> None:
        self._polls = polls
        self._poll = poll
        self._life = life
        self._deliver = deliver

    def _expired(self) -> bool:
        return time.time() > self._poll.opened_at + self._life - life_margin(self._life)

    def wants_update(self) -> bool:
        return not self._poll.finished and not self._expired()

    def fold(self, reasoning: str) -> None:
        """WeCom shows no thinking apart from the answer: ignored."""

    async def update(self, text: str) -> None:
        if self.wants_update():
            self._poll.set(fit(text)[0] if text else "", finished=False)
            await self._polls.publish(self._poll)

    async def finish(self, text: str) -> None:
        pieces = fit(text) or [""]
        if not self._expired():
            self._poll.set(pieces[0], finished=True)
            rest = "".join(pieces[1:])
        else:  # WeCom stopped polling: what it showed last stays, the rest follows
            shown = self._poll.served or self._poll.text
            self._poll.set(shown, finished=True)
            rest = rest_of(text, shown)
        await self._polls.publish(self._poll)
        if rest.strip():
            await self._deliver(rest)
