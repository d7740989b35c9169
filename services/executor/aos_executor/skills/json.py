"""json_transform: deterministic by nature, so the real implementation is the stub."""

from __future__ import annotations

from pydantic import BaseModel

from aos_contracts import json_transform
from aos_contracts.failures import FailureCode
from aos_contracts.skills import SKILL_CONTRACTS, JsonTransformParams
from aos_executor.skills.base import SkillContext, SkillError, SkillResult


class JsonTransformSkill:
    contract = SKILL_CONTRACTS["json_transform"]
    is_stub = False
    backend = "builtin"

    async def run(self, params: BaseModel, context: SkillContext) -> SkillResult:
        assert isinstance(params, JsonTransformParams)
        try:
            return SkillResult(json_transform.apply(params))
        except json_transform.TransformError as exc:
            raise SkillError.of(FailureCode.INPUT_INVALID, f"json_transform {exc}") from exc

    async def aclose(self) -> None:
        pass
