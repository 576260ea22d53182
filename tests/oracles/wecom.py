"""wecom-aibot-python-sdk 1.0.2 (package `aibot`), the official WeCom AI-bot SDK, as the oracle of
tests/doubles/wecom.py and handlers/wecom/crypto.py (docs/protocols/wecom.md §1).

Importing it warns: its `aibot/ws.py` imports `websockets.client.WebSocketClientProtocol`, a
websockets<14 name, which loads the deprecated `websockets.legacy` package. Import it from here,
where those import-time warnings are silenced once; the SDK's client itself runs on websockets'
current asyncio API.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import aibot
    import aibot.ws

WSClient = aibot.WSClient
WSClientOptions = aibot.WSClientOptions
decrypt_file = aibot.decrypt_file
MessageHandler = aibot.MessageHandler
sdk_ws = aibot.ws

__all__ = ["MessageHandler", "WSClient", "WSClientOptions", "decrypt_file", "sdk_ws"]
