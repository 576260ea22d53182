"""`/stop` (`/停止`): end the answer being written in this conversation (docs/chat.md "Commands").

The dispatcher answers a conversation's messages one at a time, so a `/stop` queued behind the answer
it means would run only once that answer is done. It is taken at intake instead
(`Dispatcher.submit`): `Answers.stop` finds the answer running in its conversation here (same bot,
same conversation key) and cancels its model call. That answer then ends itself (`ModelAnswer`):
the backend's HTTP response is closed, `Backend.stop` tells a backend with a stop API (Dify, Coze),
an open card ends with what it showed plus "(stopped)" (or one short "Stopped." when nothing was
shown yet), and nothing is remembered or cached. The `/stop` itself gets no reply then; with nothing
running it gets `NOTHING_TO_STOP`.

In a group, the answer belongs to the member who asked: they, or a `[chat] admins` member, may stop
it; anyone else is told `NOT_YOURS`. With several instances sharing a store, a `/stop` is seen only
by the instance that received it: an answer another instance is writing runs on (documented).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum

from .exchange import Delivery, Exchange, Flow
from .i18n import N_, translator
from .messages import ConversationKind, InboundMessage

log = logging.getLogger(__name__)

STOP = "/stop"
STOP_ALIASES = ("/停止",)
# Ends a stopped answer's partial text (after a blank line).
STOPPED_MARK = N_("(stopped)")
STOPPED = N_("Stopped.")  # a stopped answer that had shown nothing yet
NOTHING_TO_STOP = N_("There is no answer in progress to stop.")
NOT_YOURS = N_("Only the member who asked (or an admin) can stop this answer.")
# /help in a group: after the command list (a blank line between).
GROUP_HELP = N_(
    "In this group, @mention me at the start of your message so I see it, e.g. \"@bot your question\". "
    "`/stop` stops the answer to your own question."
)


def is_stop(text: str) -> bool:
    """Is `text` the /stop command (or its alias), with anything after it?"""
    words = text.strip().split(maxsplit=1)
    return bool(words) and words[0].lower() in (STOP, *STOP_ALIASES)


def group_help(exchange: Exchange) -> str:
    """What /help adds in a group (how to @mention the bot); "" in a DM."""
    if exchange.message.conversation_kind is not ConversationKind.GROUP:
        return ""
    return "\n\n" + translator(exchange.message.locale)(GROUP_HELP)


class Stopped(Enum):
    STOPPED = "stopped"  # the running answer will end itself, marked stopped
    NOTHING = "nothing"  # no answer is being written in the conversation here
    NOT_YOURS = "not_yours"  # a group member's answer, and the sender is neither they nor an admin


@dataclass(eq=False, slots=True)
class Running:
    """An answer being written: its message, the task reading the model, who else may stop it."""

    message: InboundMessage
    task: asyncio.Future[None]
    admins: frozenset[str]
    stopped: bool = False
    # Delivering an update to the card: a stop is taken once that call is done (`stop_pending`),
    # so no card call is cut off halfway.
    busy: bool = False

    def may_stop(self, sender: InboundMessage) -> bool:
        if self.message.conversation_kind is not ConversationKind.GROUP:
            return True
        return sender.sender_id == self.message.sender_id or bool(
            {sender.sender_id, sender.user_key} & self.admins
        )

    def stop(self) -> None:
        self.stopped = True
        if not self.busy:
            self.task.cancel()


class Answers:
    """The answers being written in this process, by conversation key (one at a time each)."""

    def __init__(self) -> None:
        self._running: dict[str, Running] = {}

    def start(self, message: InboundMessage, task: asyncio.Future[None], admins: Collection[str]) -> Running:
        running = Running(message, task, frozenset(admins))
        self._running[message.conversation_key] = running
        return running

    def end(self, running: Running) -> None:
        if self._running.get(running.message.conversation_key) is running:
            del self._running[running.message.conversation_key]

    def stop(self, message: InboundMessage) -> Stopped:
        running = self._running.get(message.conversation_key)
        if running is None or running.stopped:
            return Stopped.NOTHING
        if not running.may_stop(message):
            return Stopped.NOT_YOURS
        log.info(
            "answer stopped",
            extra={"request_id": running.message.request_id, "user_id": message.user_key, "by": message.request_id},
        )
        running.stop()
        return Stopped.STOPPED


class Stop:
    """A /stop that reached the responder (the dispatcher takes them at intake, so only one it
    could not take): there is nothing of this conversation running then. Never sent to the model."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    async def __call__(self, exchange: Exchange) -> Flow:
        if not is_stop(exchange.text):
            return Flow.CONTINUE
        await self._delivery.notify(exchange.message, translator(exchange.message.locale)(NOTHING_TO_STOP))
        return Flow.DONE
