"""JSON log lines on stdout, with every configured secret masked before it is written."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

# Fields every line carries (null when unknown), so log queries never miss a key.
STANDARD_FIELDS = ("request_id", "user_id", "latency_ms", "model_version")
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: list[str] | None = None) -> None:
        super().__init__()
        self.set_secrets(secrets or [])

    def set_secrets(self, secrets: list[str]) -> None:
        """Mask these from now on (a config reload may bring new ones)."""
        # Masking runs on the encoded line, so also look for each secret as JSON spells it
        # (a secret with a quote or backslash in it is escaped there).
        forms = {f for s in secrets if len(s) >= 4 for f in (s, orjson.dumps(s).decode()[1:-1])}
        self._secrets = sorted(forms, key=len, reverse=True)

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for name in STANDARD_FIELDS:
            line[name] = None
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        text = orjson.dumps(line, default=str).decode()
        return self._mask(text) if self._secrets else text


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


def setup_logging(level: str = "INFO", secrets: list[str] | None = None) -> None:
    """Configure the root logger (called by run.py only)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(ClientProtocolErrors())
