"""Feishu/Lark channel: our own long-connection client, webhook fallback, replies, streaming cards."""

from __future__ import annotations

from .adapter import FeishuAdapter, setup

__all__ = ["FeishuAdapter", "setup"]
