"""Skill contracts: what the planner may put in a plan and the executor must run.

The implementations live in the executor; the contracts (input schema, output
fields, side-effect class, cost estimate) live here because the planner needs them to
validate and to estimate a plan before any step runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SideEffect(StrEnum):
    PURE = "pure"  # no effect outside the step: safe to run again
    IDEMPOTENT = "idempotent"  # an effect, but running it twice equals running it once
    UNSAFE = "unsafe"  # an effect that must happen at most once


class JsonTransformParams(BaseModel):
    """One operation over JSON values. `input` is usually a reference to an earlier output.

    - extract: value at `path` of `input` ("a.b.0.c"; integers index lists)
    - map:     for a list `input`, the value at `path` of every item
    - filter:  for a list `input`, the items whose value at `path` equals `equals`
    - pick:    for an object `input`, only `keys`
    - omit:    for an object `input`, all but `keys`
    - merge:   for a list of objects `inputs`, one object; later keys win
    A missing path or a value of the wrong type fails with INPUT_INVALID naming the path.
    """

    model_config = ConfigDict(extra="forbid")

    op: Literal["extract", "map", "filter", "pick", "omit", "merge"]
    input: Any = None
    inputs: list[Any] | None = None
    path: str | None = None
    keys: list[str] | None = None
    equals: Any = None


class LlmInvokeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1)]
    system: str | None = None
    model: str = "claude-sonnet-4-6"
    max_tokens: Annotated[int, Field(ge=1, le=64_000)] = 512
    temperature: Annotated[float, Field(ge=0, le=1)] = 0.0
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="tool definitions (name, description, input_schema)"
    )
    stream: bool = Field(default=True, description="stream text deltas as progress events")


class HttpCallParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=1)]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    json_body: Any = None
    body: str | None = Field(default=None, description="a raw request body (not with json_body)")
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    max_bytes: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="refuse a response body larger than this (default: executor's)"
    )
    idempotent: bool = Field(
        default=False,
        description="the server deduplicates this POST or PATCH by its Idempotency-Key "
        "header, so making the call again is safe (GET, HEAD, PUT, DELETE and OPTIONS are "
        "safe to repeat anyway)",
    )


# Methods whose repetition has the effect of one call (RFC 9110, 9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


def http_call_retry_safe(params: dict[str, Any]) -> bool:
    """An http_call may be made again when its method is idempotent, or when the step
    says the server deduplicates it by Idempotency-Key."""
    method = str(params.get("method", "GET")).upper()
    return method in IDEMPOTENT_METHODS or params.get("idempotent") is True


class HttpCallOutput(BaseModel):
    """What http_call returns (a status of 400 or more is a failure, not an output)."""

    model_config = ConfigDict(extra="forbid")

    status: int
    headers: dict[str, str] = Field(description="response headers, names in lower case")
    body: Any = Field(description="decoded JSON for a JSON content type, else text")
    url: str | None = Field(default=None, description="the URL called (not set by the stub)")


class LlmUsage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class LlmInvokeOutput(BaseModel):
    """What llm_invoke returns, whichever adapter (Claude, the stub) ran it."""

    model_config = ConfigDict(extra="forbid")

    text: str
    model: str
    usage: LlmUsage
    stop_reason: str | None
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="only when the model used tools"
    )


# Prices in cents per million tokens: (input, output). Priced by `llm_price`.
LLM_PRICES_CENTS_PER_MTOK: dict[str, tuple[int, int]] = {
    "claude-opus-4-1": (1500, 7500),
    "claude-opus-4-6": (500, 2500),
    "claude-sonnet-4-6": (300, 1500),
    "claude-sonnet-4-5": (300, 1500),  # end of life 2026-11-30; kept so old runs price right
    "claude-haiku-4-5": (100, 500),
}
# What may follow a table name in a model id it prices: a date (`-20251001`) or a
# Vertex-style version (`@20251001`). So `claude-opus-4-10` is not priced as
# `claude-opus-4-1`: a name only matches at a boundary.
_MODEL_SUFFIX_SEPARATORS = ("-", "@")


@dataclass(frozen=True)
class ModelPrice:
    """Cents per million tokens of each kind."""

    input: float
    output: float
    cache_write: float
    cache_read: float


def _claude_price(input_price: int, output_price: int) -> ModelPrice:
    # Anthropic's prompt caching: writes cost 1.25x input (5-minute cache), reads 0.1x.
    return ModelPrice(input_price, output_price, input_price * 1.25, input_price * 0.1)


LLM_PRICES: dict[str, ModelPrice] = {
    model: _claude_price(price_in, price_out)
    for model, (price_in, price_out) in LLM_PRICES_CENTS_PER_MTOK.items()
}
DEAREST_LLM_PRICE = max(LLM_PRICES.values(), key=lambda price: price.output)


def llm_price(model: str) -> ModelPrice:
    """The one pricing rule, used for every reservation and every charge (the planner's
    calls, llm_invoke's worst case, llm_invoke's cost from reported usage): the longest
    table name that is the model id or a prefix of it up to a `-` or `@`
    (`claude-haiku-4-5-20251001` is `claude-haiku-4-5`), else the dearest model's price,
    so that an unknown model is never reserved or charged less than it may cost."""
    matches = [
        name
        for name in LLM_PRICES
        if model == name
        or (model.startswith(name) and model[len(name)].startswith(_MODEL_SUFFIX_SEPARATORS))
    ]
    return LLM_PRICES[max(matches, key=len)] if matches else DEAREST_LLM_PRICE


def llm_cost_cents(
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_creation_input_tokens: int = 0,
    cache_read_input_tokens: int = 0,
) -> int:
    """What tokens of `model` cost, in whole cents rounded up (`llm_price`)."""
    price = llm_price(model)
    total = (
        input_tokens * price.input
        + output_tokens * price.output
        + cache_creation_input_tokens * price.cache_write
        + cache_read_input_tokens * price.cache_read
    )
    # Round to a micro-cent first so float noise never adds a whole cent.
    return math.ceil(round(total / 1_000_000, 6))


def estimate_input_tokens(text: str) -> int:
    """A cheap upper-leaning estimate (about four characters a token)."""
    return max(1, math.ceil(len(text) / 3))


def _estimate_llm(params: dict[str, Any]) -> int:
    parsed = LlmInvokeParams.model_validate(params)
    text = (parsed.system or "") + parsed.prompt
    # Worst case: every allowed output token is spent.
    return llm_cost_cents(parsed.model, estimate_input_tokens(text), parsed.max_tokens)


@dataclass(frozen=True)
class SkillContract:
    name: str
    version: str
    description: str
    params_model: type[BaseModel]
    side_effect: SideEffect
    timeout_s: float
    max_attempts: int
    estimate_cents: Callable[[dict[str, Any]], int]
    # The output when it is an object with fixed fields; None: any JSON value.
    output_model: type[BaseModel] | None = None
    # For an unsafe skill: which params make a call safe to make again after all.
    retry_safe_when: Callable[[dict[str, Any]], bool] | None = None

    def retry_safe(self, params: dict[str, Any]) -> bool:
        """Whether a call with `params` may be made again when its outcome is unknown (the
        executor died mid-call): pure and idempotent skills always, an unsafe one only
        when its params say so."""
        if self.side_effect is not SideEffect.UNSAFE:
            return True
        return self.retry_safe_when is not None and self.retry_safe_when(params)

    @property
    def output_fields(self) -> frozenset[str] | None:
        """The top-level fields of the output, or None when the output is any JSON."""
        if self.output_model is None:
            return None
        return frozenset(self.output_model.model_fields)


def _free(params: dict[str, Any]) -> int:
    return 0


SKILL_CONTRACTS: dict[str, SkillContract] = {
    contract.name: contract
    for contract in (
        SkillContract(
            name="json_transform",
            version="1",
            description="extract, map, filter, pick, omit or merge JSON values",
            params_model=JsonTransformParams,
            side_effect=SideEffect.PURE,
            timeout_s=5.0,
            max_attempts=1,
            estimate_cents=_free,
            output_model=None,  # any JSON value: whatever the operation produced
        ),
        SkillContract(
            name="llm_invoke",
            version="1",
            description="ask a language model; cost from token usage",
            params_model=LlmInvokeParams,
            side_effect=SideEffect.IDEMPOTENT,
            timeout_s=120.0,
            max_attempts=3,
            estimate_cents=_estimate_llm,
            output_model=LlmInvokeOutput,
        ),
        SkillContract(
            name="http_call",
            version="1",
            description="call an HTTP endpoint",
            params_model=HttpCallParams,
            side_effect=SideEffect.UNSAFE,
            timeout_s=30.0,
            max_attempts=3,
            estimate_cents=_free,
            output_model=HttpCallOutput,
            retry_safe_when=http_call_retry_safe,
        ),
    )
}


def output_fields_by_skill(
    contracts: Mapping[str, SkillContract] = SKILL_CONTRACTS,
) -> dict[str, frozenset[str]]:
    """Skill name -> top-level output fields, for `plan_problems`; skills whose output is
    any JSON are left out (a reference into their output is not checked)."""
    return {
        name: fields
        for name, contract in contracts.items()
        if (fields := contract.output_fields) is not None
    }
