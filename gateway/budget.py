"""Counting outbound platform API calls against a monthly budget (platforms cap free quotas)."""

from __future__ import annotations

import time

from .metrics import Metrics

DEGRADE_AT = 0.8


class ApiBudget:
    """Every outbound call is counted (metric by endpoint). With a budget set, `degraded` turns
    true at 80 % of it, and streaming replies fall back to one final update. The count restarts
    each calendar month (UTC) and with the process, which errs on the side of streaming."""

    def __init__(self, platform: str, monthly_budget: int, metrics: Metrics) -> None:
        self.platform = platform
        self.budget = monthly_budget
        self._metrics = metrics
        self._month = self._current_month()
        self.used = 0

    @staticmethod
    def _current_month() -> str:
        return time.strftime("%Y-%m", time.gmtime())

    def record(self, endpoint: str) -> None:
        month = self._current_month()
        if month != self._month:
            self._month, self.used = month, 0
        self.used += 1
        self._metrics.platform_api_calls.labels(self.platform, endpoint).inc()

    @property
    def degraded(self) -> bool:
        return self.budget > 0 and self.used >= DEGRADE_AT * self.budget
