"""Platform rate limits and the monthly API quota, against doubles as harsh as the platforms
(docs/protocols/dingtalk.md §A.9, docs/protocols/feishu.md §B.13).

Throttling is a delay, not a failure: a burst of 100 answers into throttling doubles loses none, and
the app-wide rate limiter keeps the configured rate as the double sees it. The quota is a budget you
see: every answer's billable calls are in a metric and its `answered` log line; at 80 % of the
budget cards update only at the end, at 100 % (or when the platform says the quota is gone) replies
take the cheapest path, and the log, the status page and an alert say so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.alerts import Monitor
from gateway.config import AlertsConfig
from gateway.keys import ALERTS, CHANNELS, DISPATCHER, LIVE, METRICS
from gateway.metrics import Metrics
from handlers.dingtalk import DingTalkAdapter
from tests.conftest import make_config
from tests.doubles import feishu as fd
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.feishu_events import message_event
from tests.doubles.openai import OpenAIDouble
from tests.helpers import start

Client = TestClient[web.Request, web.Application]
BATCH_SEND = "/v1.0/robot/oToMessages/batchSend"
SESSION = "/robot/sendBySession"
CARD_PATHS = ("/v1.0/card/instances/createAndDeliver", "/v1.0/card/streaming", "/v1.0/card/instances")
# The double sees arrivals, the limiter plans starts: network jitter moves one by a few ms.
JITTER = 0.05


def most_in_a_second(times: list[float]) -> int:
    """The most calls that arrived within any one second (less the jitter allowance)."""
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u - t < 1.0 - JITTER) for i, t in enumerate(times)), default=0)


def answered(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "answered"]


def calls_of(line: logging.LogRecord) -> int:
    """The `api_calls` field of an `answered` log line."""
    return int(line.__dict__["api_calls"])


async def status_of(client: Client, platform: str) -> dict[str, Any]:
    snap = await (await client.get("/api/status")).json()
    return next(c for c in snap["channels"] if c["platform"] == platform)


# -- throttling is a delay ------------------------------------------------------------------------
async def test_dingtalk_throttled_burst_of_100_answers_loses_none(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    # DingTalk throttles past 50 calls a second to one API, and the first five sends whatever the
    # rate (a second gateway on the same app, say): 403 for the OpenAPI, errcode 90018 here.
    double = DingTalkDouble(qps_limit=50, throttle_next=5)
    env = await start(aiohttp_server, gateway, model_url=openai_double[1], double=double, api_qps=50)
    for n in range(100):
        await double.push(double.message(f"question {n}", staff_id=f"s{n}"))
    async with asyncio.timeout(30):
        await double.wait_for(lambda: len(double.session_posts) >= 100, timeout=30)
        await env.client.app[DISPATCHER].wait_idle()
    texts = sorted(p["markdown"]["text"] for p in double.session_posts)
    assert texts == sorted(f"echo: question {n}" for n in range(100))  # each once, none lost
    assert env.sample("botgate_replies_total", platform="dingtalk", outcome="ok") == 100
    assert env.sample("botgate_replies_total", platform="dingtalk", outcome="failed") == 0
    throttled = env.sample("botgate_platform_throttled_total", platform="dingtalk", endpoint="session_webhook")
    assert throttled == len(double.throttled) >= 5  # each throttled answer was waited out...
    assert env.sample("botgate_send_retries_total", platform="dingtalk") == throttled  # ...and retried
    # The limiter spaced the rest: beyond the five forced ones, hardly any refusal.
    assert len(double.throttled) <= 5 + 3, double.throttled


async def test_feishu_throttled_burst_of_100_answers_loses_none(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    double, domain = await fd.start(aiohttp_server)
    # Feishu throttles past 50 calls a second to one API (429 + 99991400) and 5 replies a second
    # into one chat (400 + 230020), and the next three replies whatever the rate, under HTTP 400.
    double.qps_limit, double.chat_qps_limit = 50, 5
    double.throttle_next, double.throttle_only, double.throttle_answer = 3, "/reply", (400, 230020)
    client: Client = await gateway(fd.config(domain, openai_double[1]))
    await double.wait_for(lambda: double.pings >= 1)
    ids = [f"om_{chat}_{n}" for chat in range(20) for n in range(5)]  # 20 chats, 5 questions each
    for message_id in ids:
        chat = message_id.split("_")[1]
        event = message_event(f"q {message_id}", message_id=message_id, chat_id=f"oc_{chat}", sender=f"ou_{message_id}")
        await double.push_event(event)
    async with asyncio.timeout(40):
        await double.wait_for(lambda: all(double.answer(m) is not None for m in ids), timeout=40)
        await client.app[DISPATCHER].wait_idle()
    assert {m: double.answer(m) for m in ids} == {m: f"echo: q {m}" for m in ids}
    assert double.open_cards() == []  # no card left "generating"
    registry = client.app[METRICS].registry
    assert registry.get_sample_value("botgate_replies_total", {"platform": "feishu", "outcome": "failed"}) is None
    labels = {"platform": "feishu", "endpoint": "reply"}
    throttled = registry.get_sample_value("botgate_platform_throttled_total", labels)
    assert throttled is not None and throttled >= 3
    # Each throttled reply was waited out and sent again (not replaced by a fallback message).
    assert registry.get_sample_value("botgate_send_retries_total", {"platform": "feishu"}) == throttled


async def test_dingtalk_limiter_holds_the_configured_rate(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    # 20 answers that must go through the 1:1 send API (their sessionWebhooks are about to
    # expire), with [dingtalk] api_qps = 10, to a DingTalk that throttles past 10 a second.
    double = DingTalkDouble(qps_limit=10)
    await start(aiohttp_server, gateway, model_url=openai_double[1], double=double, api_qps=10)
    for n in range(20):
        await double.push(double.message(f"late {n}", staff_id=f"s{n}", expires_in=30))
    async with asyncio.timeout(20):
        await double.wait_for(lambda: len(double.calls(BATCH_SEND)) >= 20, timeout=20)
    sends = [t for t, path in double.requests if path == BATCH_SEND]
    assert len(sends) == 20 and double.throttled == []  # the platform never had to refuse one
    assert most_in_a_second(sends) <= 10
    assert max(sends) - min(sends) >= 19 / 10  # the rate held: 20 calls take 1.9 s at least
    assert max(sends) - min(sends) < 19 / 10 * 1.5  # ...and the limiter did not crawl either


async def test_feishu_limiter_holds_five_replies_a_second_per_chat(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    double, domain = await fd.start(aiohttp_server)
    double.chat_qps_limit = 5
    client: Client = await gateway(fd.config(domain, openai_double[1]))
    await double.wait_for(lambda: double.pings >= 1)
    # One chat, many topics (threads are conversations of their own, answered side by side).
    ids = [f"om_t{n}" for n in range(12)]
    for n, message_id in enumerate(ids):
        event = message_event(f"topic {n}", message_id=message_id, thread_id=f"omt_{n}", sender=f"ou_{n}")
        await double.push_event(event)
    async with asyncio.timeout(20):
        await double.wait_for(lambda: all(double.answer(m) is not None for m in ids), timeout=20)
        await client.app[DISPATCHER].wait_idle()
    replies = [t for t, path in double.requests if path.endswith("/reply")]
    assert len(replies) >= 12 and double.throttled == []
    assert most_in_a_second(replies) <= 5
    assert max(replies) - min(replies) >= (len(replies) - 1) / 5


# -- a send without an idempotency key ------------------------------------------------------------
async def test_dingtalk_send_whose_answer_was_lost_is_not_repeated(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    # The sessionWebhook delivers the message, then a proxy loses the answer (502): repeating it,
    # or sending it again through the OpenAPI, would show it twice.
    double = DingTalkDouble(lost_answers=1)
    env = await start(aiohttp_server, gateway, model_url=openai_double[1], double=double)
    await double.push(double.message("only once"))
    await double.wait_for(lambda: len(double.session_posts) >= 1)
    await env.client.app[DISPATCHER].wait_idle()
    answers = [p for p in double.session_posts if p["markdown"]["text"] == "echo: only once"]
    assert len(answers) == 1
    assert double.calls(BATCH_SEND) == []
    assert env.sample("botgate_send_retries_total", platform="dingtalk") == 0


# -- the quota is a budget you see ----------------------------------------------------------------
async def test_dingtalk_api_calls_per_answer_in_the_metric_and_the_log(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    double = DingTalkDouble()
    env = await start(
        aiohttp_server, gateway, model_url=openai_double[1], double=double, card_template_id="tpl", stream_interval=0
    )
    await double.push(double.message("one two three four"))
    await double.wait_for(lambda: double.calls(CARD_PATHS[2]))  # the card finished...
    await env.client.app[DISPATCHER].wait_idle()  # ...and the answer's summary written
    card_calls = sum(1 for _, path, _ in double.api_calls if path in CARD_PATHS)
    assert card_calls >= 3  # create, stream, finish: every one billable (the token is not)
    [line] = answered(caplog)
    assert calls_of(line) == card_calls
    assert env.sample("botgate_platform_api_calls_per_answer_sum", platform="dingtalk") == card_calls
    assert env.sample("botgate_platform_api_calls_per_answer_count", platform="dingtalk") == 1
    status = await status_of(env.client, "dingtalk")
    assert status["budget"]["used"] == card_calls and status["budget"]["per_answer"] == card_calls


async def test_feishu_api_calls_per_answer_in_the_metric_and_the_log(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    double, domain = await fd.start(aiohttp_server)
    client: Client = await gateway(fd.config(domain, openai_double[1]))
    await double.wait_for(lambda: double.pings >= 1)
    before = len(double.requests)  # bot info, fetched on connecting
    await double.push_event(message_event("count my calls", message_id="om_c"))
    await double.wait_for(lambda: double.answer("om_c") is not None)
    await client.app[DISPATCHER].wait_idle()
    calls = len(double.requests) - before  # card create, reply, updates, close: all billable
    assert calls >= 3
    [line] = answered(caplog)
    assert calls_of(line) == calls
    registry = client.app[METRICS].registry
    assert registry.get_sample_value("botgate_platform_api_calls_per_answer_sum", {"platform": "feishu"}) == calls


async def test_dingtalk_budget_at_80_percent_cards_at_the_end_at_100_no_card(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    double = DingTalkDouble()
    env = await start(
        aiohttp_server,
        gateway,
        model_url=openai_double[1],
        double=double,
        card_template_id="tpl",
        stream_interval=0,
        monthly_api_budget=5,
    )
    # Four notices whose sessionWebhooks expired: one 1:1 send each, 4 of 5 calls = 80 %.
    for n in range(4):
        await double.push(double.message("/help", staff_id=f"h{n}", expires_in=30))
    await double.wait_for(lambda: len(double.calls(BATCH_SEND)) >= 4)
    await env.client.app[DISPATCHER].wait_idle()
    assert env.adapter.budget.degraded and not env.adapter.budget.spent
    assert env.sample("botgate_platform_api_budget_ratio", platform="dingtalk", bot="default") == 0.8
    assert any("80 % used" in r.getMessage() for r in caplog.records)
    # At 80 % a card shows only the final text: created with it, one final update, finished.
    await double.push(double.message("one two three four five"))
    await double.wait_for(lambda: double.calls("/v1.0/card/instances"))
    [create] = double.calls(CARD_PATHS[0])
    [final] = double.calls(CARD_PATHS[1])
    assert create["cardData"]["cardParamMap"]["msgContent"] == final["content"] == "echo: one two three four five"
    await env.client.app[DISPATCHER].wait_idle()
    # 7 of 5 calls: spent. The next answer takes no card at all, only the (free) sessionWebhook.
    assert env.adapter.budget.spent
    await double.push(double.message("cheapest please", staff_id="c1"))
    await double.wait_for(lambda: any(p["markdown"]["text"] == "echo: cheapest please" for p in double.session_posts))
    assert len(double.calls(CARD_PATHS[0])) == 1
    await env.client.app[DISPATCHER].wait_idle()
    assert calls_of(answered(caplog)[-1]) == 0  # the sessionWebhook is not an API call
    assert any(r.levelno == logging.ERROR and "API quota spent" in r.getMessage() for r in caplog.records)
    status = await status_of(env.client, "dingtalk")
    assert status["budget"]["state"] == "spent" and "7 of the monthly_api_budget of 5" in status["budget"]["detail"]
    # The monitor checks at most every 0.1 s under load: have it look now, as its next round would.
    await env.client.app[ALERTS].check(env.client.app[LIVE].config.alerts, [])
    html = await (await env.client.get("/", headers={"Accept": "text/html"})).text()
    assert 'id="budget-dingtalk"' in html and "API quota spent" in html


async def test_dingtalk_quota_refused_by_the_platform_ends_in_the_cheapest_path(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    double = DingTalkDouble(quota=0)  # the org's calls for this month are used up (elsewhere)
    env = await start(
        aiohttp_server, gateway, model_url=openai_double[1], double=double, card_template_id="tpl"
    )
    await double.push(double.message("card please"))
    # The card is refused for the quota, so the answer goes through the sessionWebhook instead.
    await double.wait_for(lambda: any(p["markdown"]["text"] == "echo: card please" for p in double.session_posts))
    await env.client.app[DISPATCHER].wait_idle()
    assert double.quota_refusals == 1  # refused once, never retried
    assert env.adapter.budget.spent
    spent = [r for r in caplog.records if "API quota spent" in r.getMessage()]
    assert spent and "ApiCountLimitForOrg" in spent[0].getMessage()
    # From now on: no card, no OpenAPI call for a reply the sessionWebhook can carry.
    await double.push(double.message("and now?"))
    await double.wait_for(lambda: any(p["markdown"]["text"] == "echo: and now?" for p in double.session_posts))
    await env.client.app[DISPATCHER].wait_idle()
    assert double.quota_refusals == 1
    assert env.sample("botgate_platform_api_quota_spent", platform="dingtalk", bot="default") == 1
    status = await status_of(env.client, "dingtalk")
    assert status["budget"]["state"] == "spent" and "ApiCountLimitForOrg" in status["budget"]["refused"]
    # The built-in alert notifier sees it too.
    channels = env.client.app[CHANNELS]
    monitor = Monitor(env.client.app[METRICS].stats, lambda: [c.status() for c in channels.values()])
    title, detail = monitor.conditions(AlertsConfig(), time.time())["api_quota:dingtalk/default"]
    assert title == "dingtalk API quota spent" and "ApiCountLimitForOrg" in detail


async def test_feishu_quota_exhausted_is_not_retried_and_says_so(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    double, domain = await fd.start(aiohttp_server)
    double.quota = 1  # the bot info call on connecting takes the tenant's last call
    client: Client = await gateway(fd.config(domain, openai_double[1]))
    await double.wait_for(lambda: double.pings >= 1)
    await double.push_event(message_event("anyone?", message_id="om_q"))
    await double.wait_for(lambda: double.quota_refusals >= 1)
    await client.app[DISPATCHER].wait_idle()
    # HTTP 429 + 99991403 is the quota, not a rate limit: nothing is repeated (a card create,
    # then at most its plain fallback, then the apology: each refused once).
    assert double.quota_refusals <= 3, double.requests
    assert client.app[METRICS].registry.get_sample_value(
        "botgate_platform_throttled_total", {"platform": "feishu", "endpoint": "card_create"}
    ) is None
    spent = [r for r in caplog.records if "API quota spent" in r.getMessage()]
    assert spent and "99991403" in spent[0].getMessage()
    status = await status_of(client, "feishu")
    assert status["budget"]["state"] == "spent"


async def test_feishu_token_returned_unchanged_until_30_minutes_remain(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str]
) -> None:
    double, domain = await fd.start(aiohttp_server)
    # Feishu's rule at a tenth of a second's scale: a token lives 3 s and the same one comes back
    # while more than 1 s of it remains, its `expire` being what is left.
    double.token_lifetime, double.token_reuse_above = 3.0, 1.0
    client: Client = await gateway(fd.config(domain, openai_double[1]))
    await double.wait_for(lambda: double.pings >= 1)
    n = 0
    async with asyncio.timeout(20):
        while len(double.tokens_issued) < 2 or n < 3:
            n += 1
            await double.push_event(message_event(f"tick {n}", message_id=f"om_k{n}"))
            await double.wait_for(lambda n=n: double.answer(f"om_k{n}") == f"echo: tick {n}")  # type: ignore[misc]
            await asyncio.sleep(0.3)  # time has to pass for a token to age: there is no event for it
    await client.app[DISPATCHER].wait_idle()
    assert double.expired_uses == 0  # botgate never used a token past its expiry
    assert double.token_calls > len(double.tokens_issued)  # some fetches got the same token back
    assert double.api_auth[-1] == f"Bearer {double.tokens_issued[-1]}"


@pytest.mark.parametrize("code", ["QpsLimitForAppkeyAndApi", "QpsLimitForApi"])
async def test_dingtalk_openapi_qps_refusal_is_waited_out(
    aiohttp_server: Any, gateway: Any, openai_double: tuple[OpenAIDouble, str], code: str
) -> None:
    # HTTP 403 with a QPS-limit code says the send was not taken: it is repeated after the 1 s
    # DingTalk asks for, and arrives once. (Any other 403 is final.)
    double = DingTalkDouble(throttle_next=2, throttle_code=f"Forbidden.AccessDenied.{code}")
    env = await start(aiohttp_server, gateway, model_url=openai_double[1], double=double)
    for n in range(3):
        await double.push(double.message(f"late {n}", staff_id=f"s{n}", expires_in=30))
    async with asyncio.timeout(15):
        await double.wait_for(lambda: len(double.calls(BATCH_SEND)) >= 3, timeout=15)
        await env.client.app[DISPATCHER].wait_idle()
    texts = sorted(orjson.loads(b["msgParam"])["text"] for b in double.calls(BATCH_SEND))
    assert texts == [f"echo: late {n}" for n in range(3)] and double.throttled == [BATCH_SEND] * 2
    assert env.sample("botgate_platform_throttled_total", platform="dingtalk", endpoint="direct_send") == 2
    assert env.sample("botgate_replies_total", platform="dingtalk", outcome="ok") == 3


async def test_every_bot_has_its_own_limiter_and_budget() -> None:
    # Two DingTalk bots are two apps, each with the platform's limits and quota of its own.
    metrics = Metrics()
    cfg = make_config(dingtalk={"enabled": True, "client_id": "a", "client_secret": "s", "api_qps": 20}).dingtalk
    first, second = DingTalkAdapter(cfg, metrics, "first"), DingTalkAdapter(cfg, metrics, "second")
    assert await first.limiter.acquire("direct_send") == 0
    assert await first.limiter.acquire("direct_send") > 0  # the first bot's next call waits its turn
    assert await second.limiter.acquire("direct_send") == 0  # the second bot's does not
    first.budget.charge("direct_send")
    assert (first.budget.used, second.budget.used) == (1, 0)
    used = metrics.registry.get_sample_value
    assert used("botgate_platform_api_budget_used", {"platform": "dingtalk", "bot": "first"}) == 1
