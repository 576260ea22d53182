"""DingTalk channel: our own Stream-mode client, the outgoing-robot webhook, replies and AI cards."""

from __future__ import annotations

from .adapter import DingTalkAdapter, setup

__all__ = ["DingTalkAdapter", "setup"]
