"""App-wide rate limits in front of the platform APIs, so a burst of answers queues instead of
being throttled (docs/protocols/dingtalk.md §A.9, docs/protocols/feishu.md §B.13).

The platforms count calls per app and API ("at most 20 calls a second to each API"), some also per
chat ("5 messages a second to one chat") and per minute ("1000 a minute and 50 a second"). A
`RateLimiter` keeps one `Window` per (API, scope) and makes each call wait for its turn, for every
`Rate` of its API:

* a rate per second or less is kept by spacing: one start every `per / count` seconds, so no
  burst lands in one of the platform's windows, however it places them;
* a longer rate (per minute) by a sliding window: a call starts once fewer than `count` calls
  started in the last `per` seconds, so calls may come as fast as the shorter rates allow.

Both keep `MARGIN` (10 %) below the platform's figure: the platform counts arrivals, which network
jitter moves around, not our starts.

* Fair: turns are handed out in the order callers arrive, so nobody is overtaken for ever.
* No polling: a turn is reserved at once and the caller sleeps exactly until it comes.
* `hold(api, seconds)`: the platform throttled us anyway (another process, a stricter plan), so
  nobody calls that API again before the delay it asked for.

A cancelled waiter keeps its reserved turn (it expires unused): simpler than re-planning every
later turn, and it only ever makes the limiter slower, never faster, than allowed. One limiter
belongs to one bot (`Adapter`): two bots are two apps with quotas of their own.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

MAX_WINDOWS = 4096  # scoped windows kept before idle ones are forgotten (chats come and go)
MARGIN = 0.1  # calls are spaced and windows stretched by this much beyond the platform's rate
SPACED = 1.0  # rates over at most this many seconds are kept by spacing, longer ones by a window


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `count` calls in any `per` seconds."""

    count: int
    per: float = 1.0

    def __post_init__(self) -> None:
        if self.count < 1 or self.per <= 0:
            raise ValueError(f"a rate needs count >= 1 and per > 0, got {self.count}/{self.per}s")


def per_second(count: float) -> tuple[Rate, ...]:
    """`count` calls a second; 0 (or less) means no limit. A fraction (0.5) becomes 1 per 2 s."""
    if count <= 0:
        return ()
    if count >= 1:
        return (Rate(int(count)),)
    return (Rate(1, 1 / count),)


class Window:
    """The start times of the latest calls of one (API, scope), reserved in order."""

    def __init__(self, rates: Sequence[Rate]) -> None:
        self._rates = tuple(rates)
        self._gap = max((r.per / r.count * (1 + MARGIN) for r in self._rates if r.per <= SPACED), default=0.0)
        self._windows = tuple((r.count, r.per * (1 + MARGIN)) for r in self._rates if r.per > SPACED)
        self._starts: deque[float] = deque(maxlen=max((count for count, _ in self._windows), default=0))
        self._last = -math.inf  # the latest turn handed out: turns never go backwards (fairness)
        self._held_until = -math.inf

    def reserve(self, now: float) -> float:
        """The earliest start that keeps every rate, no earlier than any turn handed out before."""
        at = max(now, self._last + self._gap, self._held_until)
        starts = self._starts
        for count, per in self._windows:
            if len(starts) >= count:
                at = max(at, starts[-count] + per)
        starts.append(at)
        self._last = at
        return at

    def hold(self, until: float) -> None:
        self._held_until = max(self._held_until, until)

    def idle(self, now: float) -> bool:
        """Nothing it remembers still matters: forgetting it changes no future turn."""
        longest = max((r.per * (1 + MARGIN) for r in self._rates), default=0.0)
        return self._last + longest <= now and self._held_until <= now


class RateLimiter:
    """Windows by API name (`apis`, else `default`) and, for the APIs in `scoped`, one more per
    scope (a chat). A call waits for its scoped turn first, then for the app-wide one: so a busy
    chat never takes app-wide turns it cannot use yet."""

    def __init__(
        self,
        apis: Mapping[str, Sequence[Rate]] | None = None,
        default: Sequence[Rate] = (),
        scoped: Mapping[str, Sequence[Rate]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._apis = dict(apis or {})
        self._default = tuple(default)
        self._scoped = dict(scoped or {})
        self._clock = clock
        self._windows: dict[tuple[str, str], Window] = {}

    def rates(self, api: str) -> tuple[Rate, ...]:
        return tuple(self._apis.get(api, self._default))

    async def acquire(self, api: str, scope: str = "") -> float:
        """Wait for this call's turn; returns the seconds waited."""
        waited = 0.0
        if scope and (rates := self._scoped.get(api)):
            waited += await self._wait((api, scope), rates)
        rates = self.rates(api)
        if rates or (api, "") in self._windows:  # unlimited, but maybe held after a throttle
            waited += await self._wait((api, ""), rates)
        return waited

    def hold(self, api: str, seconds: float, scope: str = "") -> None:
        """No call of `api` starts within the next `seconds`: in `scope` when given and limited
        (a throttled reply holds back its chat, not every chat), else anywhere."""
        key = (api, scope) if scope and api in self._scoped else (api, "")
        window = self._windows.get(key)
        if window is None:  # an API without a limit of its own still waits as it was told
            window = self._windows[key] = Window(self.rates(api) if key[1] == "" else self._scoped[api])
        window.hold(self._clock() + seconds)

    async def _wait(self, key: tuple[str, str], rates: Sequence[Rate]) -> float:
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= MAX_WINDOWS:
                self._forget_idle()
            window = self._windows[key] = Window(rates)
        now = self._clock()
        delay = window.reserve(now) - now
        if delay > 0:
            await asyncio.sleep(delay)
            return delay
        return 0.0

    def _forget_idle(self) -> None:
        now = self._clock()
        for key in [k for k, w in self._windows.items() if k[1] and w.idle(now)]:
            del self._windows[key]
