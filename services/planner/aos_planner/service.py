"""The planner service: goal.submitted in, run.accepted + plan.created/plan.rejected out.

State: the set of runs already decided, rebuilt at start by replaying the planner's own
stream (so a resubmitted goal never gets a second plan, across restarts). The decision's
event ids derive from the goal's, so a crash between publishing and acknowledging makes
the redelivered goal re-publish the same events, which JetStream then drops as duplicates.
"""

from __future__ import annotations

import logging
import uuid

from anthropic import AsyncAnthropic

from aos_contracts.events import GoalSubmitted, PlanRejected, RunAccepted
from aos_planner.anthropic_planner import AnthropicPlanner
from aos_planner.backend import Planner
from aos_planner.planning import decide
from aos_planner.settings import PlannerSettings
from aos_planner.stub import StubPlanner
from aos_plumbing import metrics
from aos_plumbing.auth import ROLE_SUBMIT, Authenticator, AuthError, bearer_token, message_time
from aos_plumbing.bus import Delivery, EventBus, LogConsumer, per_run
from aos_plumbing.http import ServiceHttp
from aos_plumbing.reachability import AnthropicProbe

log = logging.getLogger(__name__)

PLANS = metrics.counter("aos_planner_decisions_total", "planner decisions", ("outcome", "backend"))


class PlannerService:
    name = "planner"

    def __init__(self, settings: PlannerSettings) -> None:
        self.settings = settings
        self.planner = make_planner(settings)
        self.auth = Authenticator.from_settings(settings)
        self.decided: set[uuid.UUID] = set()
        self.bus: EventBus | None = None
        self.consumer: LogConsumer | None = None
        self.http = ServiceHttp(self.name, settings.http_host, settings.http_port)
        self.http.backends = {
            "planner": self.planner.name,
            "auth": self.auth.mode,
            "rbac": self.auth.rbac_mode,
        }

    async def start(self) -> None:
        self.bus = await EventBus.open(self.settings, self.name)
        async for event in self.bus.replay_events("plans"):
            # A refused goal gets plan.rejected without run.accepted: decided too.
            if isinstance(event, RunAccepted | PlanRejected):
                self.decided.add(event.run_id)
        log.info("planner rebuilt: %d runs already decided", len(self.decided))
        self.consumer = self.bus.consumer(
            "goals", "planner", per_run(self.handle), batch_size=self.settings.consumer_batch
        )
        await self.consumer.start()
        bus = self.bus
        self.http.add_check("nats", lambda: _true(bus.connected))
        key = self.settings.anthropic_api_key
        if self.settings.backend == "anthropic" and key is not None:
            probe = AnthropicProbe(key.get_secret_value(), self.settings.anthropic_base_url)
            self.http.add_check("anthropic", probe.check)
        await self.http.start()

    async def stop(self) -> None:
        if self.consumer:
            await self.consumer.stop()
        await self.http.stop()
        if self.bus:
            await self.bus.close()

    async def handle(self, delivery: Delivery) -> None:
        goal = delivery.event
        if not isinstance(goal, GoalSubmitted):
            return  # run.cancel_requested is the executor's business
        if goal.run_id in self.decided:
            log.info("run %s already planned; goal redelivered or resubmitted", goal.run_id)
            return
        assert self.bus is not None
        if self.auth.enabled:
            try:
                self.auth.authorize(
                    bearer_token(delivery.msg.headers),
                    tenant=goal.tenant,
                    role=ROLE_SUBMIT,
                    at=message_time(delivery.msg),
                )
            except AuthError as exc:
                # Refused at the door: no run.accepted, and the executor answers the
                # rejection with run.failed, so the submitter sees why.
                log.warning("run %s: goal refused: %s", goal.run_id, exc.reason)
                refusal = goal.caused(
                    PlanRejected, "plan.rejected", reasons=[exc.reason], code=exc.code
                )
                await self.bus.publish_all([refusal])
                self.decided.add(goal.run_id)
                PLANS.labels(exc.code.value.lower(), self.planner.name).inc()
                return
        events = await decide(goal, self.planner)
        await self.bus.publish_all(events)
        self.decided.add(goal.run_id)
        PLANS.labels(str(getattr(events[-1], "type")), self.planner.name).inc()


def make_planner(settings: PlannerSettings) -> Planner:
    """The backend PLANNER_BACKEND names; a misconfiguration stops the service at start."""
    if settings.backend == "stub":
        return StubPlanner()
    if settings.anthropic_api_key is None:
        raise SystemExit("PLANNER_BACKEND=anthropic needs ANTHROPIC_API_KEY")
    client = AsyncAnthropic(
        api_key=settings.anthropic_api_key.get_secret_value(),
        base_url=settings.anthropic_base_url,
        max_retries=settings.anthropic_max_retries,
    )
    return AnthropicPlanner(
        client, model=settings.planner_model, max_tokens=settings.planner_max_tokens
    )


async def _true(value: bool) -> bool:
    return value
