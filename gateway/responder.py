"""What happens to one accepted message: a fixed sequence of steps, each with one job.

Each step looks at the `Exchange` (the message and what earlier steps found out), may reply, and
says whether the next step runs (`Flow.CONTINUE`) or the user has their reply (`Flow.DONE`). A new
behaviour (a quota, another content source, another answer backend, a command) is one more step
in `Responder.steps`; see `gateway.steps` and `gateway.answer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .answer import CachedAnswer, ModelAnswer, Remember, Summary
from .backends import Backend
from .budget import counting
from .channel import Channel
from .config import DEFAULT_NAME, Config
from .document_step import Documents
from .exchange import Delivery, Exchange, Flow, Step, fields, log
from .images_out import ImagesOut
from .messages import InboundMessage
from .metrics import Metrics, Outcome
from .quotes import Quotes
from .steps import (
    Help,
    History,
    Images,
    LongMessage,
    NothingToRead,
    Prompt,
    RateLimit,
    Reset,
    Unsupported,
)
from .stopping import Answers, Stop
from .store import Store
from .transcribe import Transcribe
from .usage import Quota, RecordUsage, UsageCommand


class Responder:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        model: Backend,
        channels: Mapping[str, Channel],
        metrics: Metrics,
        agents: Mapping[str, Backend] | None = None,
    ) -> None:
        self.cfg = cfg
        self._model = model
        # The `[[agents]]` clients (not the default's: that is `model`), by agent name.
        self._agents = dict(agents or {})
        self._delivery = Delivery(channels, metrics)
        self.answers = Answers()  # the answers being written, which /stop ends (gateway/stopping.py)
        self.steps: tuple[Step, ...] = (
            # commands
            Unsupported(self._delivery),
            Help(self._delivery),
            Reset(self._delivery, store),
            Stop(self._delivery),
            UsageCommand(self._delivery, store),
            # access
            RateLimit(self._delivery, store),
            Quota(self._delivery, store, metrics),
            # content preparation
            Transcribe(self._delivery),
            LongMessage(),
            Quotes(self._delivery),
            Documents(self._delivery),
            NothingToRead(self._delivery),
            History(store),
            Images(self._delivery),
            Prompt(),
            # answer
            CachedAnswer(self._delivery, store, metrics),
            ModelAnswer(self._delivery, metrics, self.answers),
            ImagesOut(self._delivery),
            Summary(metrics),
            RecordUsage(store, metrics),
            Remember(store),
        )

    @property
    def model(self) -> Backend:
        return self._model

    @property
    def agents(self) -> Mapping[str, Backend]:
        return self._agents

    def reconfigure(
        self, cfg: Config, model: Backend, agents: Mapping[str, Backend] | None = None
    ) -> None:
        """Use a reloaded config (its routes and agents), model client and agent clients from the
        next message on (calls in flight finish with the old ones)."""
        self.cfg = cfg
        self._model = model
        if agents is not None:
            self._agents = dict(agents)

    def agent_of(self, message: InboundMessage) -> str:
        """The agent that answers `message`: the first matching route, else its bot's."""
        return self.cfg.agent_for(message.platform, message.bot, message.conversation_id)

    async def handle(self, message: InboundMessage, ready_at: float) -> None:
        name = self.agent_of(message)
        client = self._agents.get(name)
        cfg, model, per_user = self.cfg, self._model, False
        if client is not None:  # a listed agent: its model settings in place of [model]'s
            agent = cfg.agent(name)
            cfg, model, per_user = replace(cfg, model=agent.model), client, agent.group_context == "per_user"
        else:
            name = DEFAULT_NAME
        exchange = Exchange.start(message, ready_at, cfg, model, name, per_user)
        # Every billable platform call made while answering it is charged to it (`Summary`).
        with counting(exchange.api_calls):
            for step in self.steps:
                if await step(exchange) is Flow.DONE:
                    return

    async def notice(
        self, message: InboundMessage, text: str, outcome: Outcome = Outcome.NOTICE
    ) -> None:
        try:
            await self._delivery.notify(message, text, outcome)
        except Exception:
            log.exception("notice could not be delivered", extra=fields(message))
