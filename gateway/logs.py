"""JSON log lines on stdout, with every secret masked before it is written: the configured ones,
the credentials obtained at run time (`register_secret`), and credentials inside URLs (`redact`).

The keys are safe to decode into the root of an Elastic Common Schema document (no string where ECS
has an object), and under journald each line starts with its syslog priority (docs/logging.md)."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO, TypeVar
from urllib.parse import parse_qsl, urlsplit

import orjson
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

# Fields every line carries (null when unknown), so log queries never miss a key.
STANDARD_FIELDS = ("request_id", "user_id", "latency_ms", "model_version")
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

# The top-level names that are objects in the Elastic Common Schema 9.4 (field sets such as `event`
# and `host`, and the object-typed `labels`), from tests/data/ecs_fields.txt. Elasticsearch's ECS
# templates map them as objects and reject a whole line that carries a string there ("object mapping
# for [host] tried to parse field [host] as object, but found a concrete value"). The gateway's own
# keys avoid them (tests/test_logs_shipping.py checks the source); a value logged under one anyway,
# by a library for instance, is written as `<name>_value`.
ECS_OBJECTS = frozenset(
    {
        "agent", "client", "cloud", "container", "data_stream", "destination", "device", "dll", "dns",
        "ecs", "email", "entity", "error", "event", "faas", "file", "gen_ai", "group", "host", "http",
        "labels", "log", "network", "observer", "orchestrator", "organization", "package", "process",
        "registry", "related", "rule", "server", "service", "source", "span", "threat", "tls", "trace",
        "transaction", "url", "user", "user_agent", "volume", "vulnerability",
    }
)  # fmt: skip


def ecs_safe_key(key: str, value: object) -> str:
    """`key`, or `<key>_value` when a non-object value would land on an ECS object."""
    return f"{key}_value" if key in ECS_OBJECTS and not isinstance(value, dict) else key


# -- journald priorities ---------------------------------------------------------------------------
# syslog(3) priorities, as journald reads them from a "<N>" line prefix (sd-daemon(3)).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """CRITICAL 2 (crit), ERROR 3 (err), WARNING 4 (warning), INFO 6 (info), DEBUG 7 (debug); a level
    in between takes the priority of the named level below it."""
    return next((priority for floor, priority in _PRIORITIES if levelno >= floor), 7)


def writes_to_journal(stream: TextIO) -> bool:
    """Is `stream` the journal stream systemd connected the service to? systemd sets
    JOURNAL_STREAM to that stream's "device:inode" (systemd.exec(5)); the variable is inherited by
    a process whose output was redirected elsewhere (a terminal, a file, a pipe into jq), so the
    stream's own device and inode must match."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):  # not set or malformed, or a stream without a file descriptor
        return False


MASK = "***"
MIN_SECRET = 4  # shorter values would mask ordinary words

# -- credentials in output ------------------------------------------------------------------------
# A query parameter (or `name=value` in any text) whose name ends in one of these words carries a
# credential: DingTalk's stream `ticket` and sessionWebhook `session`, Feishu's ws URL
# `access_key`/`ticket`, `access_token`, Redis' `password`, signatures. The name must start at a word
# boundary: `fpid=`, `service_id=` and `design=` are left alone, `tenant_access_token=` and
# `x-amz-signature=` are not.
_CREDENTIAL_NAME = (
    r"(?:[\w-]*[_-])?(?:access_?key|api_?key|secret|token|ticket|session|password|passwd|pwd|sign"
    r"|signature|sig|credentials?|auth)"
)
# The value stops where a URL part, a quote, a space or a JSON escape does.
_CREDENTIAL_PARAM = re.compile(rf"(?i)(?<![\w-])({_CREDENTIAL_NAME})=[^&#;\s\"'<>\\]+")
# `scheme://user:password@host`: the whole userinfo goes.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s\"'<>\\]+@")
_PARAM_NAME = re.compile(rf"(?i){_CREDENTIAL_NAME}")

T = TypeVar("T")

# `extra=SHOWS_CREDENTIAL` marks the rare record whose reader needs the credential in it (the admin
# login link with its token): configured and registered secrets are still masked there, credentials
# inside URLs are not.
SHOWS_CREDENTIAL = {"_shows_credential": True}


def _forms(secrets: Iterable[str]) -> list[str]:
    """Each secret as written and as JSON spells it (masking may run on an encoded line, where a
    quote or backslash in a secret is escaped), longest first."""
    forms = {f for s in secrets if len(s) >= MIN_SECRET for f in (s, orjson.dumps(s).decode()[1:-1])}
    return sorted(forms, key=len, reverse=True)


class RuntimeSecrets:
    """Credentials the gateway obtains while running (access tokens, connection tickets, the keys
    in a websocket URL): masked in every log line and in what the HTTP routes show, like configured
    secrets. The newest `limit` are kept; an older token or ticket has long expired."""

    def __init__(self, limit: int = 64) -> None:
        self._limit = limit
        self._values: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # log records are formatted on other threads too
        self.forms: tuple[str, ...] = ()

    def add(self, value: str) -> None:
        if len(value) < MIN_SECRET:
            return
        with self._lock:
            if value in self._values:
                self._values.move_to_end(value)
                return
            self._values[value] = None
            while len(self._values) > self._limit:
                self._values.popitem(last=False)
            self.forms = tuple(_forms(self._values))


RUNTIME = RuntimeSecrets()


def register_secret(value: str) -> None:
    """Mask `value` in all output from now on (call it where a token or ticket is obtained)."""
    RUNTIME.add(value)


def register_url_secrets(url: str) -> None:
    """Register the credentials inside `url`: its userinfo password and every query value whose
    parameter name says it is a credential (e.g. Feishu's ws URL `access_key` and `ticket`)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a malformed IPv6 host; `redact` still masks its query by name
        return
    if parts.password:
        register_secret(parts.password)
    for name, value in parse_qsl(parts.query):
        if _PARAM_NAME.fullmatch(name):
            register_secret(value)


def _replace(text: str, forms: Iterable[str]) -> str:
    for secret in forms:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without credentials: the given (configured) secrets, the registered runtime ones,
    URL userinfo and credential-named `name=value` pairs, each replaced by `***`."""
    return _redact(text, _forms(secrets))


def _redact(text: str, forms: Iterable[str]) -> str:
    text = _replace(_replace(text, forms), RUNTIME.forms)
    if "=" in text:
        text = _CREDENTIAL_PARAM.sub(rf"\1={MASK}", text)
    if "@" in text:
        text = _USERINFO.sub(rf"\1{MASK}@", text)
    return text


def redacted(value: T, secrets: Iterable[str] = ()) -> T:
    """`value` (JSON-like data: dicts, lists, strings, numbers) with every string `redact`ed; for
    what /readyz, the status page and the admin API show."""
    forms = _forms(secrets)

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return _redact(v, forms)
        if isinstance(v, dict):
            return {k: walk(item) for k, item in v.items()}
        if isinstance(v, list | tuple):
            return [walk(item) for item in v]
        return v

    result: T = walk(value)
    return result


class JsonFormatter(logging.Formatter):
    """One JSON object per line. `priority_prefix` puts the record's syslog priority in front
    ("<4>{...}"), for journald only: it strips the prefix and keeps the priority, so
    `journalctl -p warning` finds the warnings and `journalctl -o cat` still shows bare JSON."""

    def __init__(self, secrets: list[str] | None = None, priority_prefix: bool = False) -> None:
        super().__init__()
        self.priority_prefix = priority_prefix
        self.set_secrets(secrets or [])

    def set_secrets(self, secrets: list[str]) -> None:
        """Mask these from now on (a config reload may bring new ones)."""
        # Masking runs on the encoded line, so also look for each secret as JSON spells it.
        self._secrets = _forms(secrets)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in STANDARD_FIELDS:
            line[name] = None
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[ecs_safe_key(key, value)] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        text = orjson.dumps(line, default=str).decode()
        if getattr(record, "_shows_credential", False):
            text = _replace(_replace(text, self._secrets), RUNTIME.forms)
        else:
            text = _redact(text, self._secrets)
        return f"<{syslog_priority(record.levelno)}>{text}" if self.priority_prefix else text


class ClientProtocolErrors(logging.Filter):
    """aiohttp logs a malformed request at ERROR with a traceback. On a public port that is scanner
    noise, not a server fault, so it becomes one DEBUG line (aiohttp already does this for a bad
    method, the commonest case)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RequestPayloadError):
            # A body that cannot be decoded, met again when aiohttp drains what the handler left;
            # the reason is the last line of "400, message:\n  Can not decode ...".
            summary = (str(exc).strip().splitlines() or [""])[-1].strip()
        elif isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            summary = (exc.message.strip().splitlines() or [""])[0]
        else:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = "malformed request: %s", (summary[:200],)
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class RepeatLimit(logging.Filter):
    """At most one record per `interval` seconds for each listed message; the next one let through
    carries `suppressed`, how many were dropped meanwhile.

    Out of file descriptors (EMFILE), asyncio's accept loop logs "socket.accept() out of system
    resource" with a traceback for every failed accept, retrying each second, and the retries pile
    up: 100,000 lines in half a minute, which buries the log and costs the CPU the gateway needs to
    recover."""

    def __init__(self, prefixes: Iterable[str], interval: float = 10.0) -> None:
        super().__init__()
        self._prefixes = tuple(prefixes)
        self._interval = interval
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        prefix = next((p for p in self._prefixes if message.startswith(p)), None)
        if prefix is None:
            return True
        now = time.monotonic()
        if now - self._last.get(prefix, -self._interval) < self._interval:
            self._dropped[prefix] = self._dropped.get(prefix, 0) + 1
            return False
        self._last[prefix] = now
        dropped = self._dropped.pop(prefix, 0)
        if dropped:
            record.suppressed = dropped
        return True


# asyncio's messages for a listening socket that cannot accept (EMFILE, ENFILE, ENOBUFS, ENOMEM).
ACCEPT_EXHAUSTED = ("socket.accept() out of system resource",)


def setup_logging(level: str = "INFO", secrets: list[str] | None = None) -> None:
    """Configure the root logger (called by run.py only)."""
    # The lines carry none of a record's thread, process or source-file fields, so records are
    # made without looking them up: a stack walk and three lookups less per line, one line per
    # answered message (https://docs.python.org/3/howto/logging.html#optimization).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(secrets, priority_prefix=writes_to_journal(sys.stdout)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(ClientProtocolErrors())
    logging.getLogger("asyncio").addFilter(RepeatLimit(ACCEPT_EXHAUSTED))
