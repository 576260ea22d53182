"""Key hygiene: when each configured secret was first seen, so that old keys get rotated.

Each tracked secret (model API keys, platform secrets, alert robot secrets, the admin password,
`jwt_secret` and `metrics_token`) is known by its fingerprint only: the first
`FINGERPRINT_CHARS` hex digits of a SHA-256 of the value (with a fixed prefix, so the digest is
not a plain SHA-256 of a provider's key). `key-ages.json` in the state directory (mode 0600) maps
fingerprints to the date they were first seen. The gateway updates it at start and on every
reload: an unseen fingerprint is added with today's date (UTC), one no longer configured is
dropped, so a rotated key starts afresh. The status page and `python run.py doctor` warn about
every key older than `MAX_AGE_DAYS`, naming its config key (`[model] api_keys #2`) and its age,
never the key, and never more of the fingerprint than `HINT_CHARS` digits.

A `memory://` store keeps nothing on disk: the dates then live in the running process only.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import orjson

from .auth import StateFile
from .config import BOT_SECRETS, DEFAULT_NAME, Config

log = logging.getLogger(__name__)

MAX_AGE_DAYS = 90  # a key first seen longer ago than this is worth rotating
KEY_AGES_FILE = "key-ages.json"
FINGERPRINT_CHARS = 16  # 64 bits: no two configured keys collide, and far from the key itself
HINT_CHARS = 4  # what the status page and doctor show of a fingerprint, to tell keys apart
_DOMAIN = b"botgate key age\n"
# Secrets tracked besides the model keys, in the order they are shown. Left out: the alert robot
# webhook URLs (an address, replaced by creating a new robot; its signing secret is tracked).
TRACKED = (
    "dingtalk.client_secret",
    "feishu.app_secret",
    "feishu.encrypt_key",
    "feishu.verification_token",
    "alerts.dingtalk_secret",
    "alerts.feishu_secret",
    "admin.password",
    "admin.jwt_secret",
    "admin.metrics_token",
)


def fingerprint(value: str) -> str:
    return hashlib.sha256(_DOMAIN + value.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def today() -> date:
    return datetime.now(UTC).date()


def configured_keys(config: Config) -> list[tuple[str, str]]:
    """(name as shown, value) of every configured secret whose age is tracked."""
    keys = [(f"[model] api_keys #{n}", key) for n, key in enumerate(config.model.api_keys, 1) if key]
    for key in TRACKED:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value:
            keys.append((f"[{section}] {name}", value))
    for agent in config.agents:
        keys += [(f"[[agents]] {agent.name} api_keys #{n}", k) for n, k in enumerate(agent.model.api_keys, 1) if k]
    for bot in config.bots:
        if bot.name == DEFAULT_NAME:
            continue  # its section's secrets, above
        for name in BOT_SECRETS[bot.platform]:
            value = getattr(bot.settings, name)
            if value:
                keys.append((f"[[{bot.platform}.bots]] {bot.name} {name}", value))
    return keys


@dataclass(frozen=True, slots=True)
class KeyAge:
    name: str  # the config key, e.g. "[model] api_keys #2"
    fingerprint: str
    first_seen: date | None  # None: not seen by the gateway yet (doctor before the first start)

    def days(self, on: date) -> int:
        return 0 if self.first_seen is None else (on - self.first_seen).days

    @property
    def hint(self) -> str:
        return self.fingerprint[:HINT_CHARS]

    def describe(self, on: date) -> str:
        seen = "not seen yet" if self.first_seen is None else f"first seen {self.first_seen.isoformat()}"
        return f"{self.name} (fingerprint {self.hint}…, {seen}, {self.days(on)} days ago)"


def parse(text: str) -> dict[str, date]:
    """The file's fingerprint -> first-seen date. Raises ValueError for anything else."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    seen = data.get("first_seen") if isinstance(data, dict) else None
    if not isinstance(seen, dict):
        raise ValueError('no "first_seen" object')
    out = {}
    for fp, day in seen.items():
        if not isinstance(day, str):
            raise ValueError(f"first_seen[{fp!r}] is not a date")
        out[fp] = date.fromisoformat(day)  # ValueError for a malformed one
    return out


def dump(first_seen: dict[str, date]) -> str:
    by_fp = {fp: day.isoformat() for fp, day in sorted(first_seen.items())}
    return orjson.dumps({"first_seen": by_fp}, option=orjson.OPT_INDENT_2).decode()


def ages(config: Config, first_seen: dict[str, date]) -> list[KeyAge]:
    """Every tracked key of `config`, dated by `first_seen` (fingerprint -> date)."""
    keys = [(name, fingerprint(value)) for name, value in configured_keys(config)]
    return [KeyAge(name, fp, first_seen.get(fp)) for name, fp in keys]


def too_old(keys: list[KeyAge], on: date) -> list[KeyAge]:
    return [k for k in keys if k.days(on) > MAX_AGE_DAYS]


class KeyAges:
    """The gateway's record of first-seen dates (`path` None: in memory only)."""

    def __init__(self, path: Path | None) -> None:
        self._file = StateFile(path)
        self._first_seen: dict[str, date] = {}

    @property
    def path(self) -> Path | None:
        return self._file.path

    def _stored(self) -> dict[str, date]:
        try:
            text = self._file.read()
        except OSError as e:
            log.warning("cannot read the key ages; keeping them in memory: %s", e.strerror or e,
                        extra={"path": str(self.path)})  # fmt: skip
            return dict(self._first_seen)
        if not text:
            return dict(self._first_seen)
        try:
            return parse(text)
        except ValueError as e:
            log.warning("the key ages file is unreadable, starting it afresh: %s", e, extra={"path": str(self.path)})
            return {}

    def record(self, config: Config, on: date | None = None) -> list[KeyAge]:
        """At start and after every reload: add the fingerprints of `config` not seen before (first
        seen `on`, default today), drop those it no longer has, store the result if it changed."""
        on = on or today()
        stored = self._stored()
        current = {fingerprint(value) for _, value in configured_keys(config)}
        first_seen = {fp: stored.get(fp, on) for fp in current}
        self._first_seen = first_seen
        if first_seen != stored:
            try:
                self._file.replace(dump(first_seen))
            except OSError as e:
                log.warning("cannot store the key ages; keeping them in memory: %s", e.strerror or e,
                            extra={"path": str(self.path)})  # fmt: skip
        return self.ages(config)

    def ages(self, config: Config) -> list[KeyAge]:
        """Every tracked key of `config` with its first-seen date as recorded."""
        return ages(config, self._first_seen)
