"""botgate core: config, app factory, dispatcher, model client, store, metrics, logging.

The core knows no platform; adapters in `handlers/` convert platform events to `InboundMessage`.
"""

__version__ = "0.1.0"
