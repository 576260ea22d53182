"""Allow/deny lists of sender and conversation ids, shared by the platform adapters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AccessList:
    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()

    @classmethod
    def of(cls, allow: Iterable[str], deny: Iterable[str]) -> AccessList:
        return cls(frozenset(allow), frozenset(deny))

    def permits(self, ident: str) -> bool:
        """Deny wins; an empty allow list allows everyone."""
        if ident in self.deny:
            return False
        return not self.allow or ident in self.allow
