"""The responder's steps before the answer: commands, rate limit, content preparation."""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod

from .exchange import Delivery, Exchange, Flow, fields, log
from .store import Store

HELP = (
    "I am an AI assistant. Just write your question; in groups, @mention me.\n\n"
    "- `/reset` forgets this conversation\n"
    "- `/help` shows this message"
)
RESET_DONE = "Done: I forgot this conversation. Let's start fresh."
GREETING = "Hi! What can I do for you? (Send `/help` for what I understand.)"
RATE_LIMITED = "You are sending messages faster than I can answer. Please wait a minute."
NO_VISION = "I can't look at images with the current model; please describe it in words."
IMAGE_NOTE = "(I can't look at images with the current model, so I only read your text.)\n\n"
IMAGE_QUESTION = "What is in this image?"  # asked for an image sent without text


# -- before anything else ------------------------------------------------------------------------
class Unsupported:
    """A message type the adapter cannot pass on: the notice it prepared."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    async def __call__(self, exchange: Exchange) -> Flow:
        if not exchange.message.unsupported:
            return Flow.CONTINUE
        await self._delivery.notify(exchange.message, exchange.message.unsupported)
        return Flow.DONE


class Command(ABC):
    """`/name`: answered with a notice instead of the model. One subclass per command."""

    name: str

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    async def __call__(self, exchange: Exchange) -> Flow:
        if exchange.command != self.name:
            return Flow.CONTINUE
        await self._delivery.notify(exchange.message, await self.run(exchange))
        return Flow.DONE

    @abstractmethod
    async def run(self, exchange: Exchange) -> str:
        """Do what the command does; returns the notice for the user."""


class Help(Command):
    name = "/help"

    async def run(self, exchange: Exchange) -> str:
        return HELP


class Reset(Command):
    name = "/reset"

    def __init__(self, delivery: Delivery, store: Store) -> None:
        super().__init__(delivery)
        self._store = store

    async def run(self, exchange: Exchange) -> str:
        await self._store.reset(exchange.message.conversation_key)
        return RESET_DONE


# -- limits ----------------------------------------------------------------------------------------
class RateLimit:
    """`limits.per_user_per_minute` messages per user; beyond it, one notice a minute, else silence."""

    def __init__(self, delivery: Delivery, store: Store) -> None:
        self._delivery = delivery
        self._store = store

    async def __call__(self, exchange: Exchange) -> Flow:
        message = exchange.message
        limit = exchange.cfg.limits.per_user_per_minute
        if limit <= 0 or await self._store.take_token(f"rate:{message.user_key}", limit):
            return Flow.CONTINUE
        log.info("rate limited", extra=fields(message))
        if await self._store.claim(f"rate-notice:{message.user_key}", 60.0):
            await self._delivery.notify(message, RATE_LIMITED)
        return Flow.DONE


# -- content preparation ---------------------------------------------------------------------------
class NothingToRead:
    """No text, and no image the model could look at: a greeting or a notice, not a model call."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    async def __call__(self, exchange: Exchange) -> Flow:
        if exchange.text:
            return Flow.CONTINUE
        if not exchange.images:
            await self._delivery.notify(exchange.message, GREETING)
            return Flow.DONE
        if not exchange.cfg.model.vision:
            await self._delivery.notify(exchange.message, NO_VISION)
            return Flow.DONE
        return Flow.CONTINUE


class History:
    """The conversation so far."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def __call__(self, exchange: Exchange) -> Flow:
        exchange.history = await self._store.context(exchange.message.conversation_key)
        return Flow.CONTINUE


class Images:
    """Images go to a vision model inline (downloaded now); otherwise the answer says it only read
    the text."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    async def __call__(self, exchange: Exchange) -> Flow:
        images = exchange.images
        if not images:
            return Flow.CONTINUE
        if not exchange.cfg.model.vision:
            exchange.prefix = IMAGE_NOTE
            return Flow.CONTINUE
        exchange.question = exchange.question or IMAGE_QUESTION
        channel = self._delivery.channel(exchange.message)
        for attachment in images:
            data, mime = await channel.fetch(exchange.message, attachment)
            url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
            exchange.parts.append({"type": "image_url", "image_url": {"url": url}})
        return Flow.CONTINUE


class Prompt:
    """The model's messages: system prompt, history, and the question with any other parts."""

    async def __call__(self, exchange: Exchange) -> Flow:
        content: object = exchange.question
        if exchange.parts:
            content = [{"type": "text", "text": exchange.question}, *exchange.parts]
        exchange.prompt = [
            {"role": "system", "content": exchange.cfg.model.system_prompt},
            *({"role": t.role, "content": t.content} for t in exchange.history),
            {"role": "user", "content": content},
        ]
        return Flow.CONTINUE
