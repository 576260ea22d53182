"""WeCom (企业微信) AI bot channel: the long connection, its callback mode, streamed answers."""

from __future__ import annotations

from .adapter import WeComAdapter, setup

__all__ = ["WeComAdapter", "setup"]
