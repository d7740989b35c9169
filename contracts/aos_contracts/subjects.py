"""Where events live: streams per bounded context, subjects per aggregate (one run).

Subjects are `<namespace>.<context>.<tenant>.<run_id>`; the namespace is `aos` in every
deployment and something unique in tests that share one NATS server. The event type
travels in the payload (and the `Aos-Event-Type` header), not in the subject, so that
`Nats-Expected-Last-Subject-Sequence` covers a whole run.
"""

from __future__ import annotations

import re
import uuid
from typing import get_args

from aos_contracts.events import EVENT_TYPES, Context

CONTEXTS: tuple[Context, ...] = get_args(Context)
PARKED = "parked"
DEFAULT_NAMESPACE = "aos"

# Which context (and so which stream and which writer) each event type belongs to: what
# each event class declares (`EventEnvelope.context`).
CONTEXT_OF_TYPE: dict[str, Context] = {
    event_type: cls.context for event_type, cls in EVENT_TYPES.items()
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


def misplacement(subject: str, event_type: str, tenant: str, run_id: object) -> str | None:
    """Why an event may not count where it arrived; None when it may.

    The trust boundary of the bus (docs/SECURITY.md): an event counts only on the stream
    of the context that owns its type, and only when the subject's tenant and run are the
    payload's. NATS permissions decide who may publish on which subjects; this decides
    what a message on those subjects may say, so a tenant allowed to publish goals on its
    own subjects cannot pass a plan, a budget decision or another tenant's goal through
    them. Every consumer checks every event with this, live and when rebuilding."""
    parts = subject.split(".")
    if len(parts) != 4:
        return f"{event_type} arrived on {subject!r}, which is not a run subject"
    _, context, subject_tenant, subject_run = parts
    owner = CONTEXT_OF_TYPE.get(event_type)
    if owner != context:
        owned = f"the {owner} stream's" if owner else "no stream's"
        return f"{event_type} is {owned}, but arrived on {subject} (the {context} stream)"
    if subject_tenant != tenant:
        return (
            f"{event_type} for tenant {tenant!r} arrived on a subject of tenant "
            f"{subject_tenant!r}: {subject}"
        )
    if subject_run != str(run_id):
        return f"{event_type} for run {run_id} arrived on another run's subject {subject}"
    return None
