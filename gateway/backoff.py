"""Capped exponential backoff with jitter, shared by reconnect loops and retrying clients."""

from __future__ import annotations

import random


class Backoff:
    """Delays `first * factor**n`, capped, each scaled by a random factor in [1 - jitter, 1].

    With the defaults the first retry comes within 1 s and later ones never exceed 60 s. Call
    `reset()` after a success so the next failure starts small again.
    """

    def __init__(
        self, first: float = 1.0, cap: float = 60.0, factor: float = 2.0, jitter: float = 0.5
    ) -> None:
        self.first, self.cap, self.factor, self.jitter = first, cap, factor, jitter
        self.attempt = 0

    def next(self) -> float:
        base = min(self.cap, self.first * self.factor**self.attempt)
        self.attempt += 1
        return base * (1.0 - self.jitter * random.random())

    def reset(self) -> None:
        self.attempt = 0
