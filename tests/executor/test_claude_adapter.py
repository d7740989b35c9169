"""ClaudeAdapter with the real anthropic SDK against a local Messages API server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from aos_contracts.failures import FailureCode
from aos_contracts.progress import StepProgress
from aos_contracts.skills import LlmInvokeParams
from aos_executor.skills import (
    CircuitBreakers,
    ClaudeAdapter,
    LlmInvokeSkill,
    RetryPolicy,
    SkillContext,
    SkillError,
    TokenUsage,
)
from tests.executor.messages_api import MessagesApi


class RecordedSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
async def api() -> AsyncIterator[MessagesApi]:
    server = await MessagesApi().start()
    try:
        yield server
    finally:
        await server.stop()


def make_skill(
    api: MessagesApi,
    sleep: RecordedSleep,
    *,
    retries: int = 2,
    breakers: CircuitBreakers | None = None,
) -> LlmInvokeSkill:
    adapter = ClaudeAdapter(
        api_key="test-key",
        base_url=api.base_url,
        retry=RetryPolicy(max_retries=retries, sleep=sleep),
        breakers=breakers or CircuitBreakers(),
    )
    return LlmInvokeSkill(adapter)


def context(progress: list[StepProgress]) -> SkillContext:
    async def sink(message: StepProgress) -> None:
        progress.append(message)

    ctx = SkillContext.detached("llm_invoke")
    ctx.sink = sink
    return ctx


PARAMS = LlmInvokeParams(
    prompt="Summarise the notes", system="You are terse.", max_tokens=300, temperature=0.2
)


async def test_streaming_call_returns_text_usage_and_cents_and_streams_deltas(
    api: MessagesApi,
) -> None:
    sleep = RecordedSleep()
    skill = make_skill(api, sleep)
    progress: list[StepProgress] = []
    try:
        result = await skill.run(PARAMS, context(progress))
    finally:
        await skill.aclose()

    assert skill.is_stub is False and skill.backend == "claude"
    assert result.output["text"] == api.text
    assert result.output["usage"] == api.usage
    assert result.output["stop_reason"] == "end_turn"
    # The deltas, in order, are the text; each is one progress message.
    assert [p.kind for p in progress] == ["llm.text"] * len(progress)
    assert "".join(p.text for p in progress) == api.text
    assert [p.seq for p in progress] == list(range(len(progress)))
    # 1200 in at 300 + 80 out at 1500 + 400 cache-write at 375 + 2000 cache-read at 30
    # cents per million tokens = 0.36 + 0.12 + 0.15 + 0.06 = 0.69 -> 1 cent.
    assert result.cost_cents == 1 == TokenUsage(**api.usage).cost_cents("claude-sonnet-4-5")
    telemetry = result.telemetry
    assert telemetry is not None
    assert (telemetry.calls, telemetry.retries, telemetry.circuit_state) == (1, 0, "closed")
    assert (telemetry.input_tokens, telemetry.output_tokens) == (1200, 80)
    assert telemetry.cache_read_input_tokens == 2000
    # What the SDK sent: the request the skill built, with the key.
    [sent] = api.requests
    assert sent["system"] == "You are terse."
    assert sent["max_tokens"] == 300 and sent["temperature"] == 0.2 and sent["stream"] is True
    assert sent["messages"] == [{"role": "user", "content": "Summarise the notes"}]
    sent_headers = api.headers[0]
    assert "test-key" in (sent_headers.get("x-api-key"), sent_headers.get("authorization", "")[7:])
    assert "anthropic-version" in sent_headers
    assert sleep.delays == []


async def test_non_streaming_call_and_tool_definitions(api: MessagesApi) -> None:
    skill = make_skill(api, RecordedSleep())
    tool = {
        "name": "get_weather",
        "description": "the weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    params = LlmInvokeParams(prompt="Weather in Paris?", tools=[tool], stream=False)
    progress: list[StepProgress] = []
    try:
        result = await skill.run(params, context(progress))
    finally:
        await skill.aclose()
    assert api.requests[0]["tools"] == [tool]
    assert "stream" not in api.requests[0] or api.requests[0]["stream"] is False
    assert result.output["tool_calls"] == [
        {"id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}
    ]
    assert result.output["stop_reason"] == "tool_use"
    assert progress == []


async def test_streamed_tool_use_is_assembled(api: MessagesApi) -> None:
    skill = make_skill(api, RecordedSleep())
    tool = {"name": "get_weather", "input_schema": {"type": "object"}}
    try:
        result = await skill.run(
            LlmInvokeParams(prompt="Weather?", tools=[tool]), SkillContext.detached()
        )
    finally:
        await skill.aclose()
    assert result.output["tool_calls"][0]["input"] == {"city": "Paris"}


async def test_429_and_529_are_retried_honouring_retry_after(api: MessagesApi) -> None:
    api.script = ["429", "529"]
    api.retry_after = "3"
    sleep = RecordedSleep()
    skill = make_skill(api, sleep)
    try:
        result = await skill.run(PARAMS, SkillContext.detached())
    finally:
        await skill.aclose()
    assert result.output["text"] == api.text
    assert len(api.requests) == 3
    assert sleep.delays == [3.0, 3.0]
    assert result.telemetry is not None
    assert (result.telemetry.calls, result.telemetry.retries) == (3, 2)
    assert result.telemetry.retry_delays_s == [3.0, 3.0]


async def test_rate_limit_that_outlasts_the_retries_fails_retryably(api: MessagesApi) -> None:
    api.script = ["429", "429", "429"]
    skill = make_skill(api, RecordedSleep(), retries=2)
    with pytest.raises(SkillError) as caught:
        await skill.run(PARAMS, SkillContext.detached())
    await skill.aclose()
    assert caught.value.failure.code is FailureCode.LLM_RATE_LIMITED
    assert caught.value.failure.retryable is True
    assert caught.value.telemetry is not None and caught.value.telemetry.calls == 3


async def test_overloaded_fails_with_llm_overloaded(api: MessagesApi) -> None:
    api.script = ["529", "529"]
    skill = make_skill(api, RecordedSleep(), retries=1)
    with pytest.raises(SkillError) as caught:
        await skill.run(PARAMS, SkillContext.detached())
    await skill.aclose()
    assert caught.value.failure.code is FailureCode.LLM_OVERLOADED
    assert "overloaded_error" in caught.value.failure.message


async def test_retry_after_longer_than_allowed_gives_up_at_once(api: MessagesApi) -> None:
    api.script = ["429"]
    api.retry_after = "3600"
    sleep = RecordedSleep()
    skill = make_skill(api, sleep)
    with pytest.raises(SkillError) as caught:
        await skill.run(PARAMS, SkillContext.detached())
    await skill.aclose()
    assert caught.value.failure.code is FailureCode.LLM_RATE_LIMITED
    assert len(api.requests) == 1 and sleep.delays == []


async def test_invalid_request_is_not_retried(api: MessagesApi) -> None:
    api.script = ["400"]
    sleep = RecordedSleep()
    skill = make_skill(api, sleep)
    with pytest.raises(SkillError) as caught:
        await skill.run(PARAMS, SkillContext.detached())
    await skill.aclose()
    assert caught.value.failure.code is FailureCode.INPUT_INVALID
    assert caught.value.failure.retryable is False
    assert "invalid_request_error" in caught.value.failure.message
    assert len(api.requests) == 1 and sleep.delays == []


async def test_circuit_opens_after_repeated_overloads_and_stops_calling(api: MessagesApi) -> None:
    now = [0.0]
    breakers = CircuitBreakers(failure_threshold=2, cooldown_s=30.0, clock=lambda: now[0])
    api.script = ["529", "529"]
    skill = make_skill(api, RecordedSleep(), retries=5, breakers=breakers)
    with pytest.raises(SkillError) as caught:
        await skill.run(PARAMS, SkillContext.detached())
    assert caught.value.failure.code is FailureCode.CIRCUIT_OPEN
    assert caught.value.telemetry is not None
    assert caught.value.telemetry.circuit_state == "open"
    assert len(api.requests) == 2  # the third call never left the process

    # After the cool-down one probe goes through; it succeeds and closes the circuit.
    now[0] = 31.0
    result = await skill.run(PARAMS, SkillContext.detached())
    await skill.aclose()
    assert result.telemetry is not None and result.telemetry.circuit_state == "closed"
    assert len(api.requests) == 3


def test_usage_is_priced_per_model_with_cache_tokens() -> None:
    usage = TokenUsage(
        input_tokens=1_000_000,
        output_tokens=1_000_000,
        cache_creation_input_tokens=1_000_000,
        cache_read_input_tokens=1_000_000,
    )
    # haiku: 100 in + 500 out + 125 cache write + 10 cache read (cents per MTok)
    assert usage.cost_cents("claude-haiku-4-5") == 735
    assert usage.cost_cents("claude-haiku-4-5-20251001") == 735  # dated names by prefix
    # An unknown model is priced as the dearest, never cheaper.
    assert usage.cost_cents("some-new-model") == usage.cost_cents("claude-opus-4-1")
    assert TokenUsage().cost_cents("claude-sonnet-4-5") == 0
