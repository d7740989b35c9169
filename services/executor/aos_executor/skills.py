"""The skill registry: implementations of the skill contracts in aos_contracts.skills.

A skill takes validated params and returns a SkillResult (output and actual cost), or
raises SkillError with a Failure from the catalog. Which implementations are stubs is
part of the registry (`is_stub`), shown by `aos stubs` and the executor's /readyz.

In the walking skeleton `llm_invoke` and `http_call` are deterministic stubs; their real
implementations (ClaudeAdapter on the anthropic SDK, httpx) arrive with issue 3.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from aos_contracts.failures import Failure, FailureCode
from aos_contracts.skills import (
    SKILL_CONTRACTS,
    HttpCallParams,
    JsonTransformParams,
    LlmInvokeParams,
    SkillContract,
    estimate_input_tokens,
    llm_cost_cents,
)
from aos_executor import json_transform


class SkillError(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass(frozen=True)
class SkillResult:
    output: Any
    cost_cents: int = 0


class Skill(Protocol):
    contract: SkillContract
    is_stub: bool

    async def run(self, params: BaseModel) -> SkillResult: ...


class JsonTransformSkill:
    contract = SKILL_CONTRACTS["json_transform"]
    is_stub = False  # deterministic by nature: the real implementation is the stub

    async def run(self, params: BaseModel) -> SkillResult:
        assert isinstance(params, JsonTransformParams)
        try:
            return SkillResult(json_transform.apply(params))
        except json_transform.TransformError as exc:
            raise SkillError(
                Failure.of(FailureCode.INPUT_INVALID, f"json_transform {exc}")
            ) from exc


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


class StubLlmSkill:
    """Hash-based: the same prompt gives the same text and the same token counts, and the
    counts look like a real call's so budgets are exercised."""

    contract = SKILL_CONTRACTS["llm_invoke"]
    is_stub = True

    async def run(self, params: BaseModel) -> SkillResult:
        assert isinstance(params, LlmInvokeParams)
        seed = _digest(params.model, params.system or "", params.prompt)
        words = params.prompt.split()
        gist = " ".join(words[-12:]) if words else ""
        text = f"[stub {params.model} #{seed % 10_000:04d}] Summary: {gist}"
        input_tokens = estimate_input_tokens((params.system or "") + params.prompt)
        output_tokens = min(params.max_tokens, 40 + seed % 160)
        return SkillResult(
            output={
                "text": text,
                "model": params.model,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
                "stop_reason": "end_turn",
            },
            cost_cents=llm_cost_cents(params.model, input_tokens, output_tokens),
        )


@dataclass
class StubHttpSkill:
    """Pre-configured deterministic responses: the first URL prefix that matches wins;
    any other URL gets a 200 whose body echoes the request."""

    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    contract: SkillContract = SKILL_CONTRACTS["http_call"]
    is_stub: bool = True

    async def run(self, params: BaseModel) -> SkillResult:
        assert isinstance(params, HttpCallParams)
        for prefix, response in self.responses.items():
            if params.url.startswith(prefix):
                return SkillResult(json.loads(json.dumps(response)))
        return SkillResult(
            {
                "status": 200,
                "headers": {"content-type": "application/json"},
                "body": {"stub": True, "method": params.method, "url": params.url},
            }
        )


def default_registry() -> dict[str, Skill]:
    return {
        "json_transform": JsonTransformSkill(),
        "llm_invoke": StubLlmSkill(),
        "http_call": StubHttpSkill(),
    }
