"""The platform's monthly API quota as a budget botgate sees (platforms cap free plans: a DingTalk
standard org 5,000 calls a month, Feishu's free plan 10,000; docs/dingtalk.md, docs/feishu.md).

Two counts: every outbound call attempt (`record`, the `botgate_platform_api_calls_total` metric by
endpoint), and the billable ones (`charge`): calls the quota counts, i.e. successful calls of APIs
the platform does not exempt (tokens are exempt on both, failed calls count on neither). Billable
calls are also counted per answer: the responder opens a `CallCount` around each message
(`counting`), and every charge made while answering it, in whatever task, lands there.

With `monthly_api_budget` set the budget has three states: below 80 % all is normal; from 80 %
(`degraded`) cards update only at the end; at 100 %, or as soon as the platform refuses a call
because its quota is exhausted (`refused`), it is `spent` and replies take the cheapest path. The
count restarts with each calendar month (China time, where both platforms count) and with the
process; a refusal by the platform holds until the month ends whatever the count says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum

from .metrics import Metrics

log = logging.getLogger(__name__)

DEGRADE_AT = 0.8
QUOTA_TZ_OFFSET = 8 * 3600  # UTC+8: the platforms' quotas renew on the 1st of a month, China time


class BudgetState(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"  # >= 80 % used: cards update only at the end
    SPENT = "spent"  # 100 % used or refused by the platform: replies take the cheapest path


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A snapshot for the status page and alerts."""

    month: str
    used: int
    budget: int  # 0 = none set
    state: BudgetState
    refused: str = ""  # the platform's own "quota exhausted" answer this month, if it gave one

    @property
    def ratio(self) -> float | None:
        return self.used / self.budget if self.budget > 0 else None


@dataclass(slots=True)
class CallCount:
    """The billable platform calls made while answering one message."""

    calls: int = 0


_answering: ContextVar[CallCount | None] = ContextVar("botgate_answer_calls", default=None)


@contextmanager
def counting(count: CallCount) -> Iterator[CallCount]:
    """Charge every billable call made in this context (and tasks started from it) to `count`."""
    token = _answering.set(count)
    try:
        yield count
    finally:
        _answering.reset(token)


def quota_month(now: float | None = None) -> str:
    return time.strftime("%Y-%m", time.gmtime((time.time() if now is None else now) + QUOTA_TZ_OFFSET))


class ApiBudget:
    def __init__(self, platform: str, monthly_budget: int, metrics: Metrics, bot: str = "default") -> None:
        self.platform = platform
        self.bot = bot
        self.budget = monthly_budget
        self._metrics = metrics
        self._month = quota_month()
        self.used = 0
        self._refused = ""
        self._logged = BudgetState.OK
        self._used_gauge = metrics.api_budget_used.labels(platform, bot)
        self._ratio_gauge = metrics.api_budget_ratio.labels(platform, bot)
        self._spent_gauge = metrics.api_quota_spent.labels(platform, bot)

    def _roll(self) -> None:
        month = quota_month()
        if month != self._month:
            self._month, self.used, self._refused, self._logged = month, 0, "", BudgetState.OK
            self._publish()

    def record(self, endpoint: str) -> None:
        """One outbound call attempt (billable or not, successful or not)."""
        self._metrics.platform_api_calls.labels(self.platform, endpoint).inc()

    def throttled(self, endpoint: str) -> None:
        """The platform refused a call for its rate limit (the quota does not count it)."""
        self._metrics.platform_throttled.labels(self.platform, endpoint).inc()

    def charge(self, endpoint: str) -> None:
        """One successful call the platform's quota counts."""
        self._roll()
        self.used += 1
        count = _answering.get()
        if count is not None:
            count.calls += 1
        self._publish()

    def refuse(self, detail: str) -> None:
        """The platform refused a call because its monthly quota is exhausted."""
        self._roll()
        if not self._refused:
            self._refused = detail
        self._publish()

    @property
    def state(self) -> BudgetState:
        self._roll()
        if self._refused or (self.budget > 0 and self.used >= self.budget):
            return BudgetState.SPENT
        if self.budget > 0 and self.used >= DEGRADE_AT * self.budget:
            return BudgetState.DEGRADED
        return BudgetState.OK

    @property
    def degraded(self) -> bool:
        """80 % or more used (or spent): cards update only at the end."""
        return self.state is not BudgetState.OK

    @property
    def spent(self) -> bool:
        """Nothing left this month: replies take the cheapest path."""
        return self.state is BudgetState.SPENT

    def status(self) -> BudgetStatus:
        return BudgetStatus(self._month, self.used, self.budget, self.state, self._refused)

    def _publish(self) -> None:
        state = self.state
        self._used_gauge.set(self.used)
        self._ratio_gauge.set(self.used / self.budget if self.budget > 0 else 0)
        self._spent_gauge.set(1 if state is BudgetState.SPENT else 0)
        if state is self._logged:
            return
        fields = {"platform": self.platform, "bot": self.bot, "used": self.used, "budget": self.budget}
        if state is BudgetState.SPENT:
            why = f"the platform refused a call: {self._refused}" if self._refused else "the budget is used up"
            log.error(
                "API quota spent (%s): no cards, replies take the cheapest path until the month ends",
                why,
                extra=fields,
            )
        elif state is BudgetState.DEGRADED:
            log.warning("API budget 80 % used: cards update only at the end", extra=fields)
        self._logged = state
