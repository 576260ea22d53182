"""The real OpenAI-compatible backend against a local OpenAI-compatible server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.backends import BackendRequest, Completion, Delta, DeltaKind, EchoBackend, OpenAIBackend, create_backend
from gateway.errors import ModelError
from gateway.metrics import Metrics
from tests.conftest import make_config
from tests.doubles.openai import OpenAIDouble

QUESTION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def client(
    openai_double: tuple[OpenAIDouble, str], session: aiohttp.ClientSession
) -> Any:
    """Build the real client for `[model]` settings, pointed at the double."""
    _, url = openai_double

    def build(**model: Any) -> tuple[OpenAIBackend, Metrics]:
        cfg = make_config(model={"base_url": url, "max_retries": 2, **model}).model
        metrics = Metrics()
        return OpenAIBackend(cfg, session, metrics), metrics

    return build


def request(messages: list[dict[str, Any]] = QUESTION) -> BackendRequest:
    return BackendRequest(messages, str(messages[-1]["content"]), "web:tester")


async def ask(model: Any, messages: list[dict[str, Any]] = QUESTION) -> tuple[list[str], Completion]:
    """The answer's text deltas (asserting there is no other kind) and the completion."""
    completion = Completion()
    deltas: list[Delta] = [d async for d in model.stream(request(messages), completion)]
    assert all(d.kind is DeltaKind.ANSWER for d in deltas), deltas
    return [d.text for d in deltas], completion


def errors(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("botgate_model_errors_total", {"reason": reason})
    return value or 0.0


def retries(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("botgate_model_retries_total", {"reason": reason})
    return value or 0.0


async def test_streams_word_by_word_with_model_and_usage(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    model, metrics = client(api_keys=["sk-one"], temperature=0.2, max_tokens=99)
    deltas, completion = await ask(model)
    assert deltas == ["echo:", " one", " two", " three"]
    assert completion.model == "gpt-4o-mini-0613"  # what the server reports, not what we asked
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 4)
    sent = double.requests[0]
    assert sent["stream"] is True and sent["messages"] == QUESTION
    assert (sent["model"], sent["temperature"], sent["max_tokens"]) == ("gpt-4o-mini", 0.2, 99)
    assert double.auth_headers == ["Bearer sk-one"]
    assert metrics.registry.get_sample_value("botgate_model_request_duration_seconds_count") == 1


async def test_json_answer_to_a_streaming_request_is_accepted(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.script = ["json"]
    model, _ = client()
    deltas, completion = await ask(model)
    assert deltas == ["echo: one two three"]
    assert completion.usage.completion_tokens == 4


async def test_stream_false_asks_for_and_reads_plain_json(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    model, _ = client(stream=False)
    deltas, completion = await ask(model)
    assert deltas == ["echo: one two three"]
    assert double.requests[0]["stream"] is False
    assert completion.model == "gpt-4o-mini-0613"


async def test_no_first_token_within_timeout_is_a_timeout_error(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.hold = True
    model, metrics = client(first_token_timeout=0.1, max_retries=1)
    with pytest.raises(ModelError) as err:
        await ask(model)
    assert err.value.reason == "first_token_timeout"
    assert len(double.requests) == 2  # retried once, as configured
    assert errors(metrics, "first_token_timeout") == 1
    assert retries(metrics, "first_token_timeout") == 1


async def test_total_timeout_bounds_the_whole_call(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.hold = True
    model, metrics = client(total_timeout=0.2, first_token_timeout=30.0)
    with pytest.raises(ModelError) as err:
        await ask(model)
    assert err.value.reason == "timeout"
    assert errors(metrics, "timeout") == 1


async def test_total_timeout_never_fires_inside_the_callers_code(client: Any) -> None:
    """A slow consumer (a card update between deltas) must not get a stray CancelledError: the
    deadline only applies while waiting for the model, and this answer had fully arrived."""
    model, _ = client(total_timeout=0.2)
    seen = []
    async for delta in model.stream(request(), Completion()):
        seen.append(delta.text)
        if len(seen) == 1:
            await asyncio.sleep(0.3)  # the caller's own slow work, past the model deadline
    assert "".join(seen) == "echo: one two three"


async def test_total_timeout_after_slow_caller_fires_at_the_next_model_wait(
    client: Any, openai_double: Any
) -> None:
    double, _ = openai_double
    double.script = ["stall"]
    model, metrics = client(total_timeout=0.2)
    seen = []
    with pytest.raises(ModelError) as err:
        async for delta in model.stream(request(), Completion()):
            seen.append(delta.text)
            await asyncio.sleep(0.3)  # the caller's own slow work, past the model deadline
    assert seen == ["echo:"]
    assert err.value.reason == "timeout"
    assert errors(metrics, "timeout") == 1


async def test_429_retry_after_is_honoured_then_success(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.script = [429]
    double.retry_after = "1"
    model, metrics = client(api_keys=["sk-only"])
    deltas, _ = await ask(model)
    assert "".join(deltas) == "echo: one two three"
    assert len(double.requests) == 2
    assert double.arrivals[1] - double.arrivals[0] >= 1.0  # waited as the server asked
    assert retries(metrics, "rate_limited") == 1
    assert errors(metrics, "rate_limited") == 0  # the call succeeded in the end


async def test_retry_after_beyond_the_deadline_fails_at_once(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.script = [429]
    double.retry_after = "3600"
    model, metrics = client(total_timeout=5.0)
    with pytest.raises(ModelError) as err:
        await ask(model)
    assert err.value.reason == "rate_limited"  # the real cause, not a timeout an hour later
    assert len(double.requests) == 1
    assert errors(metrics, "rate_limited") == 1


async def test_500_then_success_with_backoff(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.script = [500]
    double.retry_after = None  # plain jittered backoff
    model, metrics = client()
    deltas, _ = await ask(model)
    assert "".join(deltas) == "echo: one two three"
    assert len(double.requests) == 2
    assert retries(metrics, "server_error") == 1


async def test_persistent_500_fails_after_max_retries(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.script = [503] * 10
    model, metrics = client(max_retries=2)
    with pytest.raises(ModelError) as err:
        await ask(model)
    assert err.value.reason == "server_error"
    assert "503" in str(err.value)
    assert len(double.requests) == 3  # the first try and two retries
    assert errors(metrics, "server_error") == 1


async def test_400_is_not_retried(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.script = [400]
    model, metrics = client()
    with pytest.raises(ModelError) as err:
        await ask(model)
    assert err.value.reason == "bad_request"
    assert len(double.requests) == 1
    assert errors(metrics, "bad_request") == 1


async def test_dropped_connection_mid_stream_is_not_retried(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.script = ["drop"]
    model, metrics = client()
    completion = Completion()
    seen = []
    with pytest.raises(ModelError) as err:
        async for delta in model.stream(request(), completion):
            seen.append(delta.text)
    assert seen == ["echo:"]  # the partial answer reached the caller ...
    assert len(double.requests) == 1  # ... so it is never asked again (no repeated half answer)
    assert err.value.reason == "connection"
    assert "dropped mid-answer" in str(err.value)
    assert errors(metrics, "connection") == 1


async def test_stalled_stream_after_first_token_is_not_retried(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.script = ["stall"]
    model, metrics = client(first_token_timeout=0.2)
    seen = []
    with pytest.raises(ModelError) as err:
        async for delta in model.stream(request(), Completion()):
            seen.append(delta.text)
    assert seen == ["echo:"]
    assert err.value.reason == "read_timeout"
    assert len(double.requests) == 1
    assert errors(metrics, "read_timeout") == 1


async def test_refused_connection_is_retried_then_a_clear_error(session: aiohttp.ClientSession) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = Metrics()
    cfg = make_config(model={"base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 1}).model
    with pytest.raises(ModelError) as err:
        await ask(OpenAIBackend(cfg, session, metrics))
    assert err.value.reason == "connection"
    assert "unreachable" in str(err.value)
    assert retries(metrics, "connection") == 1 and errors(metrics, "connection") == 1


@pytest.mark.parametrize("step", ["garbage", "error-event"])
async def test_malformed_or_error_sse_is_a_clear_error(client: Any, openai_double: Any, step: str) -> None:
    double, _ = openai_double
    double.script = [step]
    model, metrics = client()
    with pytest.raises(ModelError) as err:
        await ask(model)
    reason = {"garbage": "bad_response", "error-event": "server_error"}[step]
    assert err.value.reason == reason
    assert len(double.requests) == 1
    assert errors(metrics, reason) == 1


async def test_keys_rotate_and_a_refused_key_sits_out(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.bad_keys = {"k2"}
    model, metrics = client(api_keys=["k1", "k2", "k3"], key_cooldown=3600.0)
    for _ in range(5):
        deltas, _ = await ask(model)
        assert "".join(deltas) == "echo: one two three"
    used = [h.removeprefix("Bearer ") for h in double.auth_headers]
    assert used == ["k1", "k2", "k3", "k1", "k3", "k1"]  # k2 refused once, then skipped
    assert retries(metrics, "auth") == 1 and errors(metrics, "auth") == 0


async def test_a_benched_key_comes_back_after_its_cooldown(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.bad_keys = {"k2"}
    model, _ = client(api_keys=["k1", "k2"], key_cooldown=0.05)
    await ask(model)
    await ask(model)  # k2 refused -> k1
    double.bad_keys = set()
    async with asyncio.timeout(5):
        while double.auth_headers[-1] != "Bearer k2":
            await ask(model)  # k1 until k2's cooldown has passed
    assert double.auth_headers.count("Bearer k2") == 2


async def test_a_single_refused_key_fails_without_retrying(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.bad_keys = {"sk-bad"}
    model, metrics = client(api_keys=["sk-bad"])
    with pytest.raises(ModelError) as err:
        await ask(model)
    assert err.value.reason == "auth" and "401" in str(err.value)
    assert len(double.requests) == 1
    assert errors(metrics, "auth") == 1


async def test_empty_answer_streams_nothing(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.answer = ""
    model, _ = client()
    deltas, _ = await ask(model)
    assert deltas == []


async def test_echo_is_the_default_without_a_base_url(session: aiohttp.ClientSession) -> None:
    model = create_backend(make_config().model, session, Metrics())
    assert isinstance(model, EchoBackend)
    deltas, completion = await ask(model, [{"role": "user", "content": "line one\nline two"}])
    assert deltas[0].startswith("> line one\n> line two\n\n")
    assert "尚未配置模型" in deltas[0]  # "no model is configured", in the default language
    assert completion.model == "echo"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("stream", [True, False])
async def test_thinking_in_a_field_of_its_own_is_yielded_as_reasoning(
    client: Any, openai_double: Any, field: str, stream: bool
) -> None:
    double, _ = openai_double
    double.reasoning, double.reasoning_as = "the user counts", field
    model, _ = client(stream=stream)
    completion = Completion()
    deltas = [d async for d in model.stream(request(), completion)]
    thinking = "".join(d.text for d in deltas if d.kind is DeltaKind.REASONING)
    answer = "".join(d.text for d in deltas if d.kind is DeltaKind.ANSWER)
    assert (thinking, answer) == ("the user counts", "echo: one two three")
    assert deltas[0].kind is DeltaKind.REASONING  # it comes first, and ...
    assert completion.first_byte_at is not None  # ... is the answer's first byte: no retry after it


async def test_inline_thinking_is_left_in_the_answer_text_for_the_answer_step(client: Any, openai_double: Any) -> None:
    double, _ = openai_double
    double.reasoning, double.reasoning_as = "hmm", "think"
    model, _ = client()
    deltas, _ = await ask(model)
    assert "".join(deltas) == "<think>hmm</think>\n\necho: one two three"
