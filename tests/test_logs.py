"""JSON log lines: the fields ops query on, and configured secrets never written."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest

from gateway.keys import DISPATCHER
from gateway.logs import JsonFormatter
from tests.conftest import make_config

SECRETS: dict[str, dict[str, Any]] = {
    "model": {"api_keys": ["sk-log-secret-0001", "sk-log-secret-0002"]},
    "admin": {"password": "hunter2-admin-pass", "jwt_secret": 'jwt"with\\quote-and-enough-bytes-for-32'},
}


@pytest.fixture
def captured() -> Iterator[tuple[logging.Handler, io.StringIO]]:
    """A root handler writing JSON lines into a buffer (the formatter is set by the test)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler, stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


async def chat(client: Any, session: str, text: str) -> dict[str, Any]:
    # An admin password is set, so the web chat needs a login (docs/status.md).
    password = SECRETS["admin"]["password"]
    login = await client.post("/login", json={"password": password})
    bearer = {"Authorization": f"Bearer {(await login.json())['token']}"}
    async with client.ws_connect(f"/chat/ws?session={session}", headers=bearer) as ws:
        await ws.receive_json()
        await ws.send_json({"type": "message", "id": "m1", "text": text})
        async with asyncio.timeout(10):
            while (frame := await ws.receive_json())["type"] not in ("done", "notice"):
                pass
    await client.server.app[DISPATCHER].wait_idle()  # its log lines are written by now
    return dict(frame)


async def test_answered_line_has_the_fields_ops_query(
    gateway: Any, openai_double: Any, captured: Any
) -> None:
    _, url = openai_double
    config = make_config(model={"base_url": url, **SECRETS["model"]}, admin=SECRETS["admin"])
    handler, stream = captured
    handler.setFormatter(JsonFormatter(config.secrets()))
    client = await gateway(config)
    await chat(client, "logsession1", "how are you")

    answered = [line for line in lines(stream) if line["message"] == "answered"]
    assert len(answered) == 1
    line = answered[0]
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == timedelta(0)  # ISO-8601, UTC
    assert line["level"] == "INFO"
    assert re.fullmatch(r"[0-9a-f]{16}", line["request_id"])
    assert line["user_id"] == "web:127.0.0.1"  # a web chat user is its client address
    # The server-issued session's id names the message (never the whole session: docs/security.md).
    assert line["platform"] == "web" and re.fullmatch(r"[0-9a-f]{16}:m1", line["message_id"])
    assert line["model_version"] == "gpt-4o-mini-0613"  # as the server reported it
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] > 0
    assert 0 <= line["overhead_ms"] <= line["latency_ms"]
    assert 0 <= line["model_ms"] <= line["latency_ms"]
    assert line["cached"] is False
    assert (line["prompt_tokens"], line["completion_tokens"]) == (7, 4)
    # Every line carries the standard keys, null when unknown, so queries never miss a key.
    for other in lines(stream):
        assert {"timestamp", "level", "message", "request_id", "user_id", "latency_ms", "model_version"} <= set(other)


async def test_secrets_never_reach_the_log(gateway: Any, openai_double: Any, captured: Any) -> None:
    double, url = openai_double
    # Real APIs echo the offending key in their error body (OpenAI: "Incorrect API key
    # provided: sk-..."); our error line quotes that body.
    double.script = [400]
    double.error_body = "Incorrect API key provided: sk-log-secret-0001 (admin hunter2-admin-pass)"
    config = make_config(model={"base_url": url, **SECRETS["model"]}, admin=SECRETS["admin"])
    handler, stream = captured
    handler.setFormatter(JsonFormatter(config.secrets()))
    client = await gateway(config)
    notice = await chat(client, "logsession2", "trigger the error")
    assert notice["type"] == "done" and "模型现在没有响应" in notice["text"]  # the model-down notice, in Chinese
    logging.getLogger("gateway.test").warning("quoted %s", SECRETS["admin"]["jwt_secret"])

    text = stream.getvalue()
    assert "model failed" in text
    for secret in config.secrets():
        assert secret not in text
    assert "jwt\\\"with" not in text  # not even in its JSON-escaped form
    failed = next(line for line in lines(stream) if line["message"].startswith("model failed"))
    assert "Incorrect API key provided: ***" in failed["message"]
    assert failed["request_id"] and failed["reason"] == "bad_request"
    assert lines(stream)[-1]["message"] == "quoted ***"
