"""llm_invoke: one skill over an `LLMAdapter`, so providers can be added beside Claude.

An adapter turns an `LLMRequest` into an `LLMResponse` (text, tool calls, token usage,
cost in cents, how many calls it took) and may stream text deltas to `on_text` while it
runs. The skill publishes those deltas as progress and records usage in the trace.

Cost: before the call the contract estimates the worst case (every `max_tokens` at the
output price, see aos_contracts.skills); after it, the adapter prices the usage the
provider reported, cache writes and reads included, by the same rule
(`aos_contracts.skills.llm_price`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from aos_contracts.events import StepTelemetry
from aos_contracts.skills import (
    SKILL_CONTRACTS,
    LlmInvokeParams,
    SkillContract,
    estimate_input_tokens,
    llm_cost_cents,
)
from aos_executor.skills.base import SkillContext, SkillResult
from aos_executor.skills.circuit import CircuitState
from aos_plumbing import metrics

TextSink = Callable[[str], Awaitable[None]]

LLM_TOKENS = metrics.counter(
    "aos_llm_tokens_total",
    "LLM tokens used, by model and kind (input, output, cache_write, cache_read)",
    ("model", "kind"),
)
LLM_CENTS = metrics.counter("aos_llm_cents_total", "LLM spend in cents, by model", ("model",))


@dataclass(frozen=True)
class TokenUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def cost_cents(self, model: str) -> int:
        return llm_cost_cents(
            model,
            self.input_tokens,
            self.output_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
        }


@dataclass(frozen=True)
class LLMRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    system: str | None = None
    temperature: float | None = None
    tools: list[dict[str, Any]] | None = None
    stream: bool = True


@dataclass(frozen=True)
class LLMResponse:
    text: str
    model: str
    usage: TokenUsage
    stop_reason: str | None
    cost_cents: int
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 1
    retry_delays_s: list[float] = field(default_factory=list)
    circuit: str | None = None
    circuit_state: CircuitState | None = None


class LLMAdapter(Protocol):
    """What llm_invoke needs from a provider. Raise SkillError with a catalog code
    (LLM_RATE_LIMITED, LLM_OVERLOADED, CIRCUIT_OPEN, INPUT_INVALID, ...) on failure."""

    name: str
    is_stub: bool

    async def invoke(self, request: LLMRequest, on_text: TextSink | None) -> LLMResponse: ...

    async def aclose(self) -> None: ...


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


@dataclass
class StubLlmAdapter:
    """Hash-based and deterministic: the same request gives the same text and token
    counts, and the counts look like a real call's so budgets are exercised. `fixtures`
    maps a prompt substring to a fixed answer (the first that matches wins)."""

    fixtures: dict[str, str] = field(default_factory=dict)
    name: str = "stub"
    is_stub: bool = True

    async def invoke(self, request: LLMRequest, on_text: TextSink | None) -> LLMResponse:
        prompt = "\n".join(_message_text(message) for message in request.messages)
        seed = _digest(request.model, request.system or "", prompt)
        text = next((answer for key, answer in self.fixtures.items() if key in prompt), None)
        if text is None:
            words = prompt.split()
            gist = " ".join(words[-12:]) if words else ""
            text = f"[stub {request.model} #{seed % 10_000:04d}] Summary: {gist}"
        if on_text is not None and request.stream:
            for start in range(0, len(text), 32):
                await on_text(text[start : start + 32])
        usage = TokenUsage(
            input_tokens=estimate_input_tokens((request.system or "") + prompt),
            output_tokens=min(request.max_tokens, 40 + seed % 160),
        )
        return LLMResponse(
            text=text,
            model=request.model,
            usage=usage,
            stop_reason="end_turn",
            cost_cents=usage.cost_cents(request.model),
        )

    async def aclose(self) -> None:
        pass


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(block.get("text", "")) for block in content if isinstance(block, dict))
    return ""


@dataclass
class LlmInvokeSkill:
    adapter: LLMAdapter
    contract: SkillContract = SKILL_CONTRACTS["llm_invoke"]

    @property
    def is_stub(self) -> bool:
        return self.adapter.is_stub

    @property
    def backend(self) -> str:
        return self.adapter.name

    async def run(self, params: BaseModel, context: SkillContext) -> SkillResult:
        assert isinstance(params, LlmInvokeParams)
        request = LLMRequest(
            model=params.model,
            messages=[{"role": "user", "content": params.prompt}],
            max_tokens=params.max_tokens,
            system=params.system,
            temperature=params.temperature,
            tools=params.tools,
            stream=params.stream,
        )

        async def on_text(delta: str) -> None:
            await context.progress("llm.text", delta)

        response = await self.adapter.invoke(request, on_text)
        usage = response.usage
        for direction, tokens in (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_write", usage.cache_creation_input_tokens),
            ("cache_read", usage.cache_read_input_tokens),
        ):
            LLM_TOKENS.labels(response.model, direction).inc(tokens)
        LLM_CENTS.labels(response.model).inc(response.cost_cents)
        output: dict[str, Any] = {
            "text": response.text,
            "model": response.model,
            "usage": response.usage.as_dict(),
            "stop_reason": response.stop_reason,
        }
        if response.tool_calls:
            output["tool_calls"] = response.tool_calls
        return SkillResult(
            output=output,
            cost_cents=response.cost_cents,
            telemetry=StepTelemetry(
                backend=self.adapter.name,
                calls=response.calls,
                retries=max(0, response.calls - 1),
                retry_delays_s=response.retry_delays_s,
                circuit=response.circuit,
                circuit_state=response.circuit_state,
                model=response.model,
                **response.usage.as_dict(),
            ),
        )

    async def aclose(self) -> None:
        await self.adapter.aclose()
