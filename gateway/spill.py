"""`Spill`: the messages the store could not take, held in this process's memory per conversation,
oldest first, until the dispatcher gets them into the inbox.

Why: a platform's redelivery is no safety net to lean on. DingTalk's developer wiki calls robot
messages fire-and-forget, and Feishu documents a redelivery for an event left unanswered, not for
one answered `{"code": 500}` (docs/protocols/dingtalk.md §A.7, docs/state.md). So a message that
arrives while the store is down is kept here and answered once the store is back, in its
conversation's order; the platform is still not acknowledged, so that if it does redeliver, a
crash meanwhile loses nothing the redelivery cannot bring back.

Bounded by `[dispatcher] spill_max`: when full, the newest message is refused (its sender is told
"busy", as with a full queue). The oldest are kept: they have waited longest, and a later message
of their conversation would lose its context without them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from .messages import InboundMessage


class Spill:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Conversation key -> its held messages, oldest first; conversations in the order their
        # first message was held.
        self._held: dict[str, deque[InboundMessage]] = {}
        self._keys: set[str] = set()  # dedup keys held: a redelivery is recognised
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[InboundMessage]:
        return (message for queue in self._held.values() for message in queue)

    @property
    def full(self) -> bool:
        return self._count >= self.limit

    def holds(self, message: InboundMessage) -> bool:
        """This message (by its dedup key) is held: a redelivery of one."""
        return message.dedup_key in self._keys

    def holds_conversation(self, key: str) -> bool:
        """Messages of conversation `key` are held: a later one must not get ahead of them."""
        return key in self._held

    def add(self, message: InboundMessage) -> None:
        self._held.setdefault(message.conversation_key, deque()).append(message)
        self._keys.add(message.dedup_key)
        self._count += 1

    def first_conversation(self) -> str:
        """The conversation held longest."""
        return next(iter(self._held))

    def head(self, key: str) -> InboundMessage:
        return self._held[key][0]

    def pop(self, key: str) -> InboundMessage:
        """Release conversation `key`'s oldest message (it is in the inbox now, or was refused)."""
        queue = self._held[key]
        message = queue.popleft()
        if not queue:
            del self._held[key]
        self._keys.discard(message.dedup_key)
        self._count -= 1
        return message
