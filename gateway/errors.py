"""The gateway's small exception tree; transport errors are mapped to these at client boundaries."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ModelError(GatewayError):
    """The model backend failed. `reason` is a bounded label for metrics and the user's notice:
    `auth`, `rate_limited` (with `retry_after`), `bad_request`, `conversation_gone` (a backend
    that keeps the history no longer knows the conversation), `conversation_busy` (it still runs an
    earlier answer in that conversation, Coze's 4016), `server_error` (also an error event
    inside the stream), `connection` (unreachable, or dropped mid-answer), `first_token_timeout`,
    `read_timeout`, `timeout` (the whole call's deadline), `bad_response` (unreadable)."""

    def __init__(
        self,
        message: str,
        reason: str = "error",
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class PlatformError(GatewayError):
    """A platform API refused or failed a call. `retryable`: repeating the same call is safe and
    may work (it was not accepted, or repeating it cannot deliver anything twice)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Throttled(PlatformError):
    """The platform refused the call for its rate limit: it was not accepted, so repeating it is
    safe even for a send without an idempotency key, after `retry_after` seconds (the platform's
    own suggestion, or its documented wait)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retryable=True)
        self.retry_after = retry_after


class QuotaExhausted(PlatformError):
    """The platform refused the call because the monthly API quota is used up: nothing helps
    before the quota is renewed, so it is never retried."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class TokenRejected(PlatformError):
    """The platform said the access token is invalid or expired: evict it and retry once."""


class StoreError(GatewayError):
    """The state store is unavailable or refused an operation."""


class StoreInUse(StoreError):
    """Another process holds the store exclusively (a running gateway on the same SQLite file)."""
