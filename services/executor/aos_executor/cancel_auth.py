"""Who may cancel a run: with JWT_VERIFY_SIGNATURE or RBAC_ENFORCE on, a
run.cancel_requested must carry a token of the run's tenant holding the `cancel` role.

A refused cancel is parked (reason, no token: the parked copy's Authorization header is
redacted) and never applied, live or when the executor rebuilds from the log: both
judge the token at the time the cancel entered the log, so they agree.
"""

from __future__ import annotations

from typing import Any

from aos_contracts.codec import EventDecodeError, decode_event
from aos_contracts.events import RunCancelRequested
from aos_contracts.failures import FailureCode
from aos_plumbing.auth import ROLE_CANCEL, Authenticator, AuthError, bearer_token, message_time


def cancel_refusal(
    auth: Authenticator, msg: Any, cancel: RunCancelRequested, run_tenant: str | None = None
) -> AuthError | None:
    """Why this cancel may not be applied; None when it may (or nothing is enforced)."""
    if not auth.enabled:
        return None
    try:
        principal = auth.authorize(
            bearer_token(getattr(msg, "headers", None)),
            tenant=cancel.tenant,
            role=ROLE_CANCEL,
            at=message_time(msg),
        )
    except AuthError as exc:
        return exc
    if principal is not None and run_tenant is not None and principal.tenant != run_tenant:
        return AuthError(
            FailureCode.FORBIDDEN,
            f"tenant mismatch: the token is for tenant {principal.tenant!r}, "
            f"the run belongs to tenant {run_tenant!r}",
        )
    return None


def is_refused_cancel(auth: Authenticator, msg: Any) -> bool:
    """For the rebuild: whether a message of the goals stream is a cancel to skip."""
    if not auth.enabled:
        return False
    try:
        event = decode_event(msg.data)
    except EventDecodeError:
        return False
    return isinstance(event, RunCancelRequested) and cancel_refusal(auth, msg, event) is not None
