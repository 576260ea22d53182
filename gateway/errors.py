"""The gateway's small exception tree; transport errors are mapped to these at client boundaries."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ModelError(GatewayError):
    """The model endpoint failed. `reason` is a bounded label for metrics."""

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
    """A platform API refused or failed a call."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class TokenRejected(PlatformError):
    """The platform said the access token is invalid or expired: evict it and retry once."""


class StoreError(GatewayError):
    """The state store is unavailable or refused an operation."""


class StoreInUse(StoreError):
    """Another process holds the store exclusively (a running gateway on the same SQLite file)."""
