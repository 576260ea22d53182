"""Reading values out of platform JSON without trusting its types: a wrong type reads as empty."""

from __future__ import annotations

from typing import Any


def as_str(value: object) -> str:
    return value if isinstance(value, str) else ""


def as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
