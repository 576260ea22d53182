"""What every group-robot sender shares, whatever the platform (the senders themselves, signed and
shaped per platform, are in `handlers/robots/`): the message, how a refusal is told from a
throttle, the size cut, and the shared rate-limit bucket.

A robot answers HTTP 200 even when it refuses a post, with an error code inside the body; a
sender reads it and raises:
- `Throttled` (`gateway.errors`): the platform's rate limit; nothing was posted, try again after
  `retry_after`;
- `RobotRefused`: the robot will not take it as configured (bad key, signature, keyword, content);
  repeating the same post cannot help;
- `PlatformError` (retryable): the robot was unreachable or answered 5xx.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from .errors import PlatformError, Throttled
from .store import Store

CUT_MARKER = "\n…"  # ends a message cut to the platform's size: visible, and the same in every language
BUCKET_WAIT = 8.0  # seconds a post waits for a token of its robot's bucket before it counts as throttled


@dataclass(frozen=True, slots=True)
class RobotMessage:
    """One post to a group robot. `title`: the notification preview of a markdown message."""

    text: str
    markdown: bool = False
    title: str = ""


class RobotRefused(PlatformError):
    """The robot refused the post for a reason repeating it cannot fix: `code` is the platform's
    error code (0 when it answered without one), `reason` says what it means in plain words."""

    def __init__(self, robot: str, code: int, reason: str) -> None:
        super().__init__(f"the {robot} robot refused the post: {code} {reason}", retryable=False)
        self.robot = robot
        self.code = code
        self.reason = reason


class RobotSender(Protocol):
    """A configured group robot: `name` is its platform ("dingtalk", "feishu", "wecom")."""

    name: str

    def content_limit(self, markdown: bool) -> int:
        """The most UTF-8 bytes of text one post carries (what a renderer should stay within)."""

    async def send(self, message: RobotMessage) -> None:
        """Post `message`; raises `Throttled`, `RobotRefused` or a retryable `PlatformError`."""


def cut_to_bytes(text: str, limit: int, marker: str = CUT_MARKER) -> str:
    """`text` if it fits in `limit` UTF-8 bytes, else its longest prefix that fits with `marker`
    after it (never half a character)."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    room = max(0, limit - len(marker.encode()))
    return raw[:room].decode(errors="ignore") + marker


async def take_robot_token(
    store: Store,
    name: str,
    per_minute: int,
    wait: float = BUCKET_WAIT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Take a token from robot `name`'s bucket (in the store, so shared by every instance on it),
    waiting up to `wait` seconds for one to refill; `Throttled` when none came. Waiting briefly
    beats posting: over its limit a DingTalk robot is blocked for ten minutes."""
    refill = 60.0 / per_minute  # one token comes back this often
    deadline = clock() + wait
    while not await store.take_token(f"robot:{name}", per_minute):
        left = deadline - clock()
        if left <= 0:
            raise Throttled(f"the {name} robot's rate limit ({per_minute} a minute) is used up", retry_after=refill)
        await sleep(min(refill, left))
