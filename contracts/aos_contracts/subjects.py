"""Where events live: streams per bounded context, subjects per aggregate (one run).

Subjects are `<namespace>.<context>.<tenant>.<run_id>`; the namespace is `aos` in every
deployment and something unique in tests that share one NATS server. The event type
travels in the payload (and the `Aos-Event-Type` header), not in the subject, so that
`Nats-Expected-Last-Subject-Sequence` covers a whole run.
"""

from __future__ import annotations

import re
import uuid
from typing import Literal

Context = Literal["goals", "plans", "runs", "budget"]
CONTEXTS: tuple[Context, ...] = ("goals", "plans", "runs", "budget")
PARKED = "parked"
DEFAULT_NAMESPACE = "aos"

# Which context (and so which stream and which writer) each event type belongs to.
CONTEXT_OF_TYPE: dict[str, Context] = {
    # ingress: written by users, read by planner, ledger and executor
    "goal.submitted": "goals",
    "run.cancel_requested": "goals",
    # planner
    "run.accepted": "plans",
    "plan.created": "plans",
    "plan.rejected": "plans",
    "planning.reservation_requested": "plans",
    "planning.call_finished": "plans",
    # executor
    "budget.reservation_requested": "runs",
    "step.started": "runs",
    "step.succeeded": "runs",
    "step.failed": "runs",
    "run.completed": "runs",
    "run.failed": "runs",
    "run.cancelled": "runs",
    # ledger
    "budget.opened": "budget",
    "budget.reserved": "budget",
    "budget.denied": "budget",
    "budget.committed": "budget",
    "budget.released": "budget",
}

_NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def check_namespace(namespace: str) -> str:
    if not _NAMESPACE_RE.match(namespace):
        raise ValueError(f"namespace {namespace!r} must match {_NAMESPACE_RE.pattern}")
    return namespace


def stream_name(context: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    return f"{namespace}_{context}".upper()


def stream_subjects(context: str, namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    if context == PARKED:
        return [f"{namespace}.{PARKED}.>"]
    return [f"{namespace}.{context}.*.*"]


def run_subject(
    context: str, tenant: str, run_id: uuid.UUID | str, namespace: str = DEFAULT_NAMESPACE
) -> str:
    return f"{namespace}.{context}.{tenant}.{run_id}"


def subject_for_type(
    event_type: str, tenant: str, run_id: uuid.UUID | str, namespace: str = DEFAULT_NAMESPACE
) -> str:
    return run_subject(CONTEXT_OF_TYPE[event_type], tenant, run_id, namespace)


def parked_subject(service: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    return f"{namespace}.{PARKED}.{service}"


def goal_subject(tenant: str, run_id: uuid.UUID | str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """Where a user publishes `goal.submitted` (and `run.cancel_requested`)."""
    return run_subject("goals", tenant, run_id, namespace)


def run_id_of_subject(subject: str) -> str:
    """The aggregate id (last token) of a run subject."""
    return subject.rsplit(".", 1)[-1]
