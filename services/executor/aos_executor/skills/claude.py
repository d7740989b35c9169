"""ClaudeAdapter: llm_invoke on the official `anthropic` SDK (AsyncAnthropic).

The SDK's own retries are off (`max_retries=0`) so that every call is counted in the
trace and goes through the circuit breaker: this adapter retries 429 (rate limited)
and 529 (overloaded), plus 5xx, timeouts and failed connections, with backoff and
jitter, honouring the `retry-after` header. A 400-class answer is not retried.

`ANTHROPIC_BASE_URL` points the SDK elsewhere (a gateway, or the tests' local server
that speaks the Messages API).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anthropic

from aos_contracts.events import StepTelemetry
from aos_contracts.failures import Failure, FailureCode
from aos_executor.skills.base import SkillError
from aos_executor.skills.circuit import CircuitBreaker, CircuitBreakers, attempt_telemetry
from aos_executor.skills.llm import LLMRequest, LLMResponse, TextSink, TokenUsage
from aos_executor.skills.retry import RetryPolicy, parse_retry_after


class _Retryable(Exception):
    def __init__(self, failure: Failure, retry_after: float | None, unhealthy: bool) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.retry_after = retry_after
        self.unhealthy = unhealthy


def _error_type(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("type", ""))
    return ""


@dataclass
class ClaudeAdapter:
    api_key: str
    base_url: str | None = None
    timeout_s: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    name: str = "claude"
    is_stub: bool = False
    client: anthropic.AsyncAnthropic = field(init=False)

    def __post_init__(self) -> None:
        self.client = anthropic.AsyncAnthropic(
            api_key=self.api_key,
            base_url=self.base_url,
            max_retries=0,
            timeout=self.timeout_s,
        )

    async def aclose(self) -> None:
        await self.client.close()

    async def invoke(self, request: LLMRequest, on_text: TextSink | None) -> LLMResponse:
        breaker = self.breakers.get("llm:claude")
        delays: list[float] = []
        calls = 0
        while True:
            if not breaker.allow():
                raise SkillError(
                    Failure.of(
                        FailureCode.CIRCUIT_OPEN,
                        "llm_invoke: circuit for Claude is open after repeated failures",
                    ),
                    self._telemetry(request, calls, delays, breaker),
                )
            calls += 1
            try:
                message = await self._call_once(request, on_text)
            except _Retryable as outcome:
                if outcome.unhealthy:
                    breaker.record_failure()
                else:
                    breaker.record_success()
                delay = self.retry.delay(len(delays), outcome.retry_after)
                if delay is None:
                    raise SkillError(
                        outcome.failure, self._telemetry(request, calls, delays, breaker)
                    ) from None
                delays.append(round(delay, 3))
                await self.retry.sleep(delay)
                continue
            except SkillError as exc:
                breaker.record_success()  # the API answered: it is healthy
                raise SkillError(
                    exc.failure, self._telemetry(request, calls, delays, breaker)
                ) from exc
            except BaseException:
                breaker.release()
                raise
            breaker.record_success()
            return self._response(request, message, calls, delays, breaker)

    async def _call_once(self, request: LLMRequest, on_text: TextSink | None) -> Any:
        kwargs: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": request.messages,
        }
        if request.system:
            kwargs["system"] = request.system
        if request.temperature is not None:
            # anthropic 2.x no longer types sampling parameters (newer models reject
            # them); the Messages API still takes temperature for models that accept it.
            kwargs["extra_body"] = {"temperature": request.temperature}
        if request.tools:
            kwargs["tools"] = request.tools
        try:
            if not request.stream:
                return await self.client.messages.create(**kwargs)
            async with self.client.messages.stream(**kwargs) as stream:
                async for event in stream:
                    if event.type == "text" and on_text is not None:
                        await on_text(event.text)
                return await stream.get_final_message()
        except anthropic.APIStatusError as exc:
            raise self._classify(exc) from exc
        except anthropic.APITimeoutError as exc:
            raise _Retryable(
                Failure.of(FailureCode.SKILL_TIMEOUT, "llm_invoke: Claude did not answer in time"),
                None,
                unhealthy=True,
            ) from exc
        except anthropic.APIConnectionError as exc:
            raise _Retryable(
                Failure.of(FailureCode.HTTP_5XX, f"llm_invoke: cannot reach Claude: {exc}"),
                None,
                unhealthy=True,
            ) from exc

    def _classify(self, exc: anthropic.APIStatusError) -> Exception:
        status = exc.status_code
        kind = _error_type(exc)
        retry_after = parse_retry_after(exc.response.headers.get("retry-after"))
        detail = f"llm_invoke: Claude answered {status} {kind or ''}: {exc.message}".strip()
        if status == 429 or kind == "rate_limit_error":
            return _Retryable(Failure.of(FailureCode.LLM_RATE_LIMITED, detail), retry_after, False)
        if status == 529 or kind == "overloaded_error":
            return _Retryable(Failure.of(FailureCode.LLM_OVERLOADED, detail), retry_after, True)
        if status >= 500 or kind == "api_error":
            return _Retryable(Failure.of(FailureCode.HTTP_5XX, detail), retry_after, True)
        if status in (400, 404, 413, 422):
            return SkillError.of(FailureCode.INPUT_INVALID, detail)
        return SkillError.of(FailureCode.HTTP_4XX, detail)

    def _telemetry(
        self, request: LLMRequest, calls: int, delays: list[float], breaker: CircuitBreaker
    ) -> StepTelemetry:
        return attempt_telemetry(self.name, breaker, calls, delays, model=request.model)

    def _response(
        self,
        request: LLMRequest,
        message: Any,
        calls: int,
        delays: list[float],
        breaker: CircuitBreaker,
    ) -> LLMResponse:
        texts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        for block in message.content:
            if block.type == "text":
                texts.append(block.text)
            elif block.type == "tool_use":
                tool_calls.append({"id": block.id, "name": block.name, "input": block.input})
        raw = message.usage
        usage = TokenUsage(
            input_tokens=raw.input_tokens or 0,
            output_tokens=raw.output_tokens or 0,
            cache_creation_input_tokens=getattr(raw, "cache_creation_input_tokens", None) or 0,
            cache_read_input_tokens=getattr(raw, "cache_read_input_tokens", None) or 0,
        )
        model = str(message.model or request.model)
        return LLMResponse(
            text="".join(texts),
            model=model,
            usage=usage,
            stop_reason=message.stop_reason,
            cost_cents=usage.cost_cents(model),
            tool_calls=tool_calls,
            calls=calls,
            retry_delays_s=delays,
            circuit=breaker.key,
            circuit_state=breaker.state,
        )
