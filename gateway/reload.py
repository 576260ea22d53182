"""Config reload (admin API and SIGHUP): re-read the file, apply what can change live, and say
plainly what needs a restart.

Applied live: `[model]` (a new model client; calls in flight finish on the old one), `[[agents]]`
(new clients likewise), `[[routes]]` and each bot's `agent` (routing reads them per message),
`[context]`, `[cache]`, `[limits]` (the responder reads them per message), `[admin]`, `[api]`,
`[alerts]` (read per request / per check), `[[schedules]]` (the scheduler reads them every round
and wakes on a reload: added ones count from now, removed ones stop), `[log] level` and the secrets
the log formatter masks, plus what components register: appliers (the server: the TLS
certificate) and followers (each platform bot: its secrets, unless the reload names another app).
Everything else — `[server]`, `[store]`, `[dispatcher]`, the rest of the platform sections and the
listed bots (added, removed, their credentials and settings) — is only reported as needing a
restart: those objects were built at start and are not rebuilt piecemeal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_NAME, BotConfig, Config, ConfigError, load
from .logs import JsonFormatter

log = logging.getLogger(__name__)

LIVE_SECTIONS = frozenset(
    {"model", "context", "cache", "limits", "admin", "api", "alerts", "log", "agents", "routes", "schedules"}
)
# Which agent each bot uses: part of the bot entries, but routing, not a connection.
BOT_AGENTS = "bots.agent"

Applier = Callable[[Config], None]


@dataclass(frozen=True, slots=True)
class ReloadReport:
    source: str
    applied: tuple[str, ...]  # "section.key" now in force
    needs_restart: tuple[str, ...]  # "section.key" that differ from what the process runs with

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "applied": list(self.applied),
            "needs_restart": list(self.needs_restart),
        }


def changed_keys(old: Config, new: Config) -> list[str]:
    """Every `section.key` whose value differs (secrets included, by value, never printed)."""
    out = []
    for f in dataclasses.fields(Config):
        if f.name == "source":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name == "bots":
            if _agents_differ(a, b):
                out.append(BOT_AGENTS)
            if _listed(a, agentless=True) != _listed(b, agentless=True):
                out.append(f.name)
            continue
        if isinstance(a, tuple):  # agents, routes: compared whole
            if a != b:
                out.append(f.name)
            continue
        for key in dataclasses.fields(a):
            if getattr(a, key.name) != getattr(b, key.name):
                out.append(f"{f.name}.{key.name}")
    return out


def _listed(bots: tuple[BotConfig, ...], agentless: bool = False) -> tuple[BotConfig, ...]:
    """The listed bots, without the bot of a single-app section: that one mirrors its
    `[dingtalk]` / `[feishu]` section, whose keys are compared one by one."""
    listed = tuple(b for b in bots if b.name != DEFAULT_NAME)
    return tuple(dataclasses.replace(b, agent="") for b in listed) if agentless else listed


def _bot_agents(bots: tuple[BotConfig, ...]) -> dict[str, str]:
    return {b.key: b.agent for b in bots}


def _agents_differ(old: tuple[BotConfig, ...], new: tuple[BotConfig, ...]) -> bool:
    """Whether a bot present in both uses another agent (an added or removed bot is a restart)."""
    a, b = _bot_agents(old), _bot_agents(new)
    return any(a[key] != b[key] for key in a.keys() & b.keys())


def merged(base: Config, new: Config, keys: Iterable[str]) -> Config:
    """`base` with the values of `keys` (`section.key`, or a list section's name) taken from `new`."""
    sections: dict[str, dict[str, Any]] = {}
    lists: dict[str, Any] = {}
    for key in keys:
        if key == BOT_AGENTS:  # the running bots, each with the agent `new` gives it
            agents = _bot_agents(new.bots)
            lists["bots"] = tuple(dataclasses.replace(b, agent=agents.get(b.key, b.agent)) for b in base.bots)
        elif "." not in key:  # agents, routes: whole
            lists[key] = getattr(new, key)
        else:
            section, name = key.split(".")
            sections.setdefault(section, {})[name] = getattr(getattr(new, section), name)
    return dataclasses.replace(
        base,
        **lists,
        **{section: dataclasses.replace(getattr(base, section), **v) for section, v in sections.items()},
    )


@dataclass(frozen=True, slots=True)
class Follower:
    """A component that takes `keys` from every accepted reload and cannot refuse them. While a
    key of `unless_changed` differs from what the process started with, `keys` wait for the
    restart too (a platform secret belongs to its app id: with another id, both need a restart)."""

    keys: frozenset[str]
    apply: Applier
    unless_changed: frozenset[str]

    def follows(self, started: Config, new: Config) -> bool:
        return not set(changed_keys(started, new)) & self.unless_changed


class LiveConfig:
    """The config in force now. `started` is what the process was built with; `config` is the
    latest loaded one (its live sections are applied, the rest waits for a restart); `in_force`
    holds, key by key, the values the process runs with (what the next reload is compared with)."""

    def __init__(self, config: Config) -> None:
        self.started = config
        self.config = config
        self.in_force = config
        self.needs_restart: tuple[str, ...] = ()
        self.reloaded_at: float | None = None
        self.lock = asyncio.Lock()
        self._listeners: set[asyncio.Event] = set()
        self.appliers: list[tuple[frozenset[str], Applier]] = []
        self.followers: list[Follower] = []

    def add_applier(self, keys: frozenset[str], apply: Applier) -> None:
        """A component that applies `keys` itself on every reload (the server: its TLS
        certificate). `apply` runs before anything else changes and may refuse with `ConfigError`."""
        self.appliers.append((keys, apply))

    def add_follower(
        self, keys: frozenset[str], apply: Applier, unless_changed: frozenset[str] = frozenset()
    ) -> None:
        """A component that takes `keys` from every accepted reload (`Follower`); `apply` runs
        once nothing can refuse the reload any more."""
        self.followers.append(Follower(keys, apply, unless_changed))

    def live_keys(self, new: Config) -> frozenset[str]:
        """The keys outside `LIVE_SECTIONS` that `new` can change without a restart."""
        keys = [k for keys, _ in self.appliers for k in keys]
        keys += [k for f in self.followers if f.follows(self.started, new) for k in f.keys]
        return frozenset(keys)

    def follow(self, new: Config) -> None:
        """Hand `new` to every follower that takes it (see `Follower`)."""
        for follower in self.followers:
            if follower.follows(self.started, new):
                follower.apply(new)

    def add_listener(self, event: asyncio.Event) -> None:
        """`event` is set after every reload (open status pages refresh at once)."""
        self._listeners.add(event)

    def remove_listener(self, event: asyncio.Event) -> None:
        self._listeners.discard(event)

    def commit(self, new: Config, report: ReloadReport) -> None:
        """`new` is in force (its live sections were applied by the caller)."""
        self.config = new
        self.in_force = merged(self.in_force, new, report.applied)
        self.needs_restart = report.needs_restart
        self.reloaded_at = time.time()
        for event in self._listeners:
            event.set()
        fields = {
            "config": report.source,
            "applied": list(report.applied),
            "restart_keys": list(report.needs_restart),
            "log_level": new.log.level,
        }
        if report.needs_restart:
            log.warning("config reloaded; restart to apply the other changes", extra=fields)
        else:
            log.info("config reloaded", extra=fields)


def read_config(source: str) -> Config:
    """Load the file the running config came from (with the current environment)."""
    if source == "<defaults>":
        return load(None)
    if source.startswith("<"):
        raise ConfigError(f"the running config came from {source}, not a file; nothing to reload")
    return load(source)


def apply_logging(config: Config) -> None:
    """Log level and the secrets every JSON log line masks (new keys must be masked at once)."""
    root = logging.getLogger()
    root.setLevel(config.log.level)
    for handler in root.handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.set_secrets(config.secrets())


def plan(live: LiveConfig, new: Config) -> ReloadReport:
    extra = live.live_keys(new)

    def is_live(key: str) -> bool:
        return key.split(".")[0] in LIVE_SECTIONS or key == BOT_AGENTS or key in extra

    # Compared with what runs, not with the last file: a secret held back with its app id's change
    # is applied by the reload that brings the old id back.
    applied = [k for k in changed_keys(live.in_force, new) if is_live(k)]
    restart = [k for k in changed_keys(live.started, new) if not is_live(k)]
    return ReloadReport(new.source, tuple(applied), tuple(restart))
