"""The verdict on one delivered event, from the dispatcher to every stream session and webhook.

`Admission` says what the platform gets back: an acknowledgement (the event is in the inbox, was
seen before, was answered "busy", or was deliberately dropped), or none (store down, shutting
down), so that the platform delivers it again later. A long-connection session decides at once for
an event that is dropped, and otherwise gets a `Submission`: the submit to run in its
conversation's order, whose `Admission` then answers the frame.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum


class Admission(StrEnum):
    ACCEPTED = "accepted"  # in the inbox; ACK the platform
    DUPLICATE = "duplicate"  # seen before; ACK and forget
    BUSY = "busy"  # queue full; the sender was told; ACK
    DROPPED = "dropped"  # deliberately not answered (filtered, not addressed, our own); ACK
    MALFORMED = "malformed"  # not a message at all: a redelivery would be just as broken; ACK (webhooks: 400)
    UNAVAILABLE = "unavailable"  # store or platform lookup down: do NOT ACK, let the platform redeliver
    # The store refused it: held in this process's memory and answered once the store takes it
    # (gateway/spill.py). Not ACKed all the same: a crash before then loses it, and a platform
    # redelivery (if one comes) is then its second chance; one arriving earlier is recognised.
    SPILLED = "spilled"
    CLOSED = "closed"  # shutting down: do NOT ACK (webhooks answer 503)

    @property
    def acknowledge(self) -> bool:
        return self not in (Admission.UNAVAILABLE, Admission.SPILLED, Admission.CLOSED)


@dataclass(frozen=True, slots=True)
class Dropped:
    """A delivery deliberately not answered, as a platform parser says. `reason` is a bounded
    metric label ("malformed", "self", "bot", "not_mentioned", "filtered", "stale", ...)."""

    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Submission:
    """A parsed stream message: its conversation key and the call that submits it."""

    key: str
    submit: Callable[[], Awaitable[Admission]]


# What an adapter answers a session for one event: decided now, or a submit to run in order.
Verdict = Admission | Submission
