"""`GET`/`POST /wecom/webhook`: the AI bot's callback mode (设置接收消息回调地址), beside or instead
of the long connection, on the shared webhook pattern (`handlers.webhook`).

* `GET ?msg_signature&timestamp&nonce&echostr`: the URL check when the URL is saved in the admin
  console. The signature is checked, and the decrypted `echostr` is the whole answer (text/plain).
* `POST ?msg_signature&timestamp&nonce`, body `{"encrypt": …}`: the signature (SHA-1 over the
  sorted token, timestamp, nonce and encrypt) is checked before anything is decrypted; a
  timestamp further than `max(1 h, max_message_age)` from now is refused too (a replayed
  capture). Every refusal is the same 401 JSON (`Refusals`), never a 5xx.
* The plaintext is a callback body (`handlers.wecom.parse`):
  - a message: admitted like every other platform's (dedup on msgid, the durable inbox) and
    answered with the first frame of a stream (`finish = false`), whose id is made from the msgid,
    so a repeated delivery is answered with the same stream;
  - a stream refresh poll (`msgtype = "stream"`): answered with the answer's text as it is now,
    after waiting up to `POLL_WAIT` for it to change (`stream.Poll`); `finish = true` once it is
    complete, and for a stream this instance does not know (so WeCom stops polling);
  - `enter_chat`: the welcome, as a text reply; other events: an empty 200.
  Replies are encrypted JSON (`{"encrypt", "msgsignature", "timestamp", "nonce"}`, the nonce of
  the callback URL), sent as text/plain as WeCom's own samples do.
The token and key are read from the adapter's config per request: a reload's new ones apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from gateway.admission import Admission
from gateway.config import WeComConfig
from gateway.jsonvalues import as_dict, as_str
from gateway.keys import CONFIG

from ..http import json_error
from ..webhook import Refusals, Webhook, read_capped
from . import frame as wf
from .crypto import CallbackCrypto, CryptoError
from .parse import MESSAGE, Delivery, event_type
from .render import stream, text
from .stream import poll_stream_id

if TYPE_CHECKING:
    from .adapter import WeComAdapter

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
MAX_SKEW = 3600.0  # seconds, as the other platforms' webhooks allow
POLL_WAIT = 0.5  # seconds a refresh poll waits for new text before it is answered with the same
PLACEHOLDER = "…"  # a stream's first frame must not be empty


def _crypto(cfg: WeComConfig) -> CallbackCrypto:
    return CallbackCrypto.create(cfg.token, cfg.encoding_aes_key)  # receiveid "": an AI bot's


def _signature(request: web.Request) -> str:
    # WeCom names it msg_signature; some of its callbacks were seen with `signature`.
    query = request.query
    return query.get("msg_signature") or query.get("msgsignature") or query.get("signature") or ""


@dataclass(frozen=True, slots=True)
class WeComWebhook(Webhook):
    """The callback route of one bot; `handle` answers POSTs, `verify` the URL check (GET)."""

    bot: WeComAdapter  # `adapter`, with what the WeCom routes need of it
    refuse: Refusals

    def _fresh(self, timestamp: str) -> bool:
        window = max(MAX_SKEW, self.bot.cfg.max_message_age)
        return timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12 and (
            abs(time.time() - int(timestamp)) <= window
        )

    async def verify(self, request: web.Request) -> web.Response:
        q = request.query
        timestamp, nonce, echostr = q.get("timestamp", ""), q.get("nonce", ""), q.get("echostr", "")
        if not echostr:
            return self.refuse("URL check without echostr")
        try:
            plain = _crypto(self.bot.cfg).verify_url(_signature(request), timestamp, nonce, echostr)
        except CryptoError as e:
            return self.refuse(f"URL check: {e}")
        return web.Response(text=plain, content_type="text/plain")

    async def handle(self, request: web.Request) -> web.Response:
        cfg = self.bot.cfg
        limit = min(self.max_body, request.app[CONFIG].server.max_body_bytes)
        raw = await read_capped(request, limit)
        if raw is None:
            return json_error(413, "request body too large", limit=limit)
        q = request.query
        timestamp, nonce = q.get("timestamp", ""), q.get("nonce", "")
        try:
            crypto = _crypto(cfg)
            plain = crypto.open(_signature(request), timestamp, nonce, raw)
        except CryptoError as e:
            return self.refuse(str(e))
        if not self._fresh(timestamp):
            return self.refuse("timestamp too old or in the future")
        try:
            body = orjson.loads(plain)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return json_error(400, "the decrypted callback is not a JSON object")

        def sealed(reply: dict[str, object]) -> web.Response:
            envelope = crypto.seal(orjson.dumps(reply), nonce, int(time.time()))
            return web.Response(body=orjson.dumps(envelope), content_type="text/plain", charset="utf-8")

        if body.get("msgtype") == "stream":
            return sealed(await self._refresh(body))
        if body.get("msgtype") == "event":
            if event_type(body) == wf.ENTER_CHAT:
                words = await self.bot.welcome_words(body)
                if words:
                    return sealed(text(words))
            return web.Response()
        delivery = Delivery(body, cmd=MESSAGE)
        stream_id = poll_stream_id(str(body.get("msgid", "")))
        known = self.bot.polls.get(stream_id) is not None  # a repeated delivery of one answered here
        poll = self.bot.polls.open(stream_id)  # before admission: the answer may come at once
        if not known:  # other instances answer polls for it too (before the answer can write)
            await self.bot.polls.publish(poll)
        admission = await self.adapter.admit(delivery.to_dict(), "webhook")
        if admission is Admission.MALFORMED:
            return json_error(400, "not a bot message: its fields are missing or malformed")
        if not admission.acknowledge:
            return json_error(503, f"not accepted ({admission.value}), retry later")
        if admission is Admission.DROPPED or (admission is Admission.DUPLICATE and not known):
            # Nothing will be answered here (dropped, or answered through the long connection or
            # by another instance): no stream to poll.
            self.bot.polls.forget(stream_id)
            return web.Response()
        poll.served = poll.text or PLACEHOLDER
        return sealed(stream(stream_id, poll.served, poll.finished))

    async def _refresh(self, body: dict[str, object]) -> dict[str, object]:
        stream_id = as_str(as_dict(body.get("stream")).get("id"))
        poll = self.bot.polls.get(stream_id)
        if poll is None or not (poll.text or poll.finished):
            # Not written here (yet): on a shared store another instance may be answering it.
            remote = await self.bot.polls.remote(stream_id)
            if remote is not None:
                return stream(stream_id, remote.text or PLACEHOLDER, remote.finished)
        if poll is None:  # nobody's: stop the polling
            return stream(stream_id, PLACEHOLDER, True)
        if not poll.finished and poll.text == poll.served:
            changed = poll.changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_WAIT):
                    await changed.wait()
        poll.served = poll.text or PLACEHOLDER
        return stream(stream_id, poll.served, poll.finished)


def webhook(adapter: WeComAdapter) -> WeComWebhook:
    # `open` and `accepted` of the shared pattern are not used: `handle` answers every request itself.
    return WeComWebhook(adapter, lambda request, raw: None, web.Response, MAX_BODY, adapter, Refusals("wecom"))
