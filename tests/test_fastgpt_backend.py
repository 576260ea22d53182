"""A FastGPT agent end to end, against the FastGPT double (docs/protocols/fastgpt.md) behind the
DingTalk and Feishu doubles: FastGPT keeps the history per chatId, so botgate sends the new message
alone with a chatId stable per conversation (kept in the store, new after /reset) and the sender in
`variables`; FastGPT's errors (mid-stream `event: error`, a failed node, a refused key answered 200
or 500) become the notices of any backend; doctor probes with an empty request that runs nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import doctor
from gateway.answer import EMPTY_ANSWER, MODEL_DOWN
from gateway.backends import BackendRequest, Completion, DeltaKind
from gateway.backends.fastgpt import FastGPTBackend, new_chat_id
from gateway.config import Config, build
from gateway.errors import ModelError
from gateway.i18n import translator
from gateway.keys import DISPATCHER, STORE
from gateway.metrics import Metrics
from gateway.steps import RESET_DONE
from tests.doubles import feishu as fd
from tests.doubles.dingtalk import DingTalkDouble
from tests.doubles.fastgpt import KEY, PATH, FastGPTDouble
from tests.doubles.feishu import FeishuDouble
from tests.doubles.feishu_events import APP_ID, BOT_OPEN_ID, mention, message_event
from tests.helpers import DingTalkEnv, dingtalk_section, notice_start, serve

Client = TestClient[web.Request, web.Application]
WRONG = "fastgpt-wrongkey"  # well formed, unknown to the app: FastGPT's 514 unAuthApiKey
INPUTS = {"department": "HR"}
THOUGHT = "the user wants my secret plan"


@pytest.fixture
async def fastgpt(aiohttp_server: Callable[..., Any]) -> AsyncIterator[tuple[FastGPTDouble, str]]:
    """The double and the agent's base_url (`<host>/api/v1`)."""
    double = FastGPTDouble()
    server = await aiohttp_server(double.app(), host="127.0.0.1")
    yield double, str(server.make_url(PATH.removesuffix("/chat/completions")))
    double.release()


def config(url: str, platforms: dict[str, Any], **agent: Any) -> Config:
    """[[agents]] kb on FastGPT (one context per member in groups), routed every message of `platforms`."""
    kb = {
        "name": "kb",
        "provider": "fastgpt",
        "base_url": url,
        "api_keys": [KEY],
        "inputs": INPUTS,
        "group_context": "per_user",
        **agent,
    }
    routes = [{"agent": "kb"}] if platforms else []
    return build({"store": {"url": "memory://"}, "agents": [kb], "routes": routes, **platforms}, env={})


async def dingtalk(aiohttp_server: Callable[..., Any], gateway: Any, url: str, **agent: Any) -> DingTalkEnv:
    double = DingTalkDouble()
    await serve(aiohttp_server, double)
    env = DingTalkEnv(double, await gateway(config(url, {"dingtalk": dingtalk_section(double)}, **agent)))
    await env.connected()
    return env


async def ask(env: DingTalkEnv, text: str, **message: Any) -> str:
    """One DingTalk message; what the gateway posted back (its only post)."""
    before = len(env.double.session_posts)
    await env.double.push(env.double.message(text, **message))
    await env.answers(before + 1)
    await env.client.app[DISPATCHER].wait_idle()
    assert len(env.double.session_posts) == before + 1, env.double.session_posts[before:]
    return str(env.double.session_posts[-1]["markdown"]["text"])


async def feishu(aiohttp_server: Callable[..., Any], gateway: Any, url: str) -> tuple[FeishuDouble, Client]:
    double, domain = await fd.start(aiohttp_server)
    platform = {"enabled": True, "app_id": APP_ID, "app_secret": fd.APP_SECRET, "domain": domain}
    client: Client = await gateway(config(url, {"feishu": platform}))
    await double.wait_for(lambda: double.pings >= 1)
    return double, client


async def feishu_ask(double: FeishuDouble, client: Client, text: str, message_id: str, **event: Any) -> str:
    await double.push_event(message_event(text, message_id=message_id, **event))
    await double.wait_for(lambda: double.answer(message_id) is not None)
    await client.app[DISPATCHER].wait_idle()
    shown = double.answer(message_id)
    assert shown is not None
    return shown


def chat_ids(double: FastGPTDouble) -> list[str | None]:
    return [r.get("chatId") for r in double.requests]


# -- identity and history --------------------------------------------------------------------------


async def test_dingtalk_chat_id_is_stable_per_conversation_and_only_the_new_message_is_sent(
    aiohttp_server: Any, gateway: Any, fastgpt: tuple[FastGPTDouble, str]
) -> None:
    double, url = fastgpt
    env = await dingtalk(aiohttp_server, gateway, url)
    assert await ask(env, "hello") == "echo: hello"
    assert await ask(env, "hello") == "echo: hello"  # asked again, not the cache: the history differs
    first, second = double.turns
    assert first.chat_id and second.chat_id == first.chat_id
    assert [len(r["messages"]) for r in double.requests] == [1, 1] and second.ignored == 0
    assert second.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "echo: hello"}]
    assert double.requests[0]["stream"] is True and double.requests[0]["detail"] is False
    assert second.custom_uid == "dingtalk:staff1"
    assert second.variables == {
        "sender_id": "dingtalk:staff1",
        "sender_name": "Alice",
        "platform": "dingtalk",
        "conversation_id": "cid-dm-staff1",
        **INPUTS,
    }
    store = env.client.app[STORE]
    assert await store.backend_session("dingtalk:cid-dm-staff1") == first.chat_id
    assert await store.context("dingtalk:cid-dm-staff1") == []  # FastGPT keeps the turns, not botgate
    # Another conversation (another member's DM) is another chat.
    assert await ask(env, "hi", staff_id="staff2", nick="Bob") == "echo: hi"
    assert double.turns[-1].chat_id not in (None, first.chat_id) and double.turns[-1].history == []
    assert double.turns[-1].variables["sender_name"] == "Bob"


async def test_reset_starts_a_new_fastgpt_chat(
    aiohttp_server: Any, gateway: Any, fastgpt: tuple[FastGPTDouble, str]
) -> None:
    double, url = fastgpt
    env = await dingtalk(aiohttp_server, gateway, url)
    await ask(env, "remember 42")
    await ask(env, "what did I say?")
    assert await ask(env, "/reset") == translator("zh-CN")(RESET_DONE)
    await ask(env, "what did I say?")
    before, same, after = chat_ids(double)
    assert before == same and after not in (None, before)
    assert double.turns[-1].history == []
    # Both chats are the one conversation's: the same digest of its context, a new random part.
    assert before and after and before.split("-")[0] == after.split("-")[0]


async def test_feishu_p2p_and_per_user_group_members_each_have_their_own_chat(
    aiohttp_server: Any, gateway: Any, fastgpt: tuple[FastGPTDouble, str]
) -> None:
    double, url = fastgpt
    lark, client = await feishu(aiohttp_server, gateway, url)
    assert await feishu_ask(lark, client, "hello there", "om_1") == "echo: hello there"
    assert await feishu_ask(lark, client, "and again", "om_2") == "echo: and again"
    p2p = double.turns[0]
    assert double.turns[1].chat_id == p2p.chat_id and double.turns[1].ignored == 0
    assert p2p.custom_uid == "feishu:ou_user"
    assert p2p.variables == {  # no sender_name: Feishu's events carry no display name
        "sender_id": "feishu:ou_user",
        "platform": "feishu",
        "conversation_id": "oc_chat",
        **INPUTS,
    }
    bot = mention("@_user_1", BOT_OPEN_ID, "Bot")
    group = {"chat_type": "group", "chat_id": "oc_team", "mentions": [bot]}
    await feishu_ask(lark, client, "@_user_1 one", "om_g1", sender="ou_ann", **group)
    await feishu_ask(lark, client, "@_user_1 two", "om_g2", sender="ou_bob", **group)
    await feishu_ask(lark, client, "@_user_1 three", "om_g3", sender="ou_ann", **group)
    ann, bob, ann_again = double.turns[2:]
    assert len({p2p.chat_id, ann.chat_id, bob.chat_id}) == 3  # per_user: a chat per member
    assert ann_again.chat_id == ann.chat_id
    assert ann_again.question == "成员-ou_ann: three"  # the speaker, as every group turn names it
    assert [m["content"] for m in ann_again.history] == ["成员-ou_ann: one", "echo: 成员-ou_ann: one"]


# -- answers and failures -------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["reasoning", "think", "keepalive"])
async def test_reasoning_is_stripped_and_keep_alives_are_harmless(
    aiohttp_server: Any, gateway: Any, fastgpt: tuple[FastGPTDouble, str], step: str
) -> None:
    double, url = fastgpt
    double.thought, double.script = THOUGHT, [step]
    env = await dingtalk(aiohttp_server, gateway, url)
    assert await ask(env, "plan?") == "echo: plan?"
    lark, client = await feishu(aiohttp_server, gateway, url)
    double.script = [step]
    assert await feishu_ask(lark, client, "plan?", "om_r") == "echo: plan?"
    card = lark.card_of(lark.replies_to("om_r")[0])
    assert "secret" not in str(card.card) + str(card.contents) + str(card.element_contents)


@pytest.mark.parametrize(
    ("step", "reason"),
    [("error-event", "server error"), ("truncated", "connection"), ("drop", "connection")],
)
async def test_an_app_failing_mid_answer_gets_one_apology_and_nothing_is_kept(
    aiohttp_server: Any, gateway: Any, fastgpt: tuple[FastGPTDouble, str], step: str, reason: str
) -> None:
    """`event: error` after the first piece (FastGPT saves nothing), a stream ended without [DONE],
    a dropped connection: a failure, not a short answer."""
    double, url = fastgpt
    double.script = [step]
    env = await dingtalk(aiohttp_server, gateway, url)
    notice = await ask(env, "hello")
    assert notice.startswith(notice_start(MODEL_DOWN, reason=reason)) and "echo" not in notice
    assert len(double.requests) == 1  # part of it was streamed: never asked twice
    assert await env.client.app[STORE].backend_session("dingtalk:cid-dm-staff1") is None
    assert await ask(env, "hello") == "echo: hello"
    assert double.turns[-1].history == [] and double.turns[-1].chat_id != double.turns[0].chat_id


async def test_an_error_event_on_a_feishu_card_ends_it_with_the_apology(
    aiohttp_server: Any, gateway: Any, fastgpt: tuple[FastGPTDouble, str]
) -> None:
    double, url = fastgpt
    double.answer, double.script = "a long answer that breaks", ["error-event"]
    lark, client = await feishu(aiohttp_server, gateway, url)
    shown = await feishu_ask(lark, client, "hello", "om_e")
    assert shown.startswith(notice_start(MODEL_DOWN, reason="server error"))
    assert len(lark.replies_to("om_e")) == 1


async def test_a_failed_node_is_an_empty_answer(
    aiohttp_server: Any, gateway: Any, fastgpt: tuple[FastGPTDouble, str]
) -> None:
    double, url = fastgpt
    double.script = ["node-error"]
    env = await dingtalk(aiohttp_server, gateway, url)
    notice = await ask(env, "hello")
    assert notice.startswith(notice_start(EMPTY_ANSWER))
    assert await env.client.app[STORE].backend_session("dingtalk:cid-dm-staff1") is None


async def test_a_wrong_key_gets_the_model_down_notice_naming_auth(
    aiohttp_server: Any, gateway: Any, fastgpt: tuple[FastGPTDouble, str]
) -> None:
    double, url = fastgpt
    env = await dingtalk(aiohttp_server, gateway, url, api_keys=[WRONG])
    notice = await ask(env, "hello")
    assert notice.startswith(notice_start(MODEL_DOWN, reason="auth"))
    assert len(double.requests) == 1 and double.turns == []  # one key: retrying cannot help


async def test_a_refused_key_among_several_is_benched_and_the_next_one_answers(
    aiohttp_server: Any, gateway: Any, fastgpt: tuple[FastGPTDouble, str]
) -> None:
    double, url = fastgpt
    env = await dingtalk(aiohttp_server, gateway, url, api_keys=[WRONG, KEY])
    assert await ask(env, "one") == "echo: one"
    assert await ask(env, "two") == "echo: two"
    assert double.auth_headers == [f"Bearer {WRONG}", f"Bearer {KEY}", f"Bearer {KEY}"]


# -- the backend alone ----------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def backend(url: str, http: aiohttp.ClientSession, **model: Any) -> FastGPTBackend:
    return FastGPTBackend(config(url, {}, **model).agents[0].model, http, Metrics())


async def answer(made: FastGPTBackend, text: str = "hi") -> tuple[list[tuple[DeltaKind, str]], Completion]:
    completion = Completion()
    request = BackendRequest([{"role": "user", "content": text}], text, "web:s1", "", "web", "s1", "web:s1")
    return [(d.kind, d.text) async for d in made.stream(request, completion)], completion


async def test_a_detail_stream_reads_the_same_and_stops_at_done(
    fastgpt: tuple[FastGPTDouble, str], http: aiohttp.ClientSession
) -> None:
    """With `detail`, node status frames come before the answer and `flowResponses` after [DONE]."""

    class Detailed(FastGPTBackend):
        detail = True

    double, url = fastgpt
    double.reasoning, double.thought = True, "hm"
    deltas, completion = await answer(Detailed(config(url, {}).agents[0].model, http, Metrics()))
    assert deltas == [(DeltaKind.REASONING, "hm"), (DeltaKind.ANSWER, "echo:"), (DeltaKind.ANSWER, " hi")]
    assert double.requests[0]["detail"] is True and completion.session == double.turns[0].chat_id
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (0, 0)


@pytest.mark.parametrize(
    ("step", "reason", "asked"),
    [
        (429, "rate_limited", 2),  # retried (max_retries = 1), the key benched for its cooldown
        (510, "rate_limited", 1),  # FastGPT's insufficientQuota: the team is out of points, no retry
        ("error-before", "server_error", 2),  # refused before the run: nothing ran, asked again
        (404, "bad_request", 1),  # base_url without /api/v1
    ],
)
async def test_errors_are_classified_by_fastgpts_code(
    fastgpt: tuple[FastGPTDouble, str], http: aiohttp.ClientSession, step: int | str, reason: str, asked: int
) -> None:
    double, url = fastgpt
    double.script = [step] * asked
    with pytest.raises(ModelError) as err:
        await answer(backend(url, http, max_retries=1, key_cooldown=0.0))
    assert err.value.reason == reason, err.value
    assert len(double.requests) == asked


async def test_configured_inputs_win_over_the_identity_variables(
    fastgpt: tuple[FastGPTDouble, str], http: aiohttp.ClientSession
) -> None:
    double, url = fastgpt
    await answer(backend(url, http, inputs={"platform": "im", "sender_id": ""}))
    assert double.turns[0].variables == {"platform": "im", "sender_id": "", "conversation_id": "s1"}


def test_a_new_chat_id_fits_fastgpt_and_is_the_conversations() -> None:
    one, two = new_chat_id("feishu/itbot:oc_x:user:ou_y"), new_chat_id("feishu/itbot:oc_x:user:ou_y")
    assert one != two and one.split("-")[0] == two.split("-")[0]
    assert len(one) < 250 and one.replace("-", "").isalnum()
    assert new_chat_id("dingtalk:c1").split("-")[0] != one.split("-")[0]


# -- doctor -----------------------------------------------------------------------------------------


async def diagnose(url: str, **agent: Any) -> str:
    """doctor's line for the agent."""
    lines: list[str] = []
    await doctor.run(config(url, {}, **agent), [], lines.append)
    (line,) = [line for line in lines if "agent kb model" in line]
    return line


async def test_doctor_passes_a_good_key_without_running_the_app(fastgpt: tuple[FastGPTDouble, str]) -> None:
    double, url = fastgpt
    line = await diagnose(url)
    assert line.startswith("PASS") and f"fastgpt at {url} accepted the key" in line, line
    assert double.requests == [{"messages": [], "stream": False}]
    assert double.turns == [] and double.chats == {}  # no chat, no points


@pytest.mark.parametrize("bad", [WRONG, "fastgpt-accountkey", "not-a-fastgpt-key-at-all"])
async def test_doctor_fails_naming_the_refused_key(fastgpt: tuple[FastGPTDouble, str], bad: str) -> None:
    double, url = fastgpt
    double.account_keys = {"fastgpt-accountkey"}
    line = await diagnose(url, api_keys=[KEY, bad])
    assert line.startswith("FAIL") and "(key 2 of 2)" in line, line
    assert "fix: check [[agents]] kb api_keys (BOTGATE_AGENTS__KB__API_KEYS): the app's own key" in line
    assert bad not in line  # secrets are masked
    if bad == "fastgpt-accountkey":
        assert "account key" in line
    assert double.turns == []


async def test_doctor_names_the_path_a_base_url_without_api_v1_lacks(
    fastgpt: tuple[FastGPTDouble, str],
) -> None:
    _, url = fastgpt
    line = await diagnose(url.removesuffix("/api/v1"))
    assert line.startswith("FAIL") and 'base_url must end in "/api/v1"' in line, line
    assert 'fix: check [[agents]] kb base_url: FastGPT\'s API with "/api/v1"' in line
