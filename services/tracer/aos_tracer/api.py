"""The tracer's query API, added to the service's HTTP app (the CLI reads these shapes).

GET /runs?tenant=&status=&limit=     runs, newest first
GET /runs/{run_id}?tenant=           one run: the run, its steps, its events
GET /runs/{run_id}/timeline?tenant=  the same as readable text
GET /runs/{run_id}/timeline.html     the same as an HTML page: steps as bars on a time axis
GET /runs/{run_id}/golden            the run's canonical event sequence (golden-file JSON)
GET /parked?limit=&status=           parked messages, newest first (status: parked|replayed)
GET /parked/{id}                     one parked message, with its bytes (data_b64)
POST /parked/{id}/replayed           mark it replayed (`aos parked replay` sent it again) and
                                     delete it from the parked stream
DELETE /parked/{id}                  forget it: from the store and the parked stream

A parked message's id is its sequence in the parked stream (AOS_PARKED).

With JWT_VERIFY_SIGNATURE or RBAC_ENFORCE on, every request needs `Authorization: Bearer
<jwt>` (401 without a valid one): a token sees only its own tenant's runs (another
tenant's run is a 404, like a missing one), `read` is needed when RBAC_ENFORCE is on, and
/parked (which spans tenants) needs the `admin` role.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from aos_contracts.events import is_valid_tenant
from aos_contracts.failures import FailureCode
from aos_plumbing.auth import ROLE_ADMIN, ROLE_READ, Authenticator, AuthError, bearer_token
from aos_tracer.golden import render_golden
from aos_tracer.rows import RUN_STATUSES, RunRow
from aos_tracer.store import TraceStore
from aos_tracer.timeline import render_timeline
from aos_tracer.timeline_html import render_timeline_html

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


class BadRequest(ValueError):
    pass


PARKED_STATUSES = ("parked", "replayed")

# Deletes a message from the parked stream by its sequence; True if it was there.
ParkedStreamDelete = Callable[[int], Awaitable[bool]]


async def _no_stream(parked_seq: int) -> bool:
    return False


class TraceApi:
    def __init__(
        self,
        store: TraceStore,
        auth: Authenticator | None = None,
        delete_from_parked_stream: ParkedStreamDelete = _no_stream,
    ) -> None:
        self.store = store
        self.auth = auth or Authenticator()
        self.delete_from_parked_stream = delete_from_parked_stream

    def _caller_tenant(self, request: web.Request, role: str) -> str | web.Response | None:
        """The tenant the caller's token confines it to (None: no auth configured), or
        the error response to send instead."""
        if not self.auth.enabled:
            return None
        try:
            if role == ROLE_ADMIN:
                # Admin spans tenants, so it is required even where RBAC is not enforced.
                principal = self.auth.principal(bearer_token(request.headers))
                if ROLE_ADMIN not in principal.roles:
                    raise AuthError(FailureCode.FORBIDDEN, "the token lacks role 'admin'")
                return principal.tenant
            return self.auth.caller_tenant(request.headers, role)
        except AuthError as exc:
            return _error(exc.http_status, exc.reason)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/runs", self.list_runs)
        app.router.add_get("/runs/{run_id}", self.get_run)
        app.router.add_get("/runs/{run_id}/timeline", self.get_timeline)
        app.router.add_get("/runs/{run_id}/timeline.html", self.get_timeline_html)
        app.router.add_get("/runs/{run_id}/golden", self.get_golden)
        app.router.add_get("/parked", self.list_parked)
        app.router.add_get("/parked/{parked_id}", self.get_parked)
        app.router.add_post("/parked/{parked_id}/replayed", self.mark_replayed)
        app.router.add_delete("/parked/{parked_id}", self.drop_parked)

    async def list_runs(self, request: web.Request) -> web.Response:
        caller = self._caller_tenant(request, ROLE_READ)
        if isinstance(caller, web.Response):
            return caller
        try:
            tenant = _tenant(request)
            if caller is not None:
                if tenant is not None and tenant != caller:
                    return _error(403, f"the token is for tenant {caller!r}, not {tenant!r}")
                tenant = caller
            status = request.query.get("status")
            if status is not None and status not in RUN_STATUSES:
                raise BadRequest(f"status must be one of {', '.join(RUN_STATUSES)}")
            limit = _limit(request)
        except BadRequest as exc:
            return _error(400, str(exc))
        runs = await self.store.list_runs(tenant=tenant, status=status, limit=limit)
        return web.json_response({"runs": [run.to_json() for run in runs]})

    async def get_run(self, request: web.Request) -> web.Response:
        found = await self._run(request)
        if isinstance(found, web.Response):
            return found
        steps = await self.store.run_steps(found.run_id)
        events = await self.store.run_events(found.run_id)
        return web.json_response(
            {
                "run": found.to_json(),
                "steps": [step.to_json() for step in steps],
                "events": [event.to_json() for event in events],
            }
        )

    async def get_timeline(self, request: web.Request) -> web.Response:
        found = await self._run(request)
        if isinstance(found, web.Response):
            return found
        steps = await self.store.run_steps(found.run_id)
        events = await self.store.run_events(found.run_id)
        return web.Response(text=render_timeline(found, steps, events), content_type="text/plain")

    async def get_timeline_html(self, request: web.Request) -> web.Response:
        found = await self._run(request)
        if isinstance(found, web.Response):
            return found
        steps = await self.store.run_steps(found.run_id)
        events = await self.store.run_events(found.run_id)
        page = render_timeline_html(found, steps, events)
        return web.Response(text=page, content_type="text/html")

    async def get_golden(self, request: web.Request) -> web.Response:
        found = await self._run(request)
        if isinstance(found, web.Response):
            return found
        events = await self.store.run_events(found.run_id)
        return web.Response(text=render_golden(events), content_type="application/json")

    async def list_parked(self, request: web.Request) -> web.Response:
        caller = self._caller_tenant(request, ROLE_ADMIN)
        if isinstance(caller, web.Response):
            return caller
        try:
            limit = _limit(request)
            status = request.query.get("status")
            if status is not None and status not in PARKED_STATUSES:
                raise BadRequest(f"status must be one of {', '.join(PARKED_STATUSES)}")
        except BadRequest as exc:
            return _error(400, str(exc))
        parked = await self.store.list_parked(limit, status)
        return web.json_response({"parked": [row.to_json() for row in parked]})

    async def get_parked(self, request: web.Request) -> web.Response:
        parked_seq = self._parked_id(request)
        if isinstance(parked_seq, web.Response):
            return parked_seq
        row = await self.store.get_parked(parked_seq)
        if row is None:
            return _error(404, f"no parked message {parked_seq}")
        return web.json_response(row.to_full_json())

    async def mark_replayed(self, request: web.Request) -> web.Response:
        """Idempotent: a second call (a CLI retrying) changes nothing."""
        parked_seq = self._parked_id(request)
        if isinstance(parked_seq, web.Response):
            return parked_seq
        row = await self.store.mark_replayed(parked_seq, datetime.now(UTC))
        if row is None:
            return _error(404, f"no parked message {parked_seq}")
        # Out of the parked stream, which holds only what still needs an operator (what
        # `aos doctor` counts); the store keeps the row, marked, as history.
        await self.delete_from_parked_stream(parked_seq)
        return web.json_response(row.to_json())

    async def drop_parked(self, request: web.Request) -> web.Response:
        parked_seq = self._parked_id(request)
        if isinstance(parked_seq, web.Response):
            return parked_seq
        in_stream = await self.delete_from_parked_stream(parked_seq)
        in_store = await self.store.drop_parked(parked_seq)
        if not (in_stream or in_store):
            return _error(404, f"no parked message {parked_seq}")
        return web.json_response({"id": parked_seq, "dropped": True})

    def _parked_id(self, request: web.Request) -> int | web.Response:
        """The parked message's id in the path, or the error response to send instead."""
        caller = self._caller_tenant(request, ROLE_ADMIN)
        if isinstance(caller, web.Response):
            return caller
        raw_id = request.match_info["parked_id"]
        try:
            parked_seq = int(raw_id)
        except ValueError:
            parked_seq = 0
        if parked_seq < 1:
            return _error(400, f"{raw_id!r} is not a parked message id (a positive number)")
        return parked_seq

    async def _run(self, request: web.Request) -> RunRow | web.Response:
        """The run named in the path, or the error response to send instead."""
        caller = self._caller_tenant(request, ROLE_READ)
        if isinstance(caller, web.Response):
            return caller
        raw_id = request.match_info["run_id"]
        try:
            run_id = uuid.UUID(raw_id)
            tenant = _tenant(request)
        except ValueError as exc:  # BadRequest too
            message = str(exc) if isinstance(exc, BadRequest) else f"{raw_id!r} is not a run id"
            return _error(400, message)
        run = await self.store.get_run(run_id)
        # Another tenant's run is reported exactly like a missing one: no existence leak.
        if run is None or any(t is not None and run.tenant != t for t in (tenant, caller)):
            return _error(404, f"run {run_id} not found")
        return run


def _tenant(request: web.Request) -> str | None:
    tenant = request.query.get("tenant")
    if tenant is not None and not is_valid_tenant(tenant):
        raise BadRequest(f"tenant {tenant!r} is not a valid tenant name")
    return tenant


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise BadRequest(f"limit must be an integer, got {raw!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def _error(status: int, message: str) -> web.Response:
    body: dict[str, Any] = {"error": message}
    return web.json_response(body, status=status)
