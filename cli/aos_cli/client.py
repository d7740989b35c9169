"""Talking to a running AOS: goals in over NATS, runs out of the tracer's HTTP API.

Everything here turns a failure the user can fix (nothing listening, no event log, an
unknown run) into a `UserError` with one readable sentence.
"""

from __future__ import annotations

import asyncio
import base64
import difflib
import json
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from aos_cli.config import UserError
from aos_contracts.codec import EventDecodeError, decode_event, encode_event, event_headers
from aos_contracts.events import (
    TERMINAL_RUN_EVENTS,
    AnyEvent,
    EventEnvelope,
    GoalSubmitted,
    RequestRefused,
    RunCancelRequested,
)
from aos_contracts.failures import FailureCode
from aos_contracts.subjects import goal_subject, run_subject, stream_name

# The planner's first answer to a goal: the run is accepted, or the goal refused.
_VERDICTS = frozenset({"run.accepted", "plan.created", "plan.rejected", "request.refused"})


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def build_goal(
    goal: str,
    *,
    tenant: str,
    budget_cents: int,
    inputs: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    replan_within_budget: bool = False,
    reuse_plan_of: uuid.UUID | None = None,
) -> GoalSubmitted:
    """A goal with a fresh, random run id and event id, even with an idempotency key.

    Ids nobody else can compute: a run id or Nats-Msg-Id derived from the key could be
    published first by another tenant, taking the run or making JetStream drop this goal
    as a duplicate. The key travels in the goal instead, and the planner keeps one run
    per tenant and key: a second goal with the key is answered with DUPLICATE_GOAL and
    the first run's id (docs/SECURITY.md)."""
    try:
        return GoalSubmitted(
            tenant=tenant,
            goal=goal,
            budget_cents=budget_cents,
            inputs=inputs or {},
            idempotency_key=idempotency_key,
            replan_within_budget=replan_within_budget,
            reuse_plan_of=reuse_plan_of,
            run_id=uuid.uuid4(),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "goal"
        raise UserError(f"invalid goal: {field}: {first['msg']}") from exc


def inbox_prefix(url: str) -> str:
    """Where replies reach the client: `_INBOX_<user>` when the URL names a NATS user,
    because infra/nats/nats-server.conf lets a tenant's user read replies only there (a
    tenant that could read `_INBOX.>` would see every message the services fetch)."""
    user = urlsplit(url).username
    return f"_INBOX_{user}" if user else "_INBOX"


async def connect(url: str) -> NatsClient:
    async def quiet(exc: Exception) -> None:
        """nats-py logs every failed attempt with a traceback; the CLI says it once."""

    try:
        return await asyncio.wait_for(
            nats.connect(
                url,
                name="aos-cli",
                inbox_prefix=inbox_prefix(url),
                connect_timeout=2,
                allow_reconnect=False,
                # 0 would mean "forever" in nats-py; 1 gives up after a second attempt.
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                error_cb=quiet,
            ),
            timeout=10,
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise UserError(
            f"cannot reach NATS at {redact(url)}: is AOS running? (start it with `aos up`)"
        ) from exc


@dataclass(frozen=True)
class Submission:
    goal: GoalSubmitted
    run_id: uuid.UUID  # the goal's run, or the earlier run its idempotency key names
    duplicate: bool  # the tenant used this idempotency key before: no second run started
    terminal: AnyEvent | None = None  # the run's last event, when waited for


class RunWatcher:
    """A core NATS subscription to every event of one run on its tenant's subjects, made
    before the request is published so no answer can slip past in between."""

    def __init__(self, nc: NatsClient, namespace: str, tenant: str, run_id: uuid.UUID) -> None:
        self.nc = nc
        self.subject = f"{namespace}.*.{tenant}.{run_id}"
        self.terminal: asyncio.Future[AnyEvent] = asyncio.get_running_loop().create_future()
        self.verdict: asyncio.Future[AnyEvent] = asyncio.get_running_loop().create_future()
        self.refusals: dict[uuid.UUID, asyncio.Future[RequestRefused]] = {}
        self.events: list[AnyEvent] = []

    def refusal_of(self, request: EventEnvelope) -> asyncio.Future[RequestRefused]:
        """Resolved if the planner refuses `request` (call before publishing it)."""
        return self.refusals.setdefault(
            request.event_id, asyncio.get_running_loop().create_future()
        )

    async def __aenter__(self) -> RunWatcher:
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_msg)
        await self.nc.flush()  # the server has the subscription before anything is sent
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except EventDecodeError:
            return  # parked by the services; not ours to judge here
        self.events.append(event)
        kind = str(event.type)
        if kind in _VERDICTS and not self.verdict.done():
            self.verdict.set_result(event)
        if kind in TERMINAL_RUN_EVENTS and not self.terminal.done():
            self.terminal.set_result(event)
        if isinstance(event, RequestRefused):
            refused = self.refusals.get(event.request_event_id)
            if refused is not None and not refused.done():
                refused.set_result(event)


def _headers(event: EventEnvelope, token: str | None) -> dict[str, str]:
    """The event's headers, plus `Authorization: Bearer` when a token is given."""
    headers = event_headers(event)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def publish_request(
    nc: NatsClient,
    namespace: str,
    request: GoalSubmitted | RunCancelRequested,
    token: str | None = None,
) -> None:
    """Publish a goal or a cancel on the tenant's goal subject of its run, with JetStream
    (the log acknowledges it, or the user hears why not)."""
    subject = goal_subject(request.tenant, request.run_id, namespace)
    try:
        await nc.jetstream().publish(
            subject, encode_event(request), headers=_headers(request, token), timeout=5.0
        )
    except nats.errors.NoRespondersError as exc:
        raise UserError(
            f"NATS has no AOS event log for namespace {namespace!r} "
            "(are the services running? start them with `aos up`)"
        ) from exc
    except (TimeoutError, nats.errors.Error) as exc:
        what = "goal" if isinstance(request, GoalSubmitted) else "cancel"
        raise UserError(f"publishing the {what} failed: {exc or type(exc).__name__}") from exc


async def last_event(
    nc: NatsClient, namespace: str, context: str, tenant: str, run_id: uuid.UUID
) -> AnyEvent | None:
    """The last event of a run on its tenant's subject of one stream, from the log.

    A direct get by subject: NATS permissions can confine it to the tenant's own
    subjects (`$JS.API.DIRECT.GET.<stream>.<namespace>.<context>.<tenant>.>`)."""
    try:
        msg = await nc.jetstream().get_last_msg(
            stream_name(context, namespace),
            run_subject(context, tenant, run_id, namespace),
            direct=True,
        )
    except (NotFoundError, nats.errors.Error):
        return None
    try:
        return decode_event(msg.data or b"")
    except EventDecodeError:
        return None


async def finished_event(
    nc: NatsClient, namespace: str, tenant: str, run_id: uuid.UUID
) -> AnyEvent | None:
    """The run's terminal event if it is already in the log."""
    event = await last_event(nc, namespace, "runs", tenant, run_id)
    return event if event is not None and str(event.type) in TERMINAL_RUN_EVENTS else None


async def follow_run(
    nc: NatsClient, namespace: str, tenant: str, run_id: uuid.UUID, wait_s: float
) -> AnyEvent:
    """The run's terminal event: from the log if it has ended, else when it comes."""
    async with RunWatcher(nc, namespace, tenant, run_id) as watcher:
        done = await finished_event(nc, namespace, tenant, run_id)
        if done is not None:
            return done
        try:
            return await asyncio.wait_for(watcher.terminal, wait_s)
        except TimeoutError as exc:
            raise RunTimeout(
                f"run {run_id} did not finish within {wait_s:g}s (see `aos run show {run_id}`)"
            ) from exc


class RunTimeout(UserError):
    """Waited for a run's end as long as asked: the run did not complete (yet)."""


class Refused(UserError):
    """The planner refused a goal or cancel; the message says why."""

    def __init__(self, refusal: RequestRefused) -> None:
        super().__init__(f"refused ({refusal.error.code.value}): {refusal.error.message}")
        self.refusal = refusal


async def submit_goal(
    nats_url: str,
    namespace: str,
    goal: GoalSubmitted,
    *,
    wait: bool,
    wait_s: float = 60.0,
    token: str | None = None,
) -> Submission:
    """Publish the goal; with `wait`, until its run ends. A goal with an idempotency key
    waits for the planner's verdict either way: the run it names may be an earlier one."""
    nc = await connect(nats_url)
    try:
        async with RunWatcher(nc, namespace, goal.tenant, goal.run_id) as watcher:
            refused = watcher.refusal_of(goal)
            await publish_request(nc, namespace, goal, token)
            if goal.idempotency_key is None and not wait:
                return Submission(goal, goal.run_id, duplicate=False)
            # Waiting: for the run's end. Not waiting, with a key: for the planner's verdict.
            awaited = watcher.terminal if wait else watcher.verdict
            try:
                first = await asyncio.wait_for(_first(refused, awaited), wait_s)
            except TimeoutError as exc:
                raise RunTimeout(
                    f"run {goal.run_id} did not {'finish' if wait else 'get a verdict'} within "
                    f"{wait_s:g}s (see `aos run show {goal.run_id}`)"
                ) from exc
            if not isinstance(first, RequestRefused):
                return Submission(goal, goal.run_id, False, first if wait else None)
            if first.error.code is not FailureCode.DUPLICATE_GOAL or not first.existing_run_id:
                raise Refused(first)
            earlier = first.existing_run_id
            terminal = (
                await follow_run(nc, namespace, goal.tenant, earlier, wait_s) if wait else None
            )
            return Submission(goal, earlier, duplicate=True, terminal=terminal)
    finally:
        await nc.close()


async def _first(
    refused: asyncio.Future[RequestRefused], *others: asyncio.Future[AnyEvent]
) -> AnyEvent:
    """The refusal if there is one, else the first of the other answers."""
    futures: list[asyncio.Future[Any]] = [refused, *others]
    done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    if refused in done:
        return refused.result()
    result: AnyEvent = next(iter(done)).result()
    return result


async def cancel_run(
    nats_url: str,
    namespace: str,
    request: RunCancelRequested,
    *,
    wait: bool,
    wait_s: float = 60.0,
    token: str | None = None,
) -> AnyEvent | None:
    """Ask the executor to cancel a run; with `wait`, the run's terminal event (which is
    not run.cancelled when the run had already ended).

    A run the tenant does not have (unknown, or another tenant's) is refused before
    anything is published, from the tenant's own subjects in the log; one the log cannot
    tell yet (a goal the planner has not answered) is refused by the planner, which
    `wait` waits for."""
    nc = await connect(nats_url)
    try:
        async with RunWatcher(nc, namespace, request.tenant, request.run_id) as watcher:
            refused = watcher.refusal_of(request)
            standing = await run_standing(nc, namespace, request.tenant, request.run_id)
            if standing == "unknown":
                raise UserError(
                    f"refused ({FailureCode.RUN_NOT_FOUND.value}): tenant {request.tenant!r} "
                    f"has no run {request.run_id}: nothing to cancel"
                )
            done = await finished_event(nc, namespace, request.tenant, request.run_id)
            if done is not None:
                return done
            await publish_request(nc, namespace, request, token)
            if not wait:
                return None
            try:
                end = await asyncio.wait_for(_first(refused, watcher.terminal), wait_s)
            except TimeoutError as exc:
                raise RunTimeout(f"run {request.run_id} did not end within {wait_s:g}s") from exc
            if isinstance(end, RequestRefused):  # a mistaken run id, like the check above
                raise UserError(f"refused ({end.error.code.value}): {end.error.message}")
            return end
    finally:
        await nc.close()


async def run_standing(nc: NatsClient, namespace: str, tenant: str, run_id: uuid.UUID) -> str:
    """What the log says of a tenant's run: "owned" (the planner answered its goal),
    "pending" (its goal awaits the planner) or "unknown" (no goal, or a refused one)."""
    answer = await last_event(nc, namespace, "plans", tenant, run_id)
    if isinstance(answer, RequestRefused):
        return "owned" if answer.ends_run else "unknown"
    if answer is not None:
        return "owned"
    goal = await last_event(nc, namespace, "goals", tenant, run_id)
    return "pending" if goal is not None else "unknown"


# --- the tracer's HTTP API --------------------------------------------------------------


def tracer_get(
    base_url: str, path: str, params: dict[str, str] | None = None, token: str | None = None
) -> httpx.Response:
    return tracer_call(base_url, "GET", path, token, params=params)


def tracer_call(
    base_url: str, method: str, path: str, token: str | None = None, **kwargs: Any
) -> httpx.Response:
    """A request to the tracer; not reaching it, or being refused, is a UserError."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        response = httpx.request(
            method, f"{base_url}{path}", headers=headers, timeout=10.0, **kwargs
        )
    except httpx.HTTPError as exc:
        raise UserError(
            f"cannot reach the tracer at {base_url}: is AOS running? (start it with `aos up`)"
        ) from exc
    _refused(response)
    return response


def _refused(response: httpx.Response) -> None:
    """401/403 from the tracer (JWT_VERIFY_SIGNATURE / RBAC_ENFORCE on): say why."""
    if response.status_code in (401, 403):
        try:
            reason = response.json().get("error", "")
        except (json.JSONDecodeError, AttributeError):
            reason = response.text[:200]
        hint = " (pass --token or set AOS_TOKEN)" if response.status_code == 401 else ""
        raise UserError(f"the tracer refused the request: {reason}{hint}")


def tracer_json(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code == 404:
        raise UserError(f"unknown {what}")
    try:
        body = response.json()
    except json.JSONDecodeError:
        body = None
    if response.status_code >= 400:
        reason = body.get("error") if isinstance(body, dict) else response.text[:200]
        raise UserError(f"the tracer answered {response.status_code}: {reason}")
    if not isinstance(body, dict):
        raise UserError(f"the tracer answered something that is not a JSON object for {what}")
    return body


def list_runs(
    tracer_url: str,
    *,
    tenant: str | None,
    status: str | None,
    limit: int,
    token: str | None = None,
) -> list[dict[str, Any]]:
    params = {"limit": str(limit)}
    if tenant:
        params["tenant"] = tenant
    if status:
        params["status"] = status
    body = tracer_json(tracer_get(tracer_url, "/runs", params, token), "runs")
    runs = body.get("runs", [])
    return [run for run in runs if isinstance(run, dict)]


def get_run(
    tracer_url: str, run_id: uuid.UUID, tenant: str | None = None, token: str | None = None
) -> dict[str, Any]:
    params = {"tenant": tenant} if tenant else None
    response = tracer_get(tracer_url, f"/runs/{run_id}", params, token)
    return tracer_json(response, f"run {run_id}")


def get_timeline(
    tracer_url: str, run_id: uuid.UUID, tenant: str | None = None, token: str | None = None
) -> str:
    params = {"tenant": tenant} if tenant else None
    response = tracer_get(tracer_url, f"/runs/{run_id}/timeline", params, token)
    if response.status_code == 404:
        raise UserError(f"unknown run {run_id}")
    if response.status_code >= 400:
        raise UserError(f"the tracer answered {response.status_code}: {response.text[:200]}")
    return response.text


def replay_run(executor_url: str, events: list[Any]) -> dict[str, Any]:
    """Ask the executor to re-drive a recorded run (pure: it calls and charges nothing)."""
    try:
        response = httpx.post(f"{executor_url}/replay", json={"events": events}, timeout=30.0)
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach the executor at {executor_url}: is AOS running?") from exc
    body = (
        response.json()
        if response.headers.get("content-type", "").startswith("application/json")
        else {}
    )
    if response.status_code != 200:
        raise UserError(
            f"the executor could not replay the run: {body.get('error', response.text)}"
        )
    return dict(body)


def get_tenant_budget(
    ledger_url: str, tenant: str, period: str | None = None, token: str | None = None
) -> dict[str, Any]:
    """The ledger's view of a tenant's budget in a period (default: the current one)."""
    try:
        response = httpx.get(
            f"{ledger_url}/budgets/tenants/{tenant}",
            params={"period": period} if period else None,
            headers={"Authorization": f"Bearer {token}"} if token else None,
            timeout=10.0,
        )
        body = response.json()
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach the ledger at {ledger_url}: is AOS running?") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"the ledger answered {response.status_code} without JSON") from exc
    if response.status_code != 200 or not isinstance(body, dict):
        reason = body.get("error") if isinstance(body, dict) else body
        raise UserError(f"the ledger answered {response.status_code}: {reason}")
    return body


def get_golden(tracer_url: str, run_id: uuid.UUID, token: str | None = None) -> str:
    """The run's canonical event sequence (the golden-file text) from the tracer."""
    response = tracer_get(tracer_url, f"/runs/{run_id}/golden", token=token)
    if response.status_code == 404:
        raise UserError(f"unknown run {run_id}")
    if response.status_code >= 400:
        raise UserError(f"the tracer answered {response.status_code}: {response.text[:200]}")
    return response.text


def golden_diff(expected: str, actual: str, expected_name: str, actual_name: str) -> str:
    """A unified diff from the golden file to the run; empty when they are the same."""
    return "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=expected_name,
            tofile=actual_name,
        )
    )


def run_recorded_as_finished(run: dict[str, Any]) -> bool:
    """Whether the tracer has stored the run's terminal event yet."""
    events = run.get("events") or []
    if any(isinstance(e, dict) and e.get("type") in TERMINAL_RUN_EVENTS for e in events):
        return True
    summary = run.get("run") or {}
    return bool(isinstance(summary, dict) and summary.get("ended_at"))


def service_readiness(url: str) -> dict[str, Any] | None:
    """A service's /readyz body (whatever its status code), or None if unreachable."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/readyz", timeout=3.0)
        body = response.json()
    except (httpx.HTTPError, json.JSONDecodeError):
        return None
    return body if isinstance(body, dict) else None


# --- parked messages --------------------------------------------------------------------


def list_parked(
    tracer_url: str, *, status: str | None, limit: int, token: str | None = None
) -> list[dict[str, Any]]:
    params = {"limit": str(limit)}
    if status:
        params["status"] = status
    body = tracer_json(tracer_get(tracer_url, "/parked", params, token), "parked messages")
    return [row for row in body.get("parked", []) if isinstance(row, dict)]


def get_parked(tracer_url: str, parked_id: int, token: str | None = None) -> dict[str, Any]:
    response = tracer_get(tracer_url, f"/parked/{parked_id}", token=token)
    return tracer_json(response, f"parked message {parked_id}")


def drop_parked(tracer_url: str, parked_id: int, token: str | None = None) -> dict[str, Any]:
    response = tracer_call(tracer_url, "DELETE", f"/parked/{parked_id}", token)
    return tracer_json(response, f"parked message {parked_id}")


def mark_replayed(tracer_url: str, parked_id: int, token: str | None = None) -> dict[str, Any]:
    response = tracer_call(tracer_url, "POST", f"/parked/{parked_id}/replayed", token)
    return tracer_json(response, f"parked message {parked_id}")


# Headers a replay never sends as they were: the message id (a fresh one, see
# replay_headers) and the bearer token (redacted in the parked copy; the operator's goes).
_NOT_REPLAYED = frozenset({"nats-msg-id", "authorization"})


def replay_msg_id(parked: dict[str, Any]) -> str:
    """The Nats-Msg-Id of a replay. Not the original's: JetStream would drop the replay
    as a duplicate within the stream's duplicate window (15 min). Derived from the parked
    id, so running the same replay twice (a retry after a lost answer) publishes once
    within the window."""
    return f"replay:{parked['id']}:{parked['stream']}:{parked['stream_seq']}"


def replay_headers(
    parked: dict[str, Any], original: dict[str, str] | None, token: str | None
) -> dict[str, str]:
    headers = {
        name: value
        for name, value in (original if original is not None else parked["headers"]).items()
        if name.lower() not in _NOT_REPLAYED
    }
    headers["Nats-Msg-Id"] = replay_msg_id(parked)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def original_bytes(
    nc: NatsClient, parked: dict[str, Any]
) -> tuple[bytes, dict[str, str] | None]:
    """What to send again: the parked copy's bytes, or for a truncated copy the original,
    read from its stream by sequence (with its own headers)."""
    if not parked.get("truncated"):
        return base64.b64decode(parked.get("data_b64") or ""), None
    stream, seq = parked["stream"], int(parked["stream_seq"])
    try:
        raw = await nc.jetstream().get_msg(stream, seq)
    except (NotFoundError, nats.errors.Error) as exc:
        raise UserError(
            f"parked message {parked['id']} keeps only the first bytes of a "
            f"{parked.get('original_size')}-byte message, and {stream} no longer holds the "
            f"original (seq {seq}): it cannot be replayed; drop it"
        ) from exc
    if raw.subject != parked["subject"]:
        raise UserError(
            f"{stream} seq {seq} is on {raw.subject}, not {parked['subject']}: not the original"
        )
    return raw.data or b"", dict(raw.headers or {})


async def replay_parked(nats_url: str, parked: dict[str, Any], token: str | None = None) -> int:
    """Publish a parked message again, through JetStream, on its original subject (so
    every consumer of that stream sees it again); returns its new stream sequence."""
    nc = await connect(nats_url)
    try:
        data, original_headers = await original_bytes(nc, parked)
        headers = replay_headers(parked, original_headers, token)
        try:
            ack = await nc.jetstream().publish(
                parked["subject"], data, headers=headers, timeout=5.0
            )
        except nats.errors.NoRespondersError as exc:
            raise UserError(f"no stream takes {parked['subject']} any more") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise UserError(f"publishing the replay failed: {exc or type(exc).__name__}") from exc
        return int(ack.seq)
    finally:
        await nc.close()
