"""Build the skill registry from the executor's settings: which skills are real.

- llm_invoke: `ClaudeAdapter` when `ANTHROPIC_API_KEY` is set (to `ANTHROPIC_BASE_URL`
  if given), else the deterministic `StubLlmAdapter`. One flag, nothing else.
- http_call: httpx unless `AOS_HTTP_BACKEND=stub`; `DISABLE_EXTERNAL_CALLS` and
  `AOS_HTTP_ALLOW_HOSTS` shape what the real one may reach.
- json_transform: always the one implementation (deterministic by nature).
"""

from __future__ import annotations

from aos_executor.settings import ExecutorSettings
from aos_executor.skills.base import Skill
from aos_executor.skills.circuit import CircuitBreakers
from aos_executor.skills.claude import ClaudeAdapter
from aos_executor.skills.guard import HostPolicy
from aos_executor.skills.http import HttpCallSkill, StubHttpSkill
from aos_executor.skills.json import JsonTransformSkill
from aos_executor.skills.llm import LLMAdapter, LlmInvokeSkill, StubLlmAdapter
from aos_executor.skills.retry import RetryPolicy


def build_registry(settings: ExecutorSettings) -> dict[str, Skill]:
    breakers = CircuitBreakers(
        failure_threshold=settings.circuit_failure_threshold,
        cooldown_s=settings.circuit_cooldown_s,
    )
    retry = RetryPolicy(
        max_retries=settings.skill_max_retries,
        base_s=settings.skill_retry_base_s,
        max_retry_after_s=settings.skill_max_retry_after_s,
    )
    adapter: LLMAdapter
    if settings.anthropic_api_key is not None:
        adapter = ClaudeAdapter(
            api_key=settings.anthropic_api_key.get_secret_value(),
            base_url=settings.anthropic_base_url,
            retry=retry,
            breakers=breakers,
        )
    else:
        adapter = StubLlmAdapter()
    http: Skill
    if settings.http_backend == "stub":
        http = StubHttpSkill()
    else:
        http = HttpCallSkill(
            policy=HostPolicy.from_list(settings.disable_external_calls, settings.http_allow_hosts),
            breakers=breakers,
            retry=retry,
            max_bytes=settings.http_max_bytes,
        )
    return {
        "json_transform": JsonTransformSkill(),
        "llm_invoke": LlmInvokeSkill(adapter),
        "http_call": http,
    }


def default_registry() -> dict[str, Skill]:
    """Deterministic stubs for everything that would leave the process (unit tests)."""
    return {
        "json_transform": JsonTransformSkill(),
        "llm_invoke": LlmInvokeSkill(StubLlmAdapter()),
        "http_call": StubHttpSkill(),
    }


async def close_registry(skills: dict[str, Skill]) -> None:
    for skill in skills.values():
        await skill.aclose()
