"""Conformance: lark-oapi's own ws client (in a fresh process, see tests/oracles/lark.py) against
the Feishu double proves the double speaks the real protocol botgate is tested with."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from handlers.feishu.api import SDK_USER_AGENT
from tests.doubles import feishu as fd
from tests.doubles.feishu_events import message_event

ORACLE = Path(__file__).parent / "oracles" / "lark.py"


async def test_lark_oapi_client_receives_events_and_answers_them(aiohttp_server: Callable[..., Any]) -> None:
    double, domain = await fd.start(aiohttp_server)
    double.pong_config = {"PingInterval": 7, "ReconnectCount": -1, "ReconnectInterval": 3, "ReconnectNonce": 0}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ORACLE), "ws", domain, "2",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await double.wait_for(lambda: double.pings >= 1, timeout=60)  # importing lark_oapi is slow
        whole = await double.push_event(message_event("one frame", message_id="om_c1"))
        split = await double.push_event(message_event("three frames", message_id="om_c2"), parts=3, order=[1, 2, 0])
        assert await double.response(whole, timeout=30) == {"code": 200}
        assert await double.response(split, timeout=30) == {"code": 200}
        out, err = await asyncio.wait_for(proc.communicate(b"done\n"), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [line.get("message_id") for line in lines[:2]] == ["om_c1", "om_c2"]
    assert orjson.loads(lines[1]["content"]) == {"text": "three frames"}
    assert lines[2] == {"ping_interval": 7}  # the pong's ClientConfig was understood
    # The SDK's response frame: the event frame's headers plus biz_rt (only the completing part).
    frames = [f for f in double.response_frames if f.header("message_id") == split]
    assert len(frames) == 1 and frames[0].header("seq") == "0" and frames[0].header("biz_rt") is not None
    assert double.endpoint_calls == 1 and double.connections == 1
    # The endpoint call's headers botgate copies (handlers/feishu/api.py): `locale` and the SDK's
    # agent, whose version token is the protocol version botgate names.
    [sdk] = double.endpoint_headers
    assert sdk["locale"] == "zh" and sdk["User-Agent"] == SDK_USER_AGENT.split()[0]
