"""The skill registry: implementations of the skill contracts in aos_contracts.skills.

Which implementations are stubs is part of the registry (`is_stub`, `backend`), shown by
`aos stubs` and the executor's /readyz. See docs/SKILLS.md.
"""

from aos_executor.skills.base import Skill, SkillContext, SkillError, SkillResult
from aos_executor.skills.circuit import CircuitBreaker, CircuitBreakers
from aos_executor.skills.claude import ClaudeAdapter
from aos_executor.skills.guard import HostPolicy
from aos_executor.skills.http import HttpCallSkill, StubHttpSkill
from aos_executor.skills.json import JsonTransformSkill
from aos_executor.skills.llm import (
    LLMAdapter,
    LlmInvokeSkill,
    LLMRequest,
    LLMResponse,
    StubLlmAdapter,
    TokenUsage,
)
from aos_executor.skills.registry import build_registry, close_registry, default_registry
from aos_executor.skills.retry import RetryPolicy

__all__ = [
    "CircuitBreaker",
    "CircuitBreakers",
    "ClaudeAdapter",
    "HostPolicy",
    "HttpCallSkill",
    "JsonTransformSkill",
    "LLMAdapter",
    "LLMRequest",
    "LLMResponse",
    "LlmInvokeSkill",
    "RetryPolicy",
    "Skill",
    "SkillContext",
    "SkillError",
    "SkillResult",
    "StubHttpSkill",
    "StubLlmAdapter",
    "TokenUsage",
    "build_registry",
    "close_registry",
    "default_registry",
]
