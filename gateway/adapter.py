"""`Adapter`: the one skeleton every platform adapter (DingTalk, Feishu, and those to come) follows.

An adapter is one bot: one app's credentials, API client, token cache, API budget, API rate
limiter, long connection, webhook route and status. It is built from its config alone (`Adapter(cfg, metrics,
name)`), so a process may hold several of one platform; what exists only once the app runs (the
HTTP session, the dispatcher) arrives in `ctx` as one `Runtime`.

A platform supplies four things: its API client (`make_api`), its long-connection client
(`make_client`), a parser from a delivered event to an `InboundMessage` (`parse`), and the
`Channel` side (`send`, `open_stream`, `fetch`). Everything between the wire and the dispatcher is
here, once: "event seen", drop accounting, the `Admission` that answers a stream frame or webhook.

A reload may bring the bot new secrets (`follow_reloads`): `rekey` swaps them into `cfg`, which the
webhook and the long connection read per use, and hands them to the API client (`use_secrets`), so
the next token is fetched with them. Another app id is another app: that waits for a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import Field, dataclass, replace
from functools import partial
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import aiohttp
import orjson
from aiohttp import web

from .admission import Admission, Dropped, Submission, Verdict
from .backoff import Backoff
from .budget import ApiBudget
from .channel import ChannelState, ChannelStatus, ReplyStream, StatusTracker
from .config import SECRET_KEYS
from .connection import ConnectionLoop
from .dispatcher import Dispatcher
from .errors import PlatformError
from .i18n import AUTO, Locale, locale_for
from .keys import DISPATCHER, HTTP, LIVE, STORE
from .messages import DEFAULT_BOT, Attachment, InboundMessage, Reply
from .metrics import Metrics
from .ratelimit import RateLimiter
from .reload import LiveConfig
from .store import CardRecord
from .streaming import CardBook
from .tasks import stop_task

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BOT", "Adapter", "Runtime"]


class PlatformConfig(Protocol):
    """What the skeleton reads of a platform's config section (a frozen dataclass)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @property
    def mode(self) -> str: ...

    @property
    def monthly_api_budget(self) -> int: ...


CfgT = TypeVar("CfgT", bound=PlatformConfig)
ApiT = TypeVar("ApiT")


@dataclass(frozen=True, slots=True)
class Runtime(Generic[ApiT]):
    """What an adapter uses once the app runs: made in `ctx`, gone after it."""

    api: ApiT
    http: aiohttp.ClientSession
    dispatcher: Dispatcher


class SessionClient(Protocol):
    """A platform's long-connection client: the session a `ConnectionLoop` runs, its backoff,
    and a barrier that says every event frame read so far has been answered."""

    @property
    def backoff(self) -> Backoff: ...

    async def session(self, connected: Callable[[], None]) -> None: ...

    async def settled(self) -> None: ...


class Adapter(ABC, Generic[CfgT, ApiT]):
    platform: ClassVar[str]  # also the name of its config section
    long_transport: ClassVar[str]  # the name of the long connection's transport ("stream", "ws")
    identity: ClassVar[str] = ""  # the config field naming the app ("client_id"): another is another app

    @classmethod
    def modes(cls) -> Mapping[str, tuple[str, ...]]:
        """`mode` setting -> the transports it runs: the long connection, the webhook, or both."""
        long = cls.long_transport
        return {long: (long,), "webhook": ("webhook",), "both": (long, "webhook")}

    def __init__(self, cfg: CfgT, metrics: Metrics, name: str = DEFAULT_BOT) -> None:
        self.name = name
        self.cfg = cfg
        self.metrics = metrics
        self.budget = ApiBudget(self.platform, cfg.monthly_api_budget, metrics, name)
        # This bot's own limits: every instance is one app with a quota of its own.
        self.limiter = self.make_limiter()
        self.tracker = StatusTracker(
            ChannelStatus(self.platform, ChannelState.CONNECTING, transports=self.modes()[cfg.mode], bot=name)
        )
        self._runtime: Runtime[ApiT] | None = None
        # An adapter whose answers stream into cards that outlive the process sets this (and
        # `settle_card`): its open cards are recorded, and finished after a crash or restart.
        self.cards: CardBook | None = None
        self._client: SessionClient | None = None
        self._loop: ConnectionLoop | None = None
        self._live: LiveConfig | None = None  # for `[chat] locale`, once the app runs

    # -- what a platform supplies ----------------------------------------------------------------
    @abstractmethod
    def make_api(self, http: aiohttp.ClientSession) -> ApiT:
        """The platform's API client for this bot, on the app's HTTP session."""

    def use_secrets(self, api: ApiT) -> None:
        """Hand the secrets of `self.cfg` (just replaced by a reload) to the API client, which
        forgets its token. The webhook and the long connection read `self.cfg` themselves."""

    def make_limiter(self) -> RateLimiter:
        """The app-wide rate limits in front of this bot's API calls (`gateway.ratelimit`), from
        `self.cfg`. A channel whose platform has no API (web chat) keeps this: no limits."""
        return RateLimiter()

    def make_client(self, runtime: Runtime[ApiT]) -> SessionClient:
        """The long connection's client; it hands each event's payload to `prepare_payload`.
        Called only when the mode runs `long_transport`: a channel without one keeps this."""
        raise NotImplementedError(f"{self.platform} keeps no long connection")

    @abstractmethod
    async def parse(self, body: object, transport: str) -> InboundMessage | Dropped:
        """One delivered event (decoded JSON) -> the message to answer, or why not. May raise
        `PlatformError` when a lookup it needs failed: the event is then not acknowledged."""

    @abstractmethod
    async def send(self, reply: Reply) -> None: ...

    @abstractmethod
    async def open_stream(self, message: InboundMessage) -> ReplyStream | None: ...

    @abstractmethod
    async def fetch(self, message: InboundMessage, attachment: Attachment) -> tuple[bytes, str]: ...

    async def settle_card(self, record: CardRecord) -> None:
        """Close a card a previous process left open with its recorded text (or the "interrupted"
        notice); raises `PlatformError`. Only an adapter that sets `cards` is asked."""
        raise NotImplementedError(f"{self.platform} keeps no cards")

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def runtime(self) -> Runtime[ApiT]:
        if self._runtime is None:
            raise PlatformError(f"{self.platform} adapter {self.name!r} is not running")
        return self._runtime

    @property
    def key(self) -> str:
        """The channel's name in the core: "<platform>/<bot>"."""
        return f"{self.platform}/{self.name}"

    @property
    def webhook_path(self) -> str:
        """The default bot keeps the bare path; another bot's name follows it."""
        base = f"/{self.platform}/webhook"
        return base if self.name == DEFAULT_BOT else f"{base}/{self.name}"

    def secret_keys(self) -> frozenset[str]:
        """The `section.key` names of this bot's secrets (`SECRET_KEYS` of its config section)."""
        return frozenset(k for k in SECRET_KEYS if k.partition(".")[0] == self.platform)

    def follow_reloads(self, live: LiveConfig) -> None:
        """Take this bot's secrets from every reload, without a restart (`rekey`). A reload that
        also changes the app id (`identity`) leaves them for the restart that change needs. So
        far only the single-app section's bot follows; a listed bot's changes wait for a restart
        (the reload report says so)."""
        if self.name != DEFAULT_BOT:
            return
        unless = frozenset({f"{self.platform}.{self.identity}"} if self.identity else ())
        live.add_follower(self.secret_keys(), lambda new: self.rekey(getattr(new, self.platform)), unless)

    def rekey(self, cfg: CfgT) -> None:
        """Take the secrets of `cfg` (a reloaded config section); the rest of it waits for a
        restart, so everything else stays as the bot started."""
        names = sorted(key.partition(".")[2] for key in self.secret_keys())
        changed = {name: getattr(cfg, name) for name in names if getattr(cfg, name) != getattr(self.cfg, name)}
        if not changed:
            return
        self.cfg = replace(self.cfg, **changed)
        if self._runtime is not None:
            self.use_secrets(self._runtime.api)
        log.info("new secrets in use", extra={"platform": self.platform, "bot": self.name, "keys": list(changed)})

    @property
    def webhook_paths(self) -> tuple[str, ...]:
        """Every path the bot's webhook answers at: the default bot also at `<bare>/default`."""
        if self.name == DEFAULT_BOT:
            return (self.webhook_path, f"{self.webhook_path}/{DEFAULT_BOT}")
        return (self.webhook_path,)

    def runs(self, transport: str) -> bool:
        return transport in self.tracker.status.transports

    def locale(self, accept_language: str | None = None) -> Locale:
        """The language of this bot's notices (`gateway.i18n.locale_for`): the bot's own `locale`,
        else `[chat] locale` in force; by its platform, Feishu's domain, or a browser's header."""
        chat = self._live.in_force.chat.locale if self._live is not None else AUTO
        own, domain = getattr(self.cfg, "locale", ""), getattr(self.cfg, "domain", "")
        return locale_for(chat, own, self.platform, domain, accept_language)

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: bind the runtime, take over the cards a previous process left open, run
        the long connection if this mode has one."""
        runtime = Runtime(self.make_api(app[HTTP]), app[HTTP], app[DISPATCHER])
        self._runtime = runtime
        self._live = app.get(LIVE)
        task: asyncio.Task[None] | None = None
        sweeper: asyncio.Task[None] | None = None
        if self.cards is not None:  # before the inbox is resumed: its answers take their cards over
            cfg = runtime.dispatcher.cfg
            older_than = cfg.deadline + 2 * cfg.lease_ttl  # on a shared store: surely nobody's any more
            left = await self.cards.start(app[STORE], older_than)
            sweep = self.cards.sweep(self.settle_card, left, older_than)
            sweeper = asyncio.create_task(sweep, name=f"{self.platform}:{self.name}:cards")
        try:  # from here on, whatever fails still stops the sweeper
            if self.runs(self.long_transport):
                self._client = client = self.make_client(runtime)
                self._loop = ConnectionLoop(self.platform, self.tracker, self.metrics, client.session, client.backoff)
                task = asyncio.create_task(self._loop.run(), name=f"{self.platform}:{self.name}")
            else:  # webhook only: nothing to connect, ready while running
                self.tracker.set(state=ChannelState.CONNECTED, connected_since=time.time())
            yield
        finally:
            await stop_task(sweeper)
            await stop_task(task)
            self._loop = self._client = None
            self.tracker.set(state=ChannelState.STOPPED)

    def status(self) -> ChannelStatus:
        return replace(self.tracker.snapshot(), budget=self.budget.status())

    async def reconnect(self) -> None:
        if self._loop is not None:
            self._loop.reconnect()

    async def wait_connected(self) -> None:
        """Until the long connection is up (the handshake done, `connected` reported)."""
        if self._loop is None:
            raise PlatformError(f"{self.platform} adapter {self.name!r} runs no long connection")
        await self._loop.connected_event.wait()

    async def settled(self) -> None:
        """Until every event frame read so far on the long connection was answered: after a
        ping's answer, the barrier that says earlier frames were handled."""
        if self._client is not None:
            await self._client.settled()

    # -- inbound ---------------------------------------------------------------------------------
    async def prepare_payload(self, payload: str | bytes) -> Verdict:
        """A long-connection event payload (JSON text) -> its verdict. Undecodable JSON is
        counted as malformed and acknowledged: a redelivery would be just as broken."""
        try:
            body: object = orjson.loads(payload)
        except orjson.JSONDecodeError:
            body = None
        return await self.prepare(body, self.long_transport)

    async def prepare(self, body: object, transport: str) -> Verdict:
        """Parse an event at once (in arrival order): a verdict now, or the `Submission` to run
        in its conversation's order. Every event counts as seen here, and only here."""
        self.tracker.event_seen()
        try:
            result = await self.parse(body, transport)
        except PlatformError as e:
            log.error("event not checkable, left for redelivery: %s", e, extra=self._fields(transport))
            return Admission.UNAVAILABLE
        except Exception:  # a parser bug: this event is not acknowledged, the connection lives on
            log.exception("event could not be parsed", extra=self._fields(transport))
            return Admission.UNAVAILABLE
        if isinstance(result, Dropped):
            return self._dropped(result, transport)
        if self.name != DEFAULT_BOT:  # answered through this bot, in this bot's conversations
            result = replace(result, bot=self.name)
        if result.locale is None:  # one the parser did not choose (it words no notice): the bot's
            result = replace(result, locale=self.locale())
        return Submission(result.conversation_key, partial(self.submit, result))

    async def admit(self, body: object, transport: str) -> Admission:
        """`prepare` and submit at once (webhooks: each request is its own order)."""
        verdict = await self.prepare(body, transport)
        return verdict if isinstance(verdict, Admission) else await verdict.submit()

    async def submit(self, message: InboundMessage) -> Admission:
        return await self.runtime.dispatcher.submit(message)

    def _dropped(self, dropped: Dropped, transport: str) -> Admission:
        self.metrics.dropped.labels(self.platform, dropped.reason).inc()
        # Unaddressed group chatter is the normal case in groups: not worth an INFO line each.
        log.log(
            logging.DEBUG if dropped.reason == "not_mentioned" else logging.INFO,
            "event dropped",
            extra={**self._fields(transport), "reason": dropped.reason, "detail": dropped.detail},
        )
        return Admission.MALFORMED if dropped.reason == "malformed" else Admission.DROPPED

    def _fields(self, transport: str) -> dict[str, str]:
        return {"platform": self.platform, "bot": self.name, "transport": transport}
