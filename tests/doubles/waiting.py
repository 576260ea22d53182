"""What wakes a test on a double: `wait_for(predicate)` re-checks after every `_notify()`, the call a
double makes whenever it records something, so tests await events instead of sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Waitable:
    """Mixed into a (dataclass) double, which declares
    `_changed: asyncio.Condition = field(default_factory=asyncio.Condition)`."""

    _changed: asyncio.Condition

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)
