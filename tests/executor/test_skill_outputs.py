"""What the skills really return matches the output models in their contracts, which the
planner checks `${steps.<id>.output.<field>}` references against."""

from __future__ import annotations

import httpx

from aos_contracts.skills import (
    SKILL_CONTRACTS,
    HttpCallOutput,
    HttpCallParams,
    LlmInvokeOutput,
    LlmInvokeParams,
)
from aos_executor.skills import HostPolicy, HttpCallSkill, SkillContext, StubHttpSkill
from aos_executor.skills.llm import (
    LlmInvokeSkill,
    LLMRequest,
    LLMResponse,
    StubLlmAdapter,
    TextSink,
    TokenUsage,
)


async def test_http_call_output_matches_its_model() -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": [1, 2]})

    skill = HttpCallSkill(
        policy=HostPolicy.from_list(False, "127.0.0.1"),
        client=httpx.AsyncClient(transport=httpx.MockTransport(reply)),
    )
    try:
        result = await skill.run(
            HttpCallParams(url="http://127.0.0.1/notes"), SkillContext.detached("http_call")
        )
    finally:
        await skill.aclose()
    output = HttpCallOutput.model_validate(result.output)
    assert output.status == 200
    assert output.body == {"items": [1, 2]}
    assert frozenset(result.output) == SKILL_CONTRACTS["http_call"].output_fields


async def test_the_http_stub_output_matches_the_model() -> None:
    result = await StubHttpSkill().run(
        HttpCallParams(url="https://example.com/a"), SkillContext.detached("http_call")
    )
    HttpCallOutput.model_validate(result.output)


class ToolUsingAdapter:
    name = "tools"
    is_stub = True

    async def invoke(self, request: LLMRequest, on_text: TextSink | None) -> LLMResponse:
        return LLMResponse(
            text="",
            model=request.model,
            usage=TokenUsage(input_tokens=3, output_tokens=4),
            stop_reason="tool_use",
            cost_cents=1,
            tool_calls=[{"id": "t1", "name": "lookup", "input": {"q": "x"}}],
        )

    async def aclose(self) -> None:
        pass


async def test_llm_invoke_output_matches_its_model() -> None:
    fields = SKILL_CONTRACTS["llm_invoke"].output_fields
    plain = await LlmInvokeSkill(StubLlmAdapter()).run(
        LlmInvokeParams(prompt="hello"), SkillContext.detached("llm_invoke")
    )
    LlmInvokeOutput.model_validate(plain.output)
    tools = await LlmInvokeSkill(ToolUsingAdapter()).run(
        LlmInvokeParams(prompt="hello"), SkillContext.detached("llm_invoke")
    )
    assert LlmInvokeOutput.model_validate(tools.output).tool_calls
    assert frozenset(tools.output) == fields
