"""`OrderedIntake`: a long-connection session's frames handled concurrently across conversations,
in arrival order within one conversation, bounded, and owned by the session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from types import TracebackType

from .admission import Admission, Submission, Verdict

log = logging.getLogger(__name__)

# Frames in flight per session. When full, the session stops reading: the platform's own flow
# control (un-ACKed frames) then slows the sender instead of our memory growing.
MAX_IN_FLIGHT = 1024
# On a session end other than cancellation, in-flight submits may finish (they take milliseconds;
# an accepted message is then in the inbox even if its ACK can no longer be sent).
DRAIN_TIMEOUT = 2.0


# How a session answers the platform for one event (an ACK frame, a response frame).
Respond = Callable[[Admission], Awaitable[None]]


class OrderedIntake:
    """Why: a session that awaited `dispatcher.submit()` per frame capped intake at one store
    commit per frame (~1.8 ms with SQLite) while the core idled; overlapping submits share one
    group commit. Order still matters within a conversation (the dispatcher queues per
    conversation in arrival order), so each task of a key first waits for the previous one.

    Use as `async with OrderedIntake() as intake:` around the read loop; `await intake.handle(
    verdict, respond)` per event frame. Leaving the block drains (bounded) or, on cancellation,
    cancels the tasks."""

    def __init__(self, limit: int = MAX_IN_FLIGHT, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._drain_timeout = drain_timeout
        self._tails: dict[str, asyncio.Task[None]] = {}  # the last task of each busy key
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def keys(self) -> int:
        """Conversations with work in flight (for tests: finished keys are forgotten)."""
        return len(self._tails)

    async def wait_idle(self) -> None:
        """Until no work is in flight: every frame put so far was handled."""
        await self._idle.wait()

    async def handle(self, verdict: Verdict, respond: Respond) -> None:
        """Answer a verdict decided at once right away; run a `Submission` after the earlier work
        of its conversation, then answer with its admission."""
        if isinstance(verdict, Admission):
            await respond(verdict)
        else:
            await self.put(verdict.key, partial(_submit_then_respond, verdict, respond))

    async def put(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        """Start `work` after the previous work of `key`; waits while `limit` frames are in flight."""
        await self._slots.acquire()
        task = asyncio.create_task(self._run(key, self._tails.get(key), work))
        self._tails[key] = task
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def _run(
        self, key: str, previous: asyncio.Task[None] | None, work: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            if previous is not None and not previous.done():
                await asyncio.wait((previous,))  # its outcome is its own; only the order matters
            await work()
        except ConnectionError as e:  # the link went away: no ACK, the platform redelivers
            log.debug("frame answer not sent: %s", e)
        except Exception:  # one bad frame must not stop the others
            log.exception("frame handling failed")
        finally:
            self._slots.release()
            if self._tails.get(key) is asyncio.current_task():
                del self._tails[key]

    async def __aenter__(self) -> OrderedIntake:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._tasks and not isinstance(exc, asyncio.CancelledError):
                await asyncio.wait(tuple(self._tasks), timeout=self._drain_timeout)
        finally:
            pending = tuple(self._tasks)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


async def _submit_then_respond(submission: Submission, respond: Respond) -> None:
    """Submit one message, then answer its frame. Answers may leave in any order: each names its
    frame, and the platforms' own SDKs handle frames concurrently too."""
    try:
        admission = await submission.submit()
    except Exception:  # answered as not accepted: the platform delivers it again
        log.exception("submit failed")
        admission = Admission.UNAVAILABLE
    await respond(admission)
