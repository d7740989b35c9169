"""An unsafe skill is called at most once per step, across attempts, replicas, restarts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from pydantic import BaseModel

from aos_cli.embedded import InfraUrls
from aos_contracts.events import StepFailed
from aos_contracts.failures import Failure, FailureCode
from aos_contracts.plans import PlanStep
from aos_contracts.skills import SKILL_CONTRACTS, HttpCallParams, SkillContract
from aos_executor.idempotency import Claim, InMemoryIdempotencyStore
from aos_executor.runs import StepStatus
from aos_executor.service import ExecutorService
from aos_executor.settings import ExecutorSettings
from aos_executor.skills import SkillContext, SkillError, SkillResult
from tests.executor.test_every_run_ends import http_step, planned
from tests.executor.test_runs import reserved_for
from tests.support.processes import free_port


@dataclass
class CountingEffect:
    """An unsafe skill that counts its calls; it can be told to fail or to be slow."""

    calls: int = 0
    fail_with: FailureCode | None = None
    delay_s: float = 0.0
    contract: SkillContract = SKILL_CONTRACTS["http_call"]
    is_stub: bool = False
    backend: str = "counting"

    async def run(self, params: BaseModel, context: SkillContext) -> SkillResult:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.fail_with is not None:
            raise SkillError(Failure.of(self.fail_with, "the far side said no"))
        return SkillResult({"status": 201, "call": self.calls}, cost_cents=2)

    async def aclose(self) -> None:
        """Holds nothing to release."""


def executor(infra: InfraUrls, namespace: str) -> ExecutorService:
    settings = ExecutorSettings.model_validate(
        {"REDIS_URL": infra.redis_url, "AOS_NAMESPACE": namespace}
    )
    return ExecutorService(settings)


@pytest.fixture
async def replicas(infra: InfraUrls, namespace: str) -> AsyncIterator[list[ExecutorService]]:
    services = [executor(infra, namespace) for _ in range(2)]
    yield services
    for service in services:
        await service.idempotency.close()


def context(step_id: str = "fetch") -> SkillContext:
    return SkillContext(run_id=uuid.uuid4(), tenant="acme", step_id=step_id, skill="http_call")


PARAMS = HttpCallParams(url="http://127.0.0.1:9/x", method="POST")


async def test_two_replicas_running_the_same_step_call_the_effect_once(
    replicas: list[ExecutorService],
) -> None:
    effect = CountingEffect(delay_s=0.3)
    key = f"{uuid.uuid4()}:fetch"
    results = await asyncio.gather(
        *(service.call_skill(effect, PARAMS, context(), key=key, limit_s=5) for service in replicas)
    )
    assert effect.calls == 1
    assert [r.output for r in results] == [{"status": 201, "call": 1}] * 2


async def test_a_restarted_executor_returns_the_recorded_result(
    infra: InfraUrls, namespace: str, replicas: list[ExecutorService]
) -> None:
    effect = CountingEffect()
    key = f"{uuid.uuid4()}:fetch"
    first = await replicas[0].call_skill(effect, PARAMS, context(), key=key, limit_s=5)
    restarted = executor(infra, namespace)
    try:
        again = await restarted.call_skill(effect, PARAMS, context(), key=key, limit_s=5)
    finally:
        await restarted.idempotency.close()
    assert effect.calls == 1
    assert again.output == first.output and again.cost_cents == first.cost_cents == 2


async def test_a_failure_with_a_known_outcome_lets_the_retry_call_again(
    replicas: list[ExecutorService],
) -> None:
    effect = CountingEffect(fail_with=FailureCode.HTTP_5XX)
    key = f"{uuid.uuid4()}:fetch"
    with pytest.raises(SkillError):
        await replicas[0].call_skill(effect, PARAMS, context(), key=key, limit_s=5)
    effect.fail_with = None
    result = await replicas[0].call_skill(effect, PARAMS, context(), key=key, limit_s=5)
    assert effect.calls == 2
    assert result.output == {"status": 201, "call": 2}


async def test_pure_skills_are_not_claimed(replicas: list[ExecutorService]) -> None:
    effect = CountingEffect(contract=SKILL_CONTRACTS["json_transform"])
    key = f"{uuid.uuid4()}:shape"
    for _ in range(3):
        await replicas[0].call_skill(effect, PARAMS, context("shape"), key=key, limit_s=5)
    assert effect.calls == 3


class RecordingBus:
    """What `_execute` needs of the bus: publishing (recorded) and live progress (dropped)."""

    def __init__(self) -> None:
        self.published: list[object] = []
        self.nc = self

    async def publish_all(self, events: list[object]) -> list[object]:
        self.published += events
        return []

    async def publish(self, subject: str, data: bytes) -> None:
        """Live progress goes nowhere here."""


async def execute_once(
    settings: ExecutorSettings, effect: CountingEffect, plan_step: PlanStep
) -> StepFailed:
    """One reserved attempt of `plan_step` through the executor's `_execute`, with
    `effect` as its skill; the step.failed it published."""
    service = ExecutorService(settings, skills={"http_call": effect})
    bus = RecordingBus()
    service.bus = bus  # type: ignore[assignment]
    service.running = True
    state, _ = planned(plan_step)
    state.apply(reserved_for(state, "call"))
    step = state.steps["call"]
    step.status = StepStatus.RUNNING
    try:
        await service._execute(state, step)
    finally:
        await service.idempotency.close()
    (failed,) = [event for event in bus.published if isinstance(event, StepFailed)]
    return failed


async def test_an_unsafe_step_whose_claim_store_is_down_fails_retryably_without_the_effect(
    namespace: str,
) -> None:
    """Redis down (a port nothing listens on) for longer than AOS_OUTAGE_GIVE_UP_S: the
    claim is tried again with backoff for that long, the step is never called, and its
    failure is DEPENDENCY_UNAVAILABLE (retryable), not SKILL_ERROR."""
    settings = ExecutorSettings.model_validate(
        {
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "AOS_NAMESPACE": namespace,
            "AOS_OUTAGE_GIVE_UP_S": "1",  # waited out with backoff for this long first
        }
    )
    effect = CountingEffect()
    failed = await execute_once(settings, effect, http_step("POST"))
    assert effect.calls == 0
    assert failed.error.code is FailureCode.DEPENDENCY_UNAVAILABLE
    assert failed.error.retryable and failed.will_retry


async def test_an_unsafe_step_cut_off_by_its_timeout_is_not_retried(
    infra: InfraUrls, namespace: str
) -> None:
    """Its effect may have happened: the step fails for good instead of calling again once
    the claim expires (which would make the effect twice)."""
    effect = CountingEffect(delay_s=5.0)
    settings = ExecutorSettings.model_validate(
        {"REDIS_URL": infra.redis_url, "AOS_NAMESPACE": namespace}
    )
    cut_off = http_step("POST").model_copy(update={"timeout_s": 0.2})
    failed = await execute_once(settings, effect, cut_off)
    assert effect.calls == 1
    assert failed.error.code is FailureCode.SKILL_TIMEOUT
    assert not failed.error.retryable and not failed.will_retry


class FlakyClaims(InMemoryIdempotencyStore):
    """A claim store that is unreachable for its first `down_for` claims."""

    def __init__(self, down_for: int) -> None:
        super().__init__()
        self.down_for = down_for

    async def claim(self, key: str, ttl_s: float) -> Claim:
        if self.down_for > 0:
            self.down_for -= 1
            raise ConnectionError("Redis is restarting")
        return await super().claim(key, ttl_s)


async def test_a_brief_claim_store_outage_is_waited_out_and_the_call_made_once(
    namespace: str,
) -> None:
    service = executor_without_redis(namespace)
    service.idempotency = FlakyClaims(down_for=3)
    effect = CountingEffect()
    service.running = True
    result = await service.call_skill(effect, PARAMS, context(), key="k", limit_s=5)
    assert effect.calls == 1 and result.output == {"status": 201, "call": 1}


def executor_without_redis(namespace: str) -> ExecutorService:
    return ExecutorService(ExecutorSettings.model_validate({"AOS_NAMESPACE": namespace}))
