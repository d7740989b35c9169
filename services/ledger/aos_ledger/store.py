"""Live budget balances in Redis, changed only by Lua scripts, so every change is atomic.

Layout, under the prefix `<namespace>:ledger:`:

    run:<run_id>               hash    cap, reserved, committed, tenant
    run:<run_id>:reservations  hash    reservation id -> JSON record of that reservation
    run:<run_id>:ended         string  the terminal event that ended the run
    tenant:<tenant>:<period>   hash    reserved, committed: a tenant's spend in one period
    expiries                   zset    "<run_id>/<reservation_id>" scored by expiry (epoch ms)
    expired_unpublished        set     expiries applied here but not yet published
    applied_through            string  highest budget-stream sequence Redis is known to hold

A period is `day:YYYY-MM-DD` or `month:YYYY-MM` (UTC), fixed when a reservation is
decided: its commit and release count against the same period, even across midnight.

One Lua function, `apply`, folds one ledger event (budget.opened / reserved / denied /
committed / released) into that state. Each transition is keyed by the reservation's
state - a reservation is decided once, committed once, released once - so applying an
event a second time changes nothing. The decision scripts decide and then call the same
`apply` with the event they are about to publish; `replay` calls it with events read
back from the budget stream. Redis is therefore a fold of the ledger's own stream, and
can be dropped and rebuilt from it.

`ended` is one key the log cannot rebuild (a run that ends holding nothing leaves no
ledger event). It only turns a request redelivered after its run's end into a denial;
balances never depend on it. `expired_unpublished` is the other: it only makes sure an
expiry applied by a ledger that crashed before publishing it is published by the next
sweep (of any replica).

Tenant caps are configuration, not state: each reservation script receives the cap of
the request's tenant and checks it together with the run's cap. The tenant's balances,
like the run's, are a fold of the log (every budget event carries its `tenant_period`).

Every decision script first checks the `applied_through` marker: without it Redis is
new, wiped, or half-way through a rebuild, and deciding against it could grant money
that the log says is already spent.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from aos_contracts.events import EventEnvelope

_LIBRARY = """
local function read_record(reservations, rid)
  local raw = redis.call('HGET', reservations, rid)
  if raw then return cjson.decode(raw) end
  return nil
end

local function write_record(reservations, rid, record)
  redis.call('HSET', reservations, rid, cjson.encode(record))
end

local function tenant_key(prefix, tenant, period)
  return prefix .. 'tenant:' .. tenant .. ':' .. period
end

-- Move a tenant's period balance; a record without a period (an event from before tenant
-- caps) counts against no tenant.
local function tenant_add(prefix, tenant, period, field, cents)
  if period == nil or period == cjson.null or tenant == nil then return end
  redis.call('HINCRBY', tenant_key(prefix, tenant, period), field, cents)
end

-- Fold one ledger event into the balances. Returns 1 when it changed something, 0 when
-- the transition it describes has already happened (a replay, a redelivery, a replica).
-- `expires` is the reservation's expiry in epoch milliseconds (budget.reserved only).
local function apply(prefix, budget, reservations, event, expires)
  local kind = event['type']
  if kind == 'budget.opened' then
    if redis.call('HEXISTS', budget, 'cap') == 1 then return 0 end
    -- With several replicas a decision can reach the log before the run's opening (one
    -- replica opened the budget in Redis, another decided before the first published),
    -- so a replay may have counted reservations into the hash already: keep them.
    redis.call('HSETNX', budget, 'reserved', 0)
    redis.call('HSETNX', budget, 'committed', 0)
    redis.call('HSET', budget, 'cap', event.cap_cents, 'tenant', event.tenant)
    return 1
  end
  local tenant = redis.call('HGET', budget, 'tenant') or event.tenant
  local rid = event.reservation_id
  local member = tostring(event.run_id) .. '/' .. rid
  local expiries = prefix .. 'expiries'
  local record = read_record(reservations, rid)
  if kind == 'budget.reserved' or kind == 'budget.denied' then
    if record then return 0 end
    local decision = 'denied'
    if kind == 'budget.reserved' then decision = 'reserved' end
    record = {decision = decision, state = decision, step_id = event.step_id,
              attempt = event.attempt, amount = event.amount_cents,
              remaining = event.remaining_cents, cause = event.causation_id,
              period = event.tenant_period, tcap = event.tenant_cap_cents,
              tremaining = event.tenant_remaining_cents, exceeded = event.exceeded_cap}
    if decision == 'denied' and type(event.error) == 'table' then
      record.code = event.error.code
    end
    if decision == 'reserved' then
      redis.call('HINCRBY', budget, 'reserved', event.amount_cents)
      tenant_add(prefix, tenant, record.period, 'reserved', event.amount_cents)
      if expires ~= nil then
        record.expires = expires
        redis.call('ZADD', expiries, expires, member)
      end
    end
    write_record(reservations, rid, record)
    return 1
  end
  if kind == 'budget.committed' then
    -- A commit without a reservation record is spend the executor measured for a step
    -- it never reserved for; it is recorded, never lost.
    if record == nil then
      record = {state = 'none', step_id = event.step_id, amount = event.reserved_cents,
                period = event.tenant_period}
    end
    if record.state == 'reserved' then
      redis.call('HINCRBY', budget, 'reserved', 0 - record.amount)
      tenant_add(prefix, tenant, record.period, 'reserved', 0 - record.amount)
    elseif record.state ~= 'released' and record.state ~= 'none' then
      return 0
    end
    redis.call('HINCRBY', budget, 'committed', event.committed_cents)
    tenant_add(prefix, tenant, record.period, 'committed', event.committed_cents)
    redis.call('ZREM', expiries, member)
    record.state = 'committed'
    record.committed = event.committed_cents
    record.released = event.released_cents
    write_record(reservations, rid, record)
    return 1
  end
  if kind == 'budget.released' then
    if record == nil or record.state ~= 'reserved' then return 0 end
    redis.call('HINCRBY', budget, 'reserved', 0 - record.amount)
    tenant_add(prefix, tenant, record.period, 'reserved', 0 - record.amount)
    redis.call('ZREM', expiries, member)
    record.state = 'released'
    record.released = event.released_cents
    record.reason = event.reason
    write_record(reservations, rid, record)
    return 1
  end
  return 0
end
"""

# KEYS: marker, budget, reservations, ended (every decision script takes these four).
_GUARD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_ready'} end
"""
_GUARD_OPEN = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {'not_open'} end
"""

# KEYS: budget, reservations. ARGV: the event as JSON, prefix, expiry in ms ('' if none).
_REPLAY = (
    _LIBRARY
    + """
local expires = nil
if ARGV[3] ~= '' then expires = tonumber(ARGV[3]) end
return apply(ARGV[2], KEYS[1], KEYS[2], cjson.decode(ARGV[1]), expires)
"""
)

# ARGV: cap_cents, tenant, run_id, prefix. Returns {new|again, cap, tenant}: a run keeps
# the cap (and the tenant) it was opened with.
_OPEN = (
    _LIBRARY
    + _GUARD
    + """
local changed = apply(ARGV[4], KEYS[2], KEYS[3],
  {type = 'budget.opened', cap_cents = tonumber(ARGV[1]), tenant = ARGV[2], run_id = ARGV[3]})
local status = 'again'
if changed == 1 then status = 'new' end
return {status, redis.call('HGET', KEYS[2], 'cap'), redis.call('HGET', KEYS[2], 'tenant')}
"""
)

# ARGV: reservation_id, step_id, attempt, amount_cents, request event id, run_id, prefix,
# tenant period, tenant cap (-1: none), expiry (epoch ms). Returns {new|again, record}.
# The run cap and the tenant cap are checked and the reservation applied in this one
# script: no other decision can slip in between.
_RESERVE = (
    _LIBRARY
    + _GUARD
    + _GUARD_OPEN
    + """
local rid = ARGV[1]
local existing = redis.call('HGET', KEYS[3], rid)
if existing then return {'again', existing} end
local balance = redis.call('HMGET', KEYS[2], 'cap', 'reserved', 'committed', 'tenant')
local remaining = tonumber(balance[1]) - tonumber(balance[2]) - tonumber(balance[3])
local amount = tonumber(ARGV[4])
local prefix, period, tcap = ARGV[7], ARGV[8], tonumber(ARGV[9])
local event = {reservation_id = rid, step_id = ARGV[2], attempt = tonumber(ARGV[3]),
               amount_cents = amount, causation_id = ARGV[5], run_id = ARGV[6],
               tenant = balance[4], tenant_period = period}
local tremaining = nil
if tcap >= 0 then
  local spent = redis.call('HMGET', tenant_key(prefix, balance[4], period),
                           'reserved', 'committed')
  tremaining = tcap - (tonumber(spent[1]) or 0) - (tonumber(spent[2]) or 0)
  event.tenant_cap_cents = tcap
end
local expires = nil
if redis.call('EXISTS', KEYS[4]) == 1 then
  -- The run has ended (the request was redelivered after its run's terminal event): a
  -- grant now would be held forever, as nothing would release it.
  event['type'] = 'budget.denied'
  event.error = {code = 'CANCELLED'}
-- A free step is never denied, even when actual costs above their estimates have
-- overdrawn the run: it cannot spend anything.
elseif amount == 0 or (amount <= remaining and (tremaining == nil or amount <= tremaining)) then
  event['type'] = 'budget.reserved'
  remaining = remaining - amount
  if tremaining ~= nil then tremaining = tremaining - amount end
  expires = tonumber(ARGV[10])
else
  event['type'] = 'budget.denied'
  event.error = {code = 'BUDGET_EXCEEDED'}
  if amount > remaining then event.exceeded_cap = 'run' else event.exceeded_cap = 'tenant' end
end
event.remaining_cents = remaining
event.tenant_remaining_cents = tremaining
apply(prefix, KEYS[2], KEYS[3], event, expires)
return {'new', redis.call('HGET', KEYS[3], rid)}
"""
)

# ARGV: reservation_id, step_id, cost_cents, run_id, prefix, tenant period (for a commit
# without a reservation). Returns {new|again|ignored, record}.
_COMMIT = (
    _LIBRARY
    + _GUARD
    + _GUARD_OPEN
    + """
local rid = ARGV[1]
local cost = tonumber(ARGV[3])
local record = read_record(KEYS[3], rid)
local state = 'none'
if record then state = record.state end
if state == 'committed' then return {'again', redis.call('HGET', KEYS[3], rid)} end
-- A denied step spent nothing; an unknown one that cost nothing leaves no trace.
if state == 'denied' or (state == 'none' and cost == 0) then return {'ignored'} end
local reserved, released, step_id, period = 0, 0, ARGV[2], ARGV[6]
if record then reserved, step_id, period = record.amount, record.step_id, record.period end
-- What a release already gave back (state 'released') is not given back twice.
if state == 'reserved' then released = math.max(0, reserved - cost) end
apply(ARGV[5], KEYS[2], KEYS[3], {type = 'budget.committed', reservation_id = rid,
  run_id = ARGV[4], step_id = step_id, reserved_cents = reserved, committed_cents = cost,
  released_cents = released, tenant_period = period})
return {'new', redis.call('HGET', KEYS[3], rid)}
"""
)

# ARGV: reason, run_id, prefix. Releases every still-reserved reservation of the run and
# returns every released one (now or earlier, so a redelivered terminal event republishes
# them all): {'ok', rid, record, new, rid, record, new, ...}.
_RELEASE_ALL = (
    _LIBRARY
    + _GUARD
    + """
local out = {'ok'}
if redis.call('EXISTS', KEYS[2]) == 0 then return out end
if redis.call('EXISTS', KEYS[4]) == 0 then redis.call('SET', KEYS[4], ARGV[1]) end
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local rid = all[i]
  local record = cjson.decode(all[i + 1])
  local new = 0
  if record.state == 'reserved' then
    new = apply(ARGV[3], KEYS[2], KEYS[3], {type = 'budget.released', reservation_id = rid,
      run_id = ARGV[2], step_id = record.step_id, released_cents = record.amount,
      reason = ARGV[1]})
  end
  if new == 1 or record.state == 'released' then
    table.insert(out, rid)
    table.insert(out, redis.call('HGET', KEYS[3], rid))
    table.insert(out, new)
  end
end
return out
"""
)

# KEYS: marker, budget, reservations, unpublished. ARGV: reservation_id, run_id, prefix,
# now (epoch ms). Releases the reservation with reason 'expired' if it is still held and
# its time has passed, and notes it as not yet published (the sweeper publishes, then
# forgets it). Returns {new|again, record, tenant} or {gone}: committed, released by its
# run's end, or not due.
_EXPIRE = (
    _LIBRARY
    + _GUARD
    + """
local rid, run_id, prefix, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local member = run_id .. '/' .. rid
local record = read_record(KEYS[3], rid)
local tenant = redis.call('HGET', KEYS[2], 'tenant')
if record and record.state == 'released' and record.reason == 'expired' then
  return {'again', redis.call('HGET', KEYS[3], rid), tenant}
end
if record == nil or record.state ~= 'reserved' then
  redis.call('ZREM', prefix .. 'expiries', member)
  return {'gone'}
end
if record.expires == nil or tonumber(record.expires) > now then return {'gone'} end
apply(prefix, KEYS[2], KEYS[3], {type = 'budget.released', reservation_id = rid,
  run_id = run_id, step_id = record.step_id, released_cents = record.amount,
  reason = 'expired'})
redis.call('SADD', KEYS[4], member)
return {'new', redis.call('HGET', KEYS[3], rid), tenant}
"""
)

# KEYS: marker. ARGV: seq, create (1|0). Only ever raises the marker; without `create`
# it never makes one, because a marker claims the state below it is complete.
_RAISE_MARKER = """
local current = redis.call('GET', KEYS[1])
if current == false then
  if ARGV[2] == '1' then redis.call('SET', KEYS[1], ARGV[1]) end
  return 0
end
if tonumber(ARGV[1]) > tonumber(current) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""

BUDGET_EVENT_TYPES = frozenset(
    {"budget.opened", "budget.reserved", "budget.denied", "budget.committed", "budget.released"}
)


class StoreNotRebuilt(RuntimeError):
    """Redis has no `applied_through` marker: it must be rebuilt from the log first."""


class BudgetNotOpen(LookupError):
    """The run has no budget yet (its goal.submitted has not been handled)."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """One reservation's record, as the Lua scripts keep it."""

    reservation_id: str
    state: Literal["reserved", "denied", "committed", "released"]
    decision: Literal["reserved", "denied"] | None  # None: committed without a reservation
    step_id: str
    attempt: int | None
    amount_cents: int
    remaining_cents: int | None  # cap - reserved - committed right after the decision
    denial_code: str | None  # why a denial: BUDGET_EXCEEDED, or CANCELLED (run ended)
    exceeded_cap: Literal["run", "tenant"] | None  # which cap a BUDGET_EXCEEDED crossed
    tenant_period: str | None
    tenant_cap_cents: int | None
    tenant_remaining_cents: int | None
    expires_at_ms: int | None
    decided_for: str | None  # event id of the request the decision answered
    committed_cents: int | None
    released_cents: int | None
    reason: str | None

    @classmethod
    def from_json(cls, reservation_id: str, raw: str) -> Reservation:
        record: dict[str, Any] = json.loads(raw)
        return cls(
            reservation_id=reservation_id,
            state=record["state"],
            decision=record.get("decision"),
            step_id=record["step_id"],
            attempt=_optional_int(record.get("attempt")),
            amount_cents=int(record["amount"]),
            remaining_cents=_optional_int(record.get("remaining")),
            denial_code=record.get("code"),
            exceeded_cap=record.get("exceeded"),
            tenant_period=record.get("period"),
            tenant_cap_cents=_optional_int(record.get("tcap")),
            tenant_remaining_cents=_optional_int(record.get("tremaining")),
            expires_at_ms=_optional_int(record.get("expires")),
            decided_for=record.get("cause") or None,
            committed_cents=_optional_int(record.get("committed")),
            released_cents=_optional_int(record.get("released")),
            reason=record.get("reason"),
        )


@dataclass(frozen=True, slots=True)
class Change:
    """What a script did: `is_new` when it changed the state now, False when the same
    change had been made before (the caller republishes the same event)."""

    reservation: Reservation
    is_new: bool


@dataclass(frozen=True, slots=True)
class OpenBudget:
    cap_cents: int
    tenant: str
    is_new: bool


@dataclass(frozen=True, slots=True)
class Balances:
    run_id: str
    tenant: str
    cap_cents: int
    reserved_cents: int
    committed_cents: int

    @property
    def remaining_cents(self) -> int:
        return self.cap_cents - self.reserved_cents - self.committed_cents


@dataclass(frozen=True, slots=True)
class TenantBalances:
    """A tenant's spend in one period (every run of the tenant together)."""

    tenant: str
    period: str
    reserved_cents: int
    committed_cents: int


@dataclass(frozen=True, slots=True)
class Expired:
    """A reservation released because it expired: what the release event needs."""

    run_id: str
    tenant: str
    reservation: Reservation
    is_new: bool


def period_of(kind: str, at: datetime) -> str:
    """The tenant budget period `at` falls in: `day:2025-06-01` or `month:2025-06` (UTC)."""
    at = at.astimezone(UTC)
    if kind == "day":
        return f"day:{at:%Y-%m-%d}"
    if kind == "month":
        return f"month:{at:%Y-%m}"
    raise ValueError(f"unknown tenant budget period {kind!r} (day or month)")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_ms(at: datetime) -> int:
    """Milliseconds since the epoch, exactly (no float rounding): a replayed expiry must
    equal the one decided."""
    return (at - _EPOCH) // timedelta(milliseconds=1)


def from_epoch_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


class BudgetStore:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis = redis
        self.prefix = f"{namespace}:ledger:"
        self.marker_key = f"{self.prefix}applied_through"
        self.expiries_key = f"{self.prefix}expiries"
        self.unpublished_key = f"{self.prefix}expired_unpublished"
        self._replay = redis.register_script(_REPLAY)
        self._open = redis.register_script(_OPEN)
        self._reserve = redis.register_script(_RESERVE)
        self._commit = redis.register_script(_COMMIT)
        self._release_all = redis.register_script(_RELEASE_ALL)
        self._expire = redis.register_script(_EXPIRE)
        self._raise_marker = redis.register_script(_RAISE_MARKER)
        self._scripts = ScriptCalls(redis)

    def budget_key(self, run_id: uuid.UUID | str) -> str:
        return f"{self.prefix}run:{run_id}"

    def reservations_key(self, run_id: uuid.UUID | str) -> str:
        return f"{self.prefix}run:{run_id}:reservations"

    def ended_key(self, run_id: uuid.UUID | str) -> str:
        return f"{self.prefix}run:{run_id}:ended"

    def tenant_key(self, tenant: str, period: str) -> str:
        return f"{self.prefix}tenant:{tenant}:{period}"

    def _keys(self, run_id: uuid.UUID | str) -> list[str]:
        return [
            self.marker_key,
            self.budget_key(run_id),
            self.reservations_key(run_id),
            self.ended_key(run_id),
        ]

    # --- decisions ------------------------------------------------------------------

    async def open_budget(self, run_id: uuid.UUID, tenant: str, cap_cents: int) -> OpenBudget:
        """Open the run's budget. A budget opened before keeps its cap and tenant."""
        args: list[str | int] = [cap_cents, tenant, str(run_id), self.prefix]
        result = await self._run(self._open, self._keys(run_id), args)
        return OpenBudget(cap_cents=int(result[1]), tenant=result[2], is_new=result[0] == "new")

    async def reserve(
        self,
        run_id: uuid.UUID,
        reservation_id: uuid.UUID,
        step_id: str,
        attempt: int,
        amount_cents: int,
        request_id: uuid.UUID,
        *,
        tenant_period: str | None = None,
        tenant_cap_cents: int | None = None,
        expires_at_ms: int | None = None,
    ) -> Change:
        """Reserve `amount_cents` if both the run and its tenant (in `tenant_period`,
        by default this month; when it has a cap) have that much left, else deny; a
        reservation decided before keeps (and returns) its first decision. A grant
        expires at `expires_at_ms` (None: never)."""
        args: list[str | int] = [
            str(reservation_id),
            step_id,
            attempt,
            amount_cents,
            str(request_id),
            str(run_id),
            self.prefix,
            tenant_period or period_of("month", datetime.now(UTC)),
            -1 if tenant_cap_cents is None else tenant_cap_cents,
            "" if expires_at_ms is None else expires_at_ms,
        ]
        result = await self._run(self._reserve, self._keys(run_id), args)
        return Change(Reservation.from_json(str(reservation_id), result[1]), result[0] == "new")

    async def commit(
        self,
        run_id: uuid.UUID,
        reservation_id: uuid.UUID,
        step_id: str,
        cost_cents: int,
        *,
        tenant_period: str | None = None,
    ) -> Change | None:
        """Charge a step's actual cost against its reservation (and its reservation's
        tenant period; `tenant_period` only counts for a step that never reserved); None
        when there is nothing to charge (a denied reservation, or no reservation and no
        cost)."""
        args: list[str | int] = [
            str(reservation_id),
            step_id,
            cost_cents,
            str(run_id),
            self.prefix,
            tenant_period or period_of("month", datetime.now(UTC)),
        ]
        result = await self._run(self._commit, self._keys(run_id), args)
        if result[0] == "ignored":
            return None
        return Change(Reservation.from_json(str(reservation_id), result[1]), result[0] == "new")

    async def release_all(self, run_id: uuid.UUID, reason: str) -> list[Change]:
        """Release every reservation of the run still held; returns every released one."""
        args: list[str | int] = [reason, str(run_id), self.prefix]
        result = await self._run(self._release_all, self._keys(run_id), args)
        rest = result[1:]
        return [
            Change(Reservation.from_json(rest[i], rest[i + 1]), int(rest[i + 2]) == 1)
            for i in range(0, len(rest), 3)
        ]

    # --- expiry -----------------------------------------------------------------------

    async def due(self, now_ms: int, limit: int = 200) -> list[tuple[str, str]]:
        """(run id, reservation id) of reservations whose expiry has passed, oldest first."""
        members = await self.redis.zrangebyscore(
            self.expiries_key, "-inf", now_ms, start=0, num=limit
        )
        return [_split_member(_text(str(member))) for member in members]

    async def unpublished_expiries(self) -> list[tuple[str, str]]:
        members = await self.redis.smembers(self.unpublished_key)
        return [_split_member(_text(member)) for member in members]

    async def expire(self, run_id: str, reservation_id: str, now_ms: int) -> Expired | None:
        """Release the reservation as expired if it is still held and due. Also returns
        an expiry made before (is_new False) so that it can be published again; None when
        there is nothing to release."""
        keys = [
            self.marker_key,
            self.budget_key(run_id),
            self.reservations_key(run_id),
            self.unpublished_key,
        ]
        args: list[str | int] = [reservation_id, run_id, self.prefix, now_ms]
        result = await self._run(self._expire, keys, args)
        if result[0] == "gone":
            await self.redis.srem(self.unpublished_key, f"{run_id}/{reservation_id}")
            return None
        reservation = Reservation.from_json(reservation_id, result[1])
        return Expired(run_id, _text(result[2] or ""), reservation, result[0] == "new")

    async def expiry_published(self, run_id: str, reservation_id: str) -> None:
        await self.redis.srem(self.unpublished_key, f"{run_id}/{reservation_id}")

    # --- the log ----------------------------------------------------------------------

    async def replay(self, events: Sequence[EventEnvelope]) -> int:
        """Apply events read from the budget stream, in order, in one round trip; returns
        how many changed the state (the others had been applied already)."""
        budget_events = [e for e in events if e.type in BUDGET_EVENT_TYPES]
        if not budget_events:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in budget_events:
                keys = [self.budget_key(event.run_id), self.reservations_key(event.run_id)]
                expires_at = getattr(event, "expires_at", None)
                expires = "" if expires_at is None else str(epoch_ms(expires_at))
                args = [event.model_dump_json(), self.prefix, expires]
                await self._replay(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        return sum(int(changed) for changed in results)

    async def applied_through(self) -> int | None:
        """The marker: None when Redis does not hold a complete fold of the log."""
        value = await self.redis.get(self.marker_key)
        return None if value is None else int(value)

    async def mark_rebuilt(self, seq: int) -> None:
        await self._raise_marker(keys=[self.marker_key], args=[seq, 1])

    async def mark_published(self, seq: int) -> None:
        await self._scripts.call(self._raise_marker, [self.marker_key], [seq, 0])

    # --- reads ------------------------------------------------------------------------

    async def balances(self, run_id: uuid.UUID | str) -> Balances | None:
        values = await self.redis.hgetall(self.budget_key(run_id))
        if not values:
            return None
        fields = {_text(k): _text(v) for k, v in values.items()}
        return Balances(
            run_id=str(run_id),
            tenant=fields.get("tenant", ""),
            cap_cents=int(fields["cap"]),
            reserved_cents=int(fields["reserved"]),
            committed_cents=int(fields["committed"]),
        )

    async def tenant_balances(self, tenant: str, period: str) -> TenantBalances:
        values = await self.redis.hgetall(self.tenant_key(tenant, period))
        fields = {_text(k): _text(v) for k, v in values.items()}
        return TenantBalances(
            tenant=tenant,
            period=period,
            reserved_cents=int(fields.get("reserved", 0)),
            committed_cents=int(fields.get("committed", 0)),
        )

    async def reservations(self, run_id: uuid.UUID | str) -> dict[str, Reservation]:
        raw = await self.redis.hgetall(self.reservations_key(run_id))
        return {
            _text(rid): Reservation.from_json(_text(rid), _text(record))
            for rid, record in raw.items()
        }

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def _run(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> list[Any]:
        """Run a decision script: its reply with text decoded, or the exception it
        signals."""
        return _checked_reply(await self._scripts.call(script, keys, args))


class ScriptCalls:
    """Script calls made in the same turn of the event loop, sent as one pipeline.

    A consumer batch handles its runs concurrently, and each run's handler calls a script
    (reserve, commit, ...) at about the same moment: one round trip to Redis for all of
    them instead of one each. Each script is still atomic, and a run's own calls are
    awaited one after the other, so their order is kept. Scripts are called by sha
    (EVALSHA); one missing from the server (restarted, flushed) is loaded and called
    again on its own."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queue: list[tuple[AsyncScript, list[str], list[str | int], asyncio.Future[Any]]] = []

    async def call(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((script, keys, args, future))
        if len(self._queue) == 1:
            # After the handlers already scheduled have had their turn to add theirs.
            asyncio.get_running_loop().call_soon(self._flush_soon)
        return await future

    def _flush_soon(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._send(batch))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _send(
        self, batch: list[tuple[AsyncScript, list[str], list[str | int], asyncio.Future[Any]]]
    ) -> None:
        try:
            if len(batch) == 1:
                script, keys, args, future = batch[0]
                replies: list[Any] = [await script(keys, args)]
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for script, keys, args, _ in batch:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (script, keys, args, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, NoScriptError):
                try:
                    reply = await script(keys, args)  # loads the script, then calls it
                except Exception as exc:  # noqa: BLE001 - handed to this call's caller
                    future.set_exception(exc)
                    continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


# Flushes in flight, so that they are not garbage-collected before they finish.
_background: set[asyncio.Task[None]] = set()


def _checked_reply(raw: list[Any]) -> list[Any]:
    reply = [_text(item) if isinstance(item, bytes) else item for item in raw]
    if reply[0] == "not_ready":
        raise StoreNotRebuilt("the budget store has no applied_through marker")
    if reply[0] == "not_open":
        raise BudgetNotOpen("the run has no open budget")
    return reply


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _split_member(member: str) -> tuple[str, str]:
    run_id, _, reservation_id = member.partition("/")
    return run_id, reservation_id


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
