"""DingTalk Stream mode end to end: the double's frames through the gateway to the model and back,
ACK timing, redelivery, liveness, reconnects and readiness."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from gateway.channel import ChannelState
from gateway.keys import DISPATCHER
from tests.doubles.dingtalk import DingTalkDouble
from tests.helpers import ping_round_trip, start


def lost_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        str(getattr(r, "error_message", ""))
        for r in caplog.records
        if r.getMessage() == "connection lost" and getattr(r, "platform", "") == "dingtalk"
    ]


async def test_dm_text_answered_on_session_webhook(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    model, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    body = env.double.message("what is botgate?")
    frame_id = await env.double.push(body)
    [answer] = await env.answers(1)
    assert answer["msgtype"] == "markdown"
    assert answer["markdown"]["text"] == "echo: what is botgate?"
    assert answer["session"] in body["sessionWebhook"]
    assert "at" not in answer  # nobody to @mention in a 1:1 chat
    ack = env.double.acked(frame_id)
    assert ack is not None and ack.code == 200
    assert env.double.ack_errors == []
    assert model.requests[0]["messages"][-1]["content"] == "what is botgate?"
    assert env.api_calls("open_connection") == 1
    assert env.api_calls("session_webhook") == 1


async def test_ack_goes_out_before_the_model_answers(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    frame_id = await env.double.push(env.double.message("slow:1 think hard"))
    await env.double.wait_for(lambda: env.double.acked(frame_id) is not None)
    assert env.double.session_posts == []  # the model is still thinking
    [answer] = await env.answers(1)
    assert answer["markdown"]["text"] == "echo: slow:1 think hard"


async def test_redelivery_with_new_frame_id_is_answered_once(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    _, url = openai_double
    env = await start(aiohttp_server, gateway, model_url=url)
    first = env.double.message("first", msg_id="msg-1")
    await env.double.push(first, frame_id="frame-a")
    await env.answers(1)
    await env.double.push(first, frame_id="frame-b")  # DingTalk redelivers: new frame id, same msgId
    await env.double.wait_for(lambda: env.double.acked("frame-b") is not None)
    await env.double.push(env.double.message("second", msg_id="msg-2"))
    # Same conversation, answered in order: had the redelivery been accepted, its answer came first.
    answers = await env.answers(2)
    assert [a["markdown"]["text"] for a in answers] == ["echo: first", "echo: second"]
    assert env.sample("botgate_dedup_dropped_total", platform="dingtalk") == 1


async def test_system_ping_is_acked_with_its_data(aiohttp_server: Any, gateway: Any) -> None:
    env = await start(aiohttp_server, gateway)
    frame_id = await env.double.system("ping", {"opaque": "abc-123"})
    await env.double.wait_for(lambda: env.double.acked(frame_id) is not None)
    ack = env.double.acked(frame_id)
    assert ack is not None and ack.code == 200 and ack.data == {"opaque": "abc-123"}
    assert env.adapter.status().last_event_at is None  # a ping proves the link, it is no event


async def test_quiet_connection_answering_pings_is_kept(
    aiohttp_server: Any, gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.connection")
    env = await start(aiohttp_server, gateway, stale_after=0.5)
    # No frame at all, only pongs to our pings (every 0.25 s): as in DingTalk's SDKs, a pong proves
    # the link. Six pings span three stale limits.
    await env.double.wait_for(lambda: env.double.pings >= 6)
    assert env.double.connections == 1 and lost_errors(caplog) == []
    await env.double.push(env.double.message("still listening?"))
    assert "still listening?" in (await env.answers(1))[0]["markdown"]["text"]


async def test_connection_without_pongs_is_detected_as_stale_and_replaced(
    aiohttp_server: Any, gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.connection")
    double = DingTalkDouble(answer_pings=False)
    env = await start(aiohttp_server, gateway, double=double, stale_after=0.3)
    # The socket stays open but nothing comes back, not even a pong: only liveness can notice.
    await double.wait_for(lambda: double.connections >= 2)
    assert double.pings >= 1
    assert any("StaleConnection" in e and "not even a pong" in e for e in lost_errors(caplog))
    assert env.sample("botgate_reconnects_total", platform="dingtalk") >= 1


async def test_dropped_socket_reconnects_and_next_message_is_answered(
    aiohttp_server: Any, gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.connection")
    env = await start(aiohttp_server, gateway)
    await env.double.drop()
    await env.double.wait_for(lambda: env.double.connections == 2)
    await env.connected()
    assert any("ConnectionError" in e for e in lost_errors(caplog))
    await env.double.push(env.double.message("still there?"))
    [answer] = await env.answers(1)
    assert "still there?" in answer["markdown"]["text"]
    assert env.adapter.status().reconnects == 1


async def test_disconnect_swaps_in_a_new_connection_before_leaving_the_old(
    aiohttp_server: Any, gateway: Any, openai_double: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """DingTalk's `disconnect` as documented (no messageId), then a frame still on its way on the
    old socket, then the server's close some time later: the new connection is open while the old
    one still is, nothing sent around the swap is lost, and the channel never stopped being connected."""
    caplog.set_level(logging.WARNING, logger="gateway.connection")
    env = await start(aiohttp_server, gateway, model_url=openai_double[1])
    double = env.double
    since = env.adapter.status().connected_since
    before = await double.push(double.message("before", staff_id="u1"))
    old = await double.rotate(close_after=None)
    late = await double.push(double.message("on its way", staff_id="u1"), to=old)  # raced the rotation
    await double.wait_acked(late)  # read and ACKed on the socket it came on
    await double.wait_for(lambda: double.open_connections == [old, 2])  # warm: both open at once
    after = await double.push(double.message("after", staff_id="u1"))  # the old socket gets nothing new
    answers = await env.answers(3)
    assert [a["markdown"]["text"] for a in answers] == ["echo: before", "echo: on its way", "echo: after"]
    acks = {f: double.acked(f) for f in (before, late, after)}
    assert [a.connection if a else None for a in acks.values()] == [old, old, 2]  # each on its own socket
    await double.close(old)  # the server ends the old socket
    await double.wait_for(lambda: double.open_connections == [2])
    status = env.adapter.status()
    assert status.state is ChannelState.CONNECTED and status.connected_since == since
    assert status.reconnects == 0 and env.sample("botgate_reconnects_total", platform="dingtalk") == 0
    assert lost_errors(caplog) == [] and len(double.opens) == 2 and double.ack_errors == []
    await double.push(double.message("and later", staff_id="u1"))
    assert (await env.answers(4))[3]["markdown"]["text"] == "echo: and later"


async def test_disconnect_with_a_message_id_is_acked_and_swapped(aiohttp_server: Any, gateway: Any) -> None:
    env = await start(aiohttp_server, gateway)
    double = env.double
    old = await double.rotate(close_after=0.2, with_id=True)  # the server closes it itself
    await double.wait_for(lambda: double.open_connections == [2])
    disconnect = next(a for a in double.acks if a.connection == old)
    assert disconnect.code == 200 and disconnect.data == {"reason": "rotate"}
    assert env.adapter.status().reconnects == 0


async def test_frames_on_both_sockets_during_a_swap_are_all_answered(
    aiohttp_server: Any, gateway: Any, openai_double: Any
) -> None:
    """A server that keeps delivering on a socket it asked us to leave, to either of the app's
    sockets at random: every message is answered once and ACKed where it came."""
    env = await start(aiohttp_server, gateway, model_url=openai_double[1])
    double = env.double
    old = await double.rotate(close_after=None, stop=False)
    await double.wait_for(lambda: len(double.open_connections) == 2)
    double.spread = True
    frames = [await double.push(double.message(f"m{i}", staff_id=f"u{i}")) for i in range(12)]
    acks = [await double.wait_acked(f) for f in frames]
    sent_on = [n for _, _, n in double.deliveries]
    assert set(sent_on) == {old, 2}  # the spread reached both
    assert [a.connection for a in acks] == sent_on  # each ACKed on the socket it came on
    answers = await env.answers(12)
    assert sorted(a["markdown"]["text"] for a in answers) == sorted(f"echo: m{i}" for i in range(12))


async def test_open_connection_failing_backs_off_then_connects(
    aiohttp_server: Any, gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.connection")
    double = DingTalkDouble(open_failures=3)
    env = await start(aiohttp_server, gateway, double=double, reconnect_delay=0.05)
    assert len(double.opens) == 4
    delays = [
        float(getattr(r, "retry_in_s", -1)) for r in caplog.records if r.getMessage() == "connection lost"
    ]
    assert len(delays) == 3
    assert delays == sorted(delays) and 0 < delays[0] < 1  # exponential, first retry well within 1 s
    status = env.adapter.status()
    assert status.state is ChannelState.CONNECTED and status.attempt == 0 and status.last_error == ""
    assert "HTTP 503" in lost_errors(caplog)[0]


async def test_readiness_follows_the_stream(aiohttp_server: Any, gateway: Any) -> None:
    double = DingTalkDouble(open_failures=1000)
    env = await start(aiohttp_server, gateway, double=double, connect=False)
    await double.wait_for(lambda: len(double.opens) >= 2)
    resp = await env.client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and body["channels"]["dingtalk/default"] == "reconnecting"
    assert "dingtalk/default reconnecting" in body["reason"] and "HTTP 503" in body["reason"]
    double.open_failures = 0
    await env.connected()
    resp = await env.client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["channels"]["dingtalk/default"] == "connected"


async def test_messages_are_not_acked_while_shutting_down(aiohttp_server: Any, gateway: Any) -> None:
    env = await start(aiohttp_server, gateway)
    env.client.app[DISPATCHER].stop_intake()
    frame_id = await env.double.push(env.double.message("too late"))
    await ping_round_trip(env)
    assert env.double.acked(frame_id) is None  # DingTalk will redeliver it to the next process


async def test_clean_stop_closes_the_stream(aiohttp_server: Any, gateway: Any) -> None:
    env = await start(aiohttp_server, gateway)
    adapter = env.adapter
    await env.client.close()
    assert adapter.status().state is ChannelState.STOPPED
    await env.double.wait_for(lambda: not env.double.connected)


async def test_admin_reconnect_connects_afresh(aiohttp_server: Any, gateway: Any) -> None:
    env = await start(aiohttp_server, gateway)
    await env.adapter.reconnect()
    await env.double.wait_for(lambda: env.double.connections == 2)
    await env.connected()
    assert len(env.double.opens) == 2 and env.adapter.status().reconnects == 1


async def test_many_conversations_at_once_all_acked_and_answered_in_order(
    aiohttp_server: Any, gateway: Any, openai_double: Any, tmp_path: Any
) -> None:
    """200 frames over 20 conversations pushed without waiting for ACKs (submits overlap in the
    SQLite group commit): every frame ACKed once, every message answered, each conversation's
    answers in the order its messages arrived."""
    sections = {"store": {"url": f"sqlite:///{tmp_path}/s.sqlite3"}}
    # 200 replies at DingTalk's 20 a second would take 11 s; the limiter is tests/test_api_quota.py's.
    env = await start(aiohttp_server, gateway, model_url=openai_double[1], sections=sections, api_qps=0)
    frames = []
    for i in range(10):
        for c in range(20):
            frames.append(await env.double.push(env.double.message(f"c{c} m{i}", staff_id=f"u{c}")))
    await env.double.wait_for(lambda: all(env.double.acked(f) is not None for f in frames))
    assert len(env.double.acks) == len(frames) and env.double.ack_errors == []
    answers = await env.answers(200)
    texts = [a["markdown"]["text"].removeprefix("echo: ") for a in answers]
    assert sorted(texts) == sorted(f"c{c} m{i}" for i in range(10) for c in range(20))
    for c in range(20):
        mine = [t for t in texts if t.startswith(f"c{c} ")]
        assert mine == [f"c{c} m{i}" for i in range(10)]
