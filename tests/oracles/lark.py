"""lark-oapi as a conformance oracle, run in a fresh process (`python tests/oracles/lark.py ...`).

lark_oapi captures an event loop when imported and its ws client blocks that loop forever
(docs/protocols/testing.md §0.4), so it never shares a process with the tests' loop. Every mode ends by itself:
a watchdog exits the process after `DEADLINE` seconds whatever happens.

  frames      stdin: {"specs": [frame spec...], "ours": [hex...]}; stdout: {"encoded": [hex of the SDK's
              SerializeToString for each spec], "decoded": [spec parsed by the SDK from each of ours]}
  ws DOMAIN N run lark's ws.Client against DOMAIN until N events were handled, print one JSON line per
              event, then wait for a line on stdin (the test saw the response frames), print the
              client's ping interval (set by the double's pong) and exit
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from typing import Any

DEADLINE = 45.0


def _spec(frame: Any) -> dict[str, Any]:
    def opt(name: str) -> Any:
        return getattr(frame, name) if frame.HasField(name) else None

    payload = opt("payload")
    return {
        "seq_id": frame.SeqID,
        "log_id": frame.LogID,
        "service": frame.service,
        "method": frame.method,
        "headers": [[h.key, h.value] for h in frame.headers],
        "payload_encoding": opt("payload_encoding"),
        "payload_type": opt("payload_type"),
        "payload": None if payload is None else payload.hex(),
        "log_id_new": opt("LogIDNew"),
    }


def frames() -> None:
    from lark_oapi.ws.pb.pbbp2_pb2 import Frame

    request = json.load(sys.stdin)
    encoded = []
    for spec in request["specs"]:
        frame = Frame()
        frame.SeqID, frame.LogID = spec["seq_id"], spec["log_id"]
        frame.service, frame.method = spec["service"], spec["method"]
        for key, value in spec["headers"]:
            header = frame.headers.add()
            header.key, header.value = key, value
        for name, field in (("payload_encoding", "payload_encoding"), ("payload_type", "payload_type"),
                            ("log_id_new", "LogIDNew")):
            if spec[name] is not None:
                setattr(frame, field, spec[name])
        if spec["payload"] is not None:
            frame.payload = bytes.fromhex(spec["payload"])
        encoded.append(frame.SerializeToString().hex())
    decoded = []
    for data in request["ours"]:
        frame = Frame()
        frame.ParseFromString(bytes.fromhex(data))
        decoded.append(_spec(frame))
    json.dump({"encoded": encoded, "decoded": decoded}, sys.stdout)


def ws(domain: str, expected: int) -> None:
    import lark_oapi as lark
    import lark_oapi.core.log
    import lark_oapi.ws.client as wsc

    lark_oapi.core.log.handler.setStream(sys.stderr)  # stdout carries our JSON lines

    handled = threading.Event()
    count = 0

    def on_message(data: Any) -> None:
        nonlocal count
        message = data.event.message
        print(json.dumps({"message_id": message.message_id, "content": message.content}), flush=True)
        count += 1
        if count >= expected:
            handled.set()

    handler = lark.EventDispatcherHandler.builder("", "").register_p2_im_message_receive_v1(on_message).build()
    client = lark.ws.Client("cli_test", "secret-test", event_handler=handler, domain=domain,
                            log_level=lark.LogLevel.INFO)

    def run() -> None:
        wsc.loop = asyncio.new_event_loop()  # a private loop in this thread (docs/protocols/feishu.md §B.11)
        asyncio.set_event_loop(wsc.loop)
        client.start()

    threading.Thread(target=run, name="lark-ws", daemon=True).start()
    if not handled.wait(DEADLINE):
        print(json.dumps({"error": f"only {count} of {expected} events handled"}), flush=True)
        os._exit(2)
    sys.stdin.readline()
    print(json.dumps({"ping_interval": client._ping_interval}), flush=True)
    os._exit(0)  # start() never returns and has no stop API: leave without waiting for it


def main() -> None:
    watchdog = threading.Timer(DEADLINE + 5, os._exit, [3])
    watchdog.daemon = True
    watchdog.start()
    if sys.argv[1] == "frames":
        frames()
    elif sys.argv[1] == "ws":
        ws(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")


if __name__ == "__main__":
    main()
