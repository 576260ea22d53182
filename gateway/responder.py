"""What happens to one accepted message: commands, rate limit, context, cache, model, reply."""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Mapping
from contextlib import aclosing

import orjson

from .channel import Channel, ReplyStream
from .config import Config
from .errors import ModelError, PlatformError, StoreError
from .messages import Attachment, InboundMessage, Reply, ReplyKind
from .metrics import Metrics, Outcome
from .model import Completion, Message, ModelClient
from .store import Store, Turn

log = logging.getLogger(__name__)

HELP = (
    "I am an AI assistant. Just write your question; in groups, @mention me.\n\n"
    "- `/reset` forgets this conversation\n"
    "- `/help` shows this message"
)
RESET_DONE = "Done: I forgot this conversation. Let's start fresh."
GREETING = "Hi! What can I do for you? (Send `/help` for what I understand.)"
RATE_LIMITED = "You are sending messages faster than I can answer. Please wait a minute."
NO_VISION = "I can't look at images with the current model; please describe it in words."
MODEL_DOWN = (
    "Sorry, the AI model is not answering right now ({reason}). Please try again later. "
    "(ref {request_id})"
)
IMAGE_NOTE = "(I can't look at images with the current model, so I only read your text.)\n\n"
EMPTY_ANSWER = (
    "Sorry, the AI model returned an empty answer. Please rephrase or try again. (ref {request_id})"
)


class Responder:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        model: ModelClient,
        channels: Mapping[str, Channel],
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self._store = store
        self._model = model
        self._channels = channels
        self._metrics = metrics
        # Streams cut off mid-answer (deadline, failure), by request id: the dispatcher's notice
        # then finishes the stream instead of arriving as a second message next to a stuck card.
        # Only streams cut off by shutdown stay here, and they go with the process.
        self._interrupted: dict[str, ReplyStream] = {}

    @property
    def model(self) -> ModelClient:
        return self._model

    def reconfigure(self, cfg: Config, model: ModelClient) -> None:
        """Use a reloaded config and model client from the next message on (calls in flight
        finish with the old ones)."""
        self.cfg = cfg
        self._model = model

    async def notice(
        self, message: InboundMessage, text: str, outcome: Outcome = Outcome.NOTICE
    ) -> None:
        stream = self._interrupted.pop(message.request_id, None)
        try:
            if stream is not None:
                await self._finish(stream, message, text, outcome)
            else:
                await self._send(Reply(message, text, ReplyKind.NOTICE), outcome)
        except Exception:
            log.exception("notice could not be delivered", extra=_fields(message))

    async def handle(self, message: InboundMessage, ready_at: float) -> None:
        text = message.text.strip()
        command = text.split(maxsplit=1)[0].lower() if text.startswith("/") else ""
        if message.unsupported:
            await self._send(Reply(message, message.unsupported, ReplyKind.NOTICE), Outcome.NOTICE)
            return
        if command == "/help":
            await self._send(Reply(message, HELP, ReplyKind.NOTICE), Outcome.NOTICE)
            return
        if command == "/reset":
            await self._store.reset(message.conversation_key)
            await self._send(Reply(message, RESET_DONE, ReplyKind.NOTICE), Outcome.NOTICE)
            return
        if not await self._within_rate_limit(message):
            return
        images = [a for a in message.attachments if a.kind == "image"]
        if not text and not images:
            await self._send(Reply(message, GREETING, ReplyKind.NOTICE), Outcome.NOTICE)
            return
        if images and not self.cfg.model.vision and not text:
            await self._send(Reply(message, NO_VISION, ReplyKind.NOTICE), Outcome.NOTICE)
            return
        await self._answer(message, ready_at, text, images if self.cfg.model.vision else [])

    async def _within_rate_limit(self, message: InboundMessage) -> bool:
        limit = self.cfg.limits.per_user_per_minute
        if limit <= 0 or await self._store.take_token(f"rate:{message.user_key}", limit):
            return True
        log.info("rate limited", extra=_fields(message))
        # One notice per minute per user, not one per message.
        if await self._store.claim(f"rate-notice:{message.user_key}", 60.0):
            await self._send(Reply(message, RATE_LIMITED, ReplyKind.NOTICE), Outcome.NOTICE)
        return False

    async def _answer(
        self, message: InboundMessage, ready_at: float, text: str, images: list[Attachment]
    ) -> None:
        history = await self._store.context(message.conversation_key)
        messages: list[Message] = [{"role": "system", "content": self.cfg.model.system_prompt}]
        messages += [{"role": t.role, "content": t.content} for t in history]
        messages.append({"role": "user", "content": await self._user_content(message, text, images)})

        unseen_images = not images and any(a.kind == "image" for a in message.attachments)
        prefix = IMAGE_NOTE if unseen_images else ""
        cache_key = self._cache_key(messages) if self.cfg.cache.enabled and not images else None
        answer = await self._cached(cache_key)
        cached = answer is not None
        completion = Completion(model=self._model.name)
        if answer is not None:
            await self._send(Reply(message, prefix + answer), Outcome.OK)
        else:
            try:
                answer = await self._stream_answer(message, messages, completion, prefix)
            except _Answered:
                return
        self._record(message, ready_at, completion, cached)
        await self._remember(message, None if cached else cache_key, text, answer)

    async def _remember(
        self, message: InboundMessage, cache_key: str | None, text: str, answer: str
    ) -> None:
        """Cache the answer and extend the context. The user already has the answer, so a store
        failure here costs only memory: log it, never apologise for a delivered answer."""
        try:
            if cache_key:
                await self._store.cache_put(cache_key, answer, self.cfg.cache.ttl)
            await self._store.append_turns(
                message.conversation_key,
                [Turn("user", text or "(image)"), Turn("assistant", answer)],
                self.cfg.context.max_turns,
                self.cfg.context.max_chars,
                self.cfg.context.idle_ttl,
            )
        except StoreError as e:
            log.warning("answer delivered but not remembered: %s", e, extra=_fields(message))

    def _record(
        self, message: InboundMessage, ready_at: float, completion: Completion, cached: bool
    ) -> None:
        """Metrics and the one summary log line of an answered message."""
        elapsed = max(0.0, time.time() - ready_at)
        requested, last_byte = completion.requested_at, completion.last_byte_at
        if requested is None or last_byte is None:  # cache hit: no model time at all
            model_s = None
            overhead = elapsed
        else:
            # Overhead: ready -> model request sent, plus model's last byte -> reply delivered.
            model_s = last_byte - requested
            overhead = max(0.0, elapsed - model_s)
        self._metrics.gateway_overhead(overhead)
        self._metrics.model_usage(completion.usage.prompt_tokens, completion.usage.completion_tokens)
        log.info(
            "answered",
            extra={
                **_fields(message),
                "platform": message.platform,
                "message_id": message.message_id,
                "latency_ms": round((time.time() - message.created_at) * 1000, 1),
                "overhead_ms": round(overhead * 1000, 2),
                "model_ms": None if model_s is None else round(model_s * 1000, 1),
                "model_version": completion.model,
                "cached": cached,
                "prompt_tokens": completion.usage.prompt_tokens,
                "completion_tokens": completion.usage.completion_tokens,
            },
        )

    async def _stream_answer(
        self, message: InboundMessage, messages: list[Message], completion: Completion, prefix: str
    ) -> str:
        channel = self._channels[message.platform]
        stream = await channel.open_stream(message)
        parts: list[str] = []
        try:
            # aclosing: if delivery fails mid-answer, the model's HTTP response is released now,
            # not whenever the abandoned generator is garbage-collected.
            async with aclosing(self._model.stream(messages, completion)) as deltas:
                async for delta in deltas:
                    parts.append(delta)
                    if stream is not None:
                        await stream.update(prefix + "".join(parts))
        except ModelError as e:
            log.error("model failed: %s", e, extra={**_fields(message), "reason": e.reason})
            reason = e.reason.replace("_", " ")
            notice = MODEL_DOWN.format(reason=reason, request_id=message.request_id)
            await self._fail(message, stream, notice)
            raise _Answered from e
        except BaseException:
            if stream is not None:
                self._interrupted[message.request_id] = stream
            raise
        answer = "".join(parts).strip()
        if not answer:
            # Not cached and not kept as context: asking again may well work.
            log.warning("model returned an empty answer", extra=_fields(message))
            self._metrics.model_errors.labels("empty").inc()
            await self._fail(message, stream, EMPTY_ANSWER.format(request_id=message.request_id))
            raise _Answered
        if stream is not None:
            await self._finish(stream, message, prefix + answer, Outcome.OK)
        else:
            await self._send(Reply(message, prefix + answer), Outcome.OK)
        return answer

    async def _fail(self, message: InboundMessage, stream: ReplyStream | None, notice: str) -> None:
        """Tell the user the answer failed. An open stream (a card already shown) gets the notice
        as its final text, so the user sees one message, not a stuck card plus a second one."""
        if stream is not None:
            await self._finish(stream, message, notice, Outcome.MODEL_ERROR)
        else:
            await self._send(Reply(message, notice, ReplyKind.NOTICE), Outcome.MODEL_ERROR)

    async def _user_content(
        self, message: InboundMessage, text: str, images: list[Attachment]
    ) -> object:
        if not images:
            return text
        parts: list[dict[str, object]] = [{"type": "text", "text": text or "What is in this image?"}]
        channel = self._channels[message.platform]
        for attachment in images:
            data, mime = await channel.fetch(message, attachment)
            url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        return parts

    def _cache_key(self, messages: list[Message]) -> str:
        # The endpoint is part of the key: after switching providers (same model name), answers
        # of the old one must not be served.
        endpoint = self.cfg.model.base_url
        digest = hashlib.sha256(orjson.dumps([endpoint, self._model.name, messages])).hexdigest()
        return f"cache:{digest}"

    async def _cached(self, key: str | None) -> str | None:
        if key is None:
            return None
        try:
            value = await self._store.cache_get(key)
        except StoreError:
            value = None
        self._metrics.cache_lookup(value is not None)
        return value

    async def _send(self, reply: Reply, outcome: Outcome) -> None:
        channel = self._channels[reply.to.platform]
        try:
            await channel.send(reply)
        except PlatformError:
            self._metrics.reply(reply.to.platform, Outcome.FAILED)
            raise
        self._metrics.reply(reply.to.platform, outcome)

    async def _finish(
        self, stream: ReplyStream, message: InboundMessage, text: str, outcome: Outcome
    ) -> None:
        try:
            await stream.finish(text)
        except PlatformError:
            self._metrics.reply(message.platform, Outcome.FAILED)
            raise
        self._metrics.reply(message.platform, outcome)


class _Answered(Exception):
    """The user already got a notice instead of an answer; nothing more to record."""


def _fields(message: InboundMessage) -> dict[str, object]:
    return {"request_id": message.request_id, "user_id": message.user_key}
