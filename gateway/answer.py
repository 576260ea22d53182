"""The responder's steps from the answer on: the cache, the model, the summary, remembering."""

from __future__ import annotations

import asyncio
import hashlib
import time
import weakref
from contextlib import aclosing

import orjson

from .backends import Backend
from .channel import ReplyStream
from .draft import Draft
from .errors import ModelError, StoreError
from .exchange import Delivery, Exchange, Flow, fields, log
from .i18n import N_, translator
from .images_out import displayed, upload_ahead
from .messages import Reply, ReplyKind
from .metrics import Metrics, Outcome
from .reasoning import shown
from .sanitize import safe_markdown
from .stopping import STOPPED, STOPPED_MARK, Answers, Running
from .store import Store, Turn
from .working import Working

MODEL_DOWN = N_(
    "Sorry, the AI model is not answering right now ({reason}). Please try again later. (ref {request_id})"
)
EMPTY_ANSWER = N_("Sorry, the AI model returned an empty answer. Please rephrase or try again. (ref {request_id})")


class CachedAnswer:
    """The answer to an identical earlier request in the same conversation (`[cache]`): the same
    context and question, from the same model. Never another conversation's: a hit would tell one
    user what another asked. Prompts with images are not cached, nor answers of a backend that
    keeps the history itself: the same prompt there meets another context."""

    def __init__(self, delivery: Delivery, store: Store, metrics: Metrics) -> None:
        self._delivery = delivery
        self._store = store
        self._metrics = metrics

    async def __call__(self, exchange: Exchange) -> Flow:
        if not exchange.cfg.cache.enabled or exchange.parts or exchange.model.keeps_history:
            return Flow.CONTINUE
        exchange.cache_key = key = cache_key(exchange)
        try:
            answer = await self._store.cache_get(key)
        except StoreError:
            answer = None
        self._metrics.cache_lookup(answer is not None)
        if answer is not None:
            answer = safe(exchange, answer)
            await self._delivery.send(Reply(exchange.message, exchange.prefix + answer), Outcome.OK)
            exchange.answer, exchange.cached = answer, True
        return Flow.CONTINUE


def cache_key(exchange: Exchange) -> str:
    # The endpoint is part of the key: after switching providers (same model name), answers
    # of the old one must not be served. The conversation is too: see `CachedAnswer`.
    endpoint = exchange.cfg.model.base_url
    scope = exchange.message.conversation_key
    digest = hashlib.sha256(orjson.dumps([scope, endpoint, exchange.model.name, exchange.prompt])).hexdigest()
    return f"cache:{digest}"


def safe(exchange: Exchange, text: str) -> str:
    """Model text as it may be shown: no remote images, no @all (`gateway.sanitize`), no data URL
    and no image the platform cannot show by URL (`gateway.images_out.displayed`)."""
    hosts, message = exchange.cfg.content.image_hosts, exchange.message
    return displayed(safe_markdown(text, hosts), hosts, message.locale, message.platform)


class ModelAnswer:
    """Unless answered already: the model's answer, streamed into the channel's `ReplyStream`
    when it has one, else sent whole. A model failure or an empty answer gets a notice instead.

    The model's thinking (`gateway.draft`, `gateway.reasoning`) goes where `[model] reasoning`
    says: nowhere (`strip`); to a stream that shows it apart, a Feishu card's collapsed panel, and
    nowhere else (`fold`); quoted above the answer (`show`). It is never cached nor kept as context.
    """

    def __init__(self, delivery: Delivery, metrics: Metrics, answers: Answers | None = None) -> None:
        self._delivery = delivery
        self._metrics = metrics
        self._answers = answers or Answers()  # the answers being written, for /stop
        # Backends seen opening their answer inside a think block without the tag (`Draft.orphan`):
        # their next answers count undecided text as thinking, so it does not show while streaming.
        self._start_in_thought: weakref.WeakSet[Backend] = weakref.WeakSet()

    async def __call__(self, exchange: Exchange) -> Flow:
        if exchange.answer is not None:
            return Flow.CONTINUE
        message, prefix = exchange.message, exchange.prefix
        stream = await self._delivery.channel(message).open_stream(message)
        draft = Draft(exchange.model in self._start_in_thought)
        running: Running | None = None

        async def produce() -> None:
            # aclosing: if delivery fails mid-answer (or /stop cancels it), the model's HTTP
            # response is closed now, not whenever the abandoned generator is garbage-collected.
            async with aclosing(exchange.model.stream(exchange.request(), exchange.completion)) as deltas:
                async for delta in deltas:
                    draft.add(delta)
                    if stream is not None and stream.wants_update():
                        assert running is not None
                        running.busy = True
                        try:
                            await stream.update(prefix + self._visible(exchange, draft, stream))
                        finally:
                            running.busy = False
                        if running.stopped:  # /stop came during the update: taken now
                            return

        # The model is read in a task of its own, which /stop cancels (`gateway.stopping`).
        task = asyncio.ensure_future(produce())
        running = self._answers.start(message, task, exchange.cfg.chat.admins)
        # Without a card: a mark on the message and a "still working" notice (`gateway.working`).
        working = Working(self._delivery, message, exchange.cfg.chat.long_task_notice) if stream is None else None
        try:
            try:
                if working is not None:
                    await working.start()
                try:
                    await task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if not running.stopped or (current is not None and current.cancelling()):
                        raise  # cancelled from outside (deadline, shutdown), not by /stop
                if running.stopped:
                    return await self._stopped(exchange, draft, stream, working)
                if working is not None:
                    await working.settle()  # a notice being sent goes out before the answer
            except ModelError as e:
                log.error("model failed: %s", e, extra={**fields(message), "reason": e.reason})
                reason = e.reason.replace("_", " ")
                notice = translator(message.locale)(MODEL_DOWN, reason=reason, request_id=message.request_id)
                if working is not None:
                    await working.settle()
                await self._delivery.fail(message, stream, notice)
                return Flow.DONE
            except BaseException:
                task.cancel()
                if stream is not None:
                    self._delivery.cut_off(message, stream)
                raise
            finally:
                self._answers.end(running)
            return await self._deliver(exchange, draft, stream)
        finally:
            if working is not None:
                await working.end()

    async def _stopped(
        self, exchange: Exchange, draft: Draft, stream: ReplyStream | None, working: Working | None
    ) -> Flow:
        """/stop ended the answer: the backend is told, the user gets one text (what the card
        showed, marked stopped; else a short notice), and nothing is remembered or cached."""
        message = exchange.message
        try:
            await exchange.model.stop(exchange.completion)
        except Exception as e:  # the stream is closed anyway: the backend stops writing soon
            log.warning("backend stop failed: %s", e, extra=fields(message))
        if working is not None:
            await working.settle()
        t = translator(message.locale)
        partial = safe(exchange, draft.answer.strip())
        if stream is not None and partial:
            text = exchange.prefix + self._visible(exchange, draft, stream, partial) + "\n\n" + t(STOPPED_MARK)
            await self._delivery.finish(stream, message, text, Outcome.NOTICE)
        elif stream is not None:
            await self._delivery.finish(stream, message, t(STOPPED), Outcome.NOTICE)
        else:
            await self._delivery.send(Reply(message, t(STOPPED), ReplyKind.NOTICE), Outcome.NOTICE)
        return Flow.DONE

    async def _deliver(self, exchange: Exchange, draft: Draft, stream: ReplyStream | None) -> Flow:
        """The complete answer (or the empty-answer notice) to the user."""
        message, prefix = exchange.message, exchange.prefix
        draft.end()
        if draft.orphan:
            self._start_in_thought.add(exchange.model)
        answer = safe(exchange, draft.answer.strip())
        if not answer:
            # Not cached and not kept as context: asking again may well work.
            log.warning("model returned an empty answer", extra=fields(message))
            self._metrics.model_errors.labels("empty").inc()
            notice = translator(message.locale)(EMPTY_ANSWER, request_id=message.request_id)
            await self._delivery.fail(message, stream, notice)
            return Flow.DONE
        text = prefix + self._visible(exchange, draft, stream, answer)
        await upload_ahead(self._delivery.channel(message), exchange, draft.answer)  # shown inside it
        if stream is not None:
            await self._delivery.finish(stream, message, text, Outcome.OK)
        else:
            await self._delivery.send(Reply(message, text), Outcome.OK)
        exchange.answer, exchange.draft = answer, draft
        return Flow.CONTINUE

    @staticmethod
    def _visible(exchange: Exchange, draft: Draft, stream: ReplyStream | None, answer: str | None = None) -> str:
        """The reply's text (without the prefix) in the reasoning mode; hands the thinking to
        `stream` when folded."""
        mode = exchange.cfg.model.reasoning
        if answer is None:
            answer = safe(exchange, draft.answer)
        if mode == "show":
            return shown(safe(exchange, draft.reasoning), answer)
        if mode == "fold" and stream is not None:
            stream.fold(safe(exchange, draft.reasoning))
        return answer


class Summary:
    """Metrics and the one summary log line of an answered message."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def __call__(self, exchange: Exchange) -> Flow:
        message, completion = exchange.message, exchange.completion
        elapsed = max(0.0, time.time() - exchange.ready_at)
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
        # Billable calls so far: the answer is delivered, nothing after this step calls the platform.
        api_calls = exchange.api_calls.calls
        self._metrics.answer_api_calls(message.platform, api_calls)
        self._metrics.agent_answered(exchange.agent)
        log.info(
            "answered",
            extra={
                **fields(message),
                "platform": message.platform,
                "bot": message.bot,
                "agent_name": exchange.agent,
                "message_id": message.message_id,
                "latency_ms": round((time.time() - message.created_at) * 1000, 1),
                "overhead_ms": round(overhead * 1000, 2),
                "model_ms": None if model_s is None else round(model_s * 1000, 1),
                "model_version": completion.model,
                "cached": exchange.cached,
                "prompt_tokens": completion.usage.prompt_tokens,
                "completion_tokens": completion.usage.completion_tokens,
                "api_calls": api_calls,
            },
        )
        return Flow.CONTINUE


class Remember:
    """Cache the answer and extend the context: the turns, or for a backend that keeps the
    history itself, its conversation id (kept as long as the turns would be). The user already has
    the answer, so a store failure here costs only memory: log it, never apologise for a delivered
    answer."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def __call__(self, exchange: Exchange) -> Flow:
        answer, cfg = exchange.answer, exchange.cfg
        assert answer is not None, "the answer steps end the exchange unless they delivered one"
        try:
            if exchange.cache_key and not exchange.cached:
                await self._store.cache_put(exchange.cache_key, answer, cfg.cache.ttl)
            if exchange.model.keeps_history:
                if session := exchange.completion.session:
                    await self._store.set_backend_session(exchange.context_key, session, cfg.context.idle_ttl)
            else:
                await self._store.append_turns(
                    exchange.context_key,
                    [Turn("user", exchange.user_turn(exchange.text or "(image)")), Turn("assistant", answer)],
                    cfg.context.max_turns,
                    cfg.context.max_chars,
                    cfg.context.idle_ttl,
                )
        except StoreError as e:
            log.warning("answer delivered but not remembered: %s", e, extra=fields(exchange.message))
        return Flow.DONE
