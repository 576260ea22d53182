"""The Feishu long connection against the double: pings and ClientConfig, multi-part events,
response frames, liveness, reconnects, and the pieces behind them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.channel import ChannelState
from gateway.config import FeishuConfig
from gateway.keys import CHANNELS, DISPATCHER, METRICS
from handlers.feishu import FeishuAdapter
from handlers.feishu.api import SDK_USER_AGENT
from handlers.feishu.ws import REFUSED_RETRY, ClientConfig, Reassembler, ServerPacedBackoff
from tests.doubles import feishu as fd
from tests.doubles.feishu_events import message_event
from tests.feishu_env import answered
from tests.helpers import readiness

Client = TestClient[web.Request, web.Application]


async def test_connected_and_ready(feishu_gateway: Any, feishu: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    status = client.app[CHANNELS]["feishu/default"].status()
    assert status.state is ChannelState.CONNECTED and status.transports == ("ws",)
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["channels"]["feishu/default"] == "connected"
    assert double.endpoint_calls == 1 and double.connections == 1


async def test_pong_client_config_sets_the_ping_interval(feishu_gateway: Any, feishu: Any) -> None:
    double, _ = feishu
    double.pong_config = {"PingInterval": 0.05, "ReconnectCount": -1, "ReconnectInterval": 1, "ReconnectNonce": 0}
    await feishu_gateway()
    # The first pong carries the new interval; pings then come every 50 ms instead of every 120 s.
    await double.wait_for(lambda: double.pings >= 4)
    assert double.connections == 1  # the faster pace is kept, not mistaken for a dead link


async def test_event_split_into_parts_answered_once(feishu_gateway: Any, feishu: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    frame_id = await double.push_event(message_event("in three parts", message_id="om_p"), parts=3, order=[2, 0, 1])
    assert await double.response(frame_id) == {"code": 200}
    assert await answered(client, double, "om_p") == "echo: in three parts"
    # Only the frame completing the event is answered, with that frame's headers.
    (response,) = [f for f in double.response_frames if f.header("message_id") == frame_id]
    assert response.header("seq") == "1" and response.header("sum") == "3"


async def test_not_accepted_event_is_answered_500_for_redelivery(feishu_gateway: Any, feishu: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    client.app[DISPATCHER].stop_intake()  # as while shutting down
    frame_id = await double.push_event(message_event("too late", message_id="om_late"))
    assert await double.response(frame_id) == {"code": 500}
    assert double.responses[frame_id].header("biz_rt") is None


async def test_unreadable_event_acknowledged_and_counted(feishu_gateway: Any, feishu: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    frame_id = await double.push_event({"schema": "2.0", "header": {"event_type": "im.message.receive_v1"}})
    assert await double.response(frame_id) == {"code": 200}
    value = client.app[METRICS].registry.get_sample_value(
        "botgate_messages_dropped_total", {"platform": "feishu", "reason": "malformed"}
    )
    assert value == 1


async def test_stale_connection_detected_and_replaced(feishu_gateway: Any, feishu: Any) -> None:
    double, _ = feishu
    double.client_config["PingInterval"] = 0.2
    client = await feishu_gateway()
    double.pong = False  # the socket stays open, but nobody answers: "connected but deaf"
    await double.wait_for(lambda: double.connections == 2)
    status = client.app[CHANNELS]["feishu/default"].status()
    assert "StaleConnection" in status.last_error and status.reconnects == 1
    double.pong = True
    await double.wait_for(lambda: client.app[CHANNELS]["feishu/default"].status().state is ChannelState.CONNECTED)
    await double.push_event(message_event("still there?", message_id="om_st"))
    assert await answered(client, double, "om_st") == "echo: still there?"
    assert client.app[METRICS].registry.get_sample_value("botgate_reconnects_total", {"platform": "feishu"}) == 1


async def test_socket_without_any_pong_replaced_within_a_minute(feishu_gateway: Any, feishu: Any) -> None:
    """The server's ping interval stays at its default 120 s, so ping frames alone would need 240 s
    to notice; websocket pings notice in `stale_after` (40 s by default, 0.3 s here)."""
    double, _ = feishu
    assert FeishuConfig().stale_after <= 60
    client = await feishu_gateway(feishu={"stale_after": 0.3})
    double.pong, double.ws_pong = False, False  # open, but nothing comes back at all
    await double.wait_for(lambda: double.connections == 2)
    status = client.app[CHANNELS]["feishu/default"].status()
    assert "StaleConnection" in status.last_error and "not even a pong" in status.last_error
    assert double.ws_pings >= 1 and double.pings == 1  # the one ping frame sent on connecting


async def test_websocket_pongs_keep_a_quiet_socket(feishu_gateway: Any, feishu: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway(feishu={"stale_after": 0.5})
    # No event, no ping frame due for 120 s: only websocket pongs (pings every 0.25 s) prove the link.
    await double.wait_for(lambda: double.ws_pings >= 6)
    assert double.connections == 1 and client.app[CHANNELS]["feishu/default"].status().reconnects == 0


async def test_closed_socket_reconnects_and_next_message_answered(feishu_gateway: Any, feishu: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    await double.close_sockets()
    await double.wait_for(lambda: double.connections == 2 and double.sockets)
    assert double.endpoint_calls == 2  # a fresh endpoint call per connection, as the SDK does
    await double.push_event(message_event("after the break", message_id="om_r"))
    assert await answered(client, double, "om_r") == "echo: after the break"
    assert double.bot_info_calls == 1  # fetched once, not per connection


async def test_refused_credentials_reported_and_retried(feishu: Any, gateway: Any) -> None:
    double, domain = feishu
    client: Client = await gateway(fd.config(domain, feishu={"app_secret": "wrong"}))
    await double.wait_for(lambda: "app secret invalid" in client.app[CHANNELS]["feishu/default"].status().last_error)
    status = client.app[CHANNELS]["feishu/default"].status()
    assert status.state is ChannelState.RECONNECTING
    resp = await client.get("/readyz")
    assert resp.status == 503 and "feishu/default reconnecting" in (await resp.json())["reason"]


async def test_transient_refused_upgrade_reported_and_retried(feishu: Any, gateway: Any) -> None:
    double, domain = feishu
    double.refuse_ws, double.refuse_ws_status, double.refuse_ws_autherrcode = "auth busy", 514, "1000040343"
    double.client_config["ReconnectInterval"] = 0  # retries as fast as the backoff allows
    client: Client = await gateway(fd.config(domain))
    channel = client.app[CHANNELS]["feishu/default"]
    await double.wait_for(lambda: double.refusals >= 2)  # retried without anyone asking
    status = channel.status()
    assert status.state is ChannelState.RECONNECTING
    assert "handshake refused: HTTP 514, handshake-status 514 auth busy, autherrcode 1000040343" in status.last_error
    double.refuse_ws = ""
    await double.wait_for(lambda: channel.status().state is ChannelState.CONNECTED and double.sockets)


@pytest.mark.parametrize(
    ("status", "autherrcode", "why"),
    [(514, "1000040350", "too many connections"), (403, "", "the app is banned")],
)
async def test_final_refusal_stops_retrying_and_says_so(
    feishu: Any, gateway: Any, caplog: pytest.LogCaptureFixture, status: int, autherrcode: str, why: str
) -> None:
    """What the SDK gives up on (docs/protocols/feishu.md §B.8): no tight retry loop, a plain
    `refused` on /readyz and the status page, an ERROR line, and a retry at once on Reconnect."""
    caplog.set_level(logging.WARNING, logger="gateway.connection")
    double, domain = feishu
    double.refuse_ws, double.refuse_ws_status, double.refuse_ws_autherrcode = "refused", status, autherrcode
    client: Client = await gateway(fd.config(domain))
    channel = client.app[CHANNELS]["feishu/default"]
    assert isinstance(channel, FeishuAdapter)
    async with asyncio.timeout(10):
        await channel.tracker.wait_for(lambda s: s.state is ChannelState.REFUSED)
    [line] = [r for r in caplog.records if r.getMessage() == "connection refused"]
    fields = vars(line)
    assert line.levelno == logging.ERROR and fields["retry_in_s"] == REFUSED_RETRY >= 600
    assert why in fields["error_message"] and "or on an admin reconnect" in fields["error_message"]
    ready_status, ready = await readiness(client)
    assert ready_status == 503 and ready["channels"]["feishu/default"] == "refused"
    assert f"feishu/default refused (feishu refused the connection, {why}" in ready["reason"]
    page = await (await client.get("/", headers={"Accept-Language": "en"})).text()
    assert ">refused<" in page and why in page
    assert double.refusals == 1 and double.endpoint_calls == 1
    await channel.reconnect()  # an admin fixed it, or wants to know: one attempt at once
    await double.wait_for(lambda: double.refusals == 2)
    double.refuse_ws = ""
    await channel.reconnect()
    await double.wait_for(lambda: channel.status().state is ChannelState.CONNECTED and double.sockets)
    assert channel.status().last_error == ""


async def test_endpoint_call_and_upgrade_carry_the_sdk_headers(feishu_gateway: Any, feishu: Any) -> None:
    double, _ = feishu
    await feishu_gateway()
    [endpoint], [upgrade] = double.endpoint_headers, double.ws_headers
    assert endpoint["locale"] == "zh" and endpoint["User-Agent"] == SDK_USER_AGENT
    assert upgrade["User-Agent"] == SDK_USER_AGENT
    assert SDK_USER_AGENT.startswith("oapi-sdk-python/v")  # the SDK's form (lark_oapi/core/utils/user_agent.py)


async def test_admin_reconnect(feishu_gateway: Any, feishu: Any) -> None:
    double, _ = feishu
    client = await feishu_gateway()
    await client.app[CHANNELS]["feishu/default"].reconnect()
    await double.wait_for(lambda: double.connections == 2 and double.sockets)


# -- pieces ------------------------------------------------------------------------------------
def test_client_config_keeps_values_a_partial_update_lacks() -> None:
    config = ClientConfig().updated({"PingInterval": 90, "ReconnectInterval": 5, "ReconnectNonce": 1,
                                     "ReconnectCount": 3})
    assert config == ClientConfig(ping_interval=90, reconnect_interval=5)
    assert config.updated({"PingInterval": 0, "ReconnectInterval": "soon"}) == config
    assert config.updated(None) == config


def test_backoff_first_retry_fast_then_server_paced() -> None:
    backoff = ServerPacedBackoff()
    backoff.floor = 30.0
    first, second = backoff.next(), backoff.next()
    assert first <= 1.0 and second >= 30.0
    backoff.floor = 600.0
    assert backoff.next() <= 60.0  # the cap wins over the server's wish
    backoff.reset()
    assert backoff.next() <= 1.0


def test_reassembler_bounded_in_time_events_and_bytes() -> None:
    parts = Reassembler(ttl=5.0, max_events=2, max_bytes=100)
    assert parts.add("a", 2, 1, b"world", now=0.0) is None
    assert parts.add("a", 2, 0, b"hello ", now=1.0) == b"hello world"
    assert len(parts) == 0
    parts.add("late", 2, 0, b"x", now=0.0)
    assert parts.add("late", 2, 1, b"y", now=10.0) is None  # the first part expired meanwhile
    parts.add("b", 3, 0, b"1", now=10.0)
    parts.add("c", 3, 0, b"1", now=10.0)
    assert len(parts) == 2  # "late", "b", "c" -> the oldest is dropped
    parts.add("big", 2, 0, b"x" * 150, now=10.0)
    assert len(parts) == 0  # over the byte budget: everything older goes, then the offender
    assert parts.add("d", 2, 5, b"bad seq", now=10.0) is None and len(parts) == 0
    assert parts.add("e", 10**9, 0, b"absurd sum", now=10.0) is None and len(parts) == 0
