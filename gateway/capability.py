"""`supports(obj, Protocol)`: `isinstance` against a `@runtime_checkable` protocol, remembered per class.

On Python 3.11 such an `isinstance` collects the protocol's members and looks each one up on every
call (about 10 µs), and an answer asks four of them (upload ahead, working mark, images, files):
about 4 % of the CPU an answer costs. A channel's class does not change what it offers, so the
answer is the same for every instance of a class.
"""

from __future__ import annotations

from typing import TypeGuard, TypeVar

_P = TypeVar("_P")
_known: dict[tuple[type, type], bool] = {}


def supports(obj: object, protocol: type[_P]) -> TypeGuard[_P]:
    """Whether `obj` offers `protocol` (a `@runtime_checkable` protocol of methods only)."""
    key = (type(obj), protocol)
    known = _known.get(key)
    if known is None:
        known = _known[key] = isinstance(obj, protocol)
    return known
