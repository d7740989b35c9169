"""Live budget balances in Redis, changed only by Lua scripts, so every change is atomic.

Layout, under the prefix `<namespace>:ledger:`:

    run:<run_id>               hash    cap, reserved, committed, tenant
    run:<run_id>:reservations  hash    reservation id -> JSON record of that reservation
    run:<run_id>:ended         string  the terminal event that ended the run
    applied_through            string  highest budget-stream sequence Redis is known to hold

One Lua function, `apply`, folds one ledger event (budget.opened / reserved / denied /
committed / released) into that state. Each transition is keyed by the reservation's
state - a reservation is decided once, committed once, released once - so applying an
event a second time changes nothing. The decision scripts decide and then call the same
`apply` with the event they are about to publish; `replay` calls it with events read
back from the budget stream. Redis is therefore a fold of the ledger's own stream, and
can be dropped and rebuilt from it.

`ended` is the one key the log cannot rebuild (a run that ends holding nothing leaves no
ledger event). It only turns a request redelivered after its run's end into a denial;
balances never depend on it.

Every decision script first checks the `applied_through` marker: without it Redis is
new, wiped, or half-way through a rebuild, and deciding against it could grant money
that the log says is already spent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

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

-- Fold one ledger event into the balances. Returns 1 when it changed something, 0 when
-- the transition it describes has already happened (a replay, a redelivery, a replica).
local function apply(budget, reservations, event)
  local kind = event['type']
  if kind == 'budget.opened' then
    if redis.call('EXISTS', budget) == 1 then return 0 end
    redis.call('HSET', budget, 'cap', event.cap_cents, 'reserved', 0, 'committed', 0,
               'tenant', event.tenant)
    return 1
  end
  local rid = event.reservation_id
  local record = read_record(reservations, rid)
  if kind == 'budget.reserved' or kind == 'budget.denied' then
    if record then return 0 end
    local decision = 'denied'
    if kind == 'budget.reserved' then decision = 'reserved' end
    record = {decision = decision, state = decision, step_id = event.step_id,
              attempt = event.attempt, amount = event.amount_cents,
              remaining = event.remaining_cents, cause = event.causation_id}
    if decision == 'denied' and type(event.error) == 'table' then
      record.code = event.error.code
    end
    write_record(reservations, rid, record)
    if decision == 'reserved' then
      redis.call('HINCRBY', budget, 'reserved', event.amount_cents)
    end
    return 1
  end
  if kind == 'budget.committed' then
    -- A commit without a reservation record is spend the executor measured for a step
    -- it never reserved for; it is recorded, never lost.
    if record == nil then
      record = {state = 'none', step_id = event.step_id, amount = event.reserved_cents}
    end
    if record.state == 'reserved' then
      redis.call('HINCRBY', budget, 'reserved', 0 - record.amount)
    elseif record.state ~= 'released' and record.state ~= 'none' then
      return 0
    end
    redis.call('HINCRBY', budget, 'committed', event.committed_cents)
    record.state = 'committed'
    record.committed = event.committed_cents
    record.released = event.released_cents
    write_record(reservations, rid, record)
    return 1
  end
  if kind == 'budget.released' then
    if record == nil or record.state ~= 'reserved' then return 0 end
    redis.call('HINCRBY', budget, 'reserved', 0 - record.amount)
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

# KEYS: budget, reservations. ARGV: the event as JSON.
_REPLAY = (
    _LIBRARY
    + """
return apply(KEYS[1], KEYS[2], cjson.decode(ARGV[1]))
"""
)

# ARGV: cap_cents, tenant. Returns {new|again, cap, tenant}: a run keeps the cap (and the
# tenant) it was opened with.
_OPEN = (
    _LIBRARY
    + _GUARD
    + """
local changed = apply(KEYS[2], KEYS[3],
  {type = 'budget.opened', cap_cents = tonumber(ARGV[1]), tenant = ARGV[2]})
local status = 'again'
if changed == 1 then status = 'new' end
return {status, redis.call('HGET', KEYS[2], 'cap'), redis.call('HGET', KEYS[2], 'tenant')}
"""
)

# ARGV: reservation_id, step_id, attempt, amount_cents, request event id.
# Returns {new|again, record}.
_RESERVE = (
    _LIBRARY
    + _GUARD
    + _GUARD_OPEN
    + """
local rid = ARGV[1]
local existing = redis.call('HGET', KEYS[3], rid)
if existing then return {'again', existing} end
local balance = redis.call('HMGET', KEYS[2], 'cap', 'reserved', 'committed')
local remaining = tonumber(balance[1]) - tonumber(balance[2]) - tonumber(balance[3])
local amount = tonumber(ARGV[4])
local event = {reservation_id = rid, step_id = ARGV[2], attempt = tonumber(ARGV[3]),
               amount_cents = amount, causation_id = ARGV[5]}
if redis.call('EXISTS', KEYS[4]) == 1 then
  -- The run has ended (the request was redelivered after its run's terminal event): a
  -- grant now would be held forever, as nothing would release it.
  event['type'] = 'budget.denied'
  event.remaining_cents = remaining
  event.error = {code = 'CANCELLED'}
-- A free step is never denied, even when actual costs above their estimates have
-- overdrawn the run: it cannot spend anything.
elseif amount == 0 or amount <= remaining then
  event['type'] = 'budget.reserved'
  event.remaining_cents = remaining - amount
else
  event['type'] = 'budget.denied'
  event.remaining_cents = remaining
  event.error = {code = 'BUDGET_EXCEEDED'}
end
apply(KEYS[2], KEYS[3], event)
return {'new', redis.call('HGET', KEYS[3], rid)}
"""
)

# ARGV: reservation_id, step_id, cost_cents. Returns {new|again|ignored, record}.
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
local reserved, released, step_id = 0, 0, ARGV[2]
if record then reserved, step_id = record.amount, record.step_id end
-- What a release already gave back (state 'released') is not given back twice.
if state == 'reserved' then released = math.max(0, reserved - cost) end
apply(KEYS[2], KEYS[3], {type = 'budget.committed', reservation_id = rid,
  step_id = step_id, reserved_cents = reserved, committed_cents = cost,
  released_cents = released})
return {'new', redis.call('HGET', KEYS[3], rid)}
"""
)

# ARGV: reason. Releases every still-reserved reservation of the run and returns every
# released one (now or earlier, so a redelivered terminal event republishes them all):
# {'ok', rid, record, new, rid, record, new, ...}.
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
    new = apply(KEYS[2], KEYS[3], {type = 'budget.released', reservation_id = rid,
      step_id = record.step_id, released_cents = record.amount, reason = ARGV[1]})
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


class BudgetStore:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis = redis
        self.prefix = f"{namespace}:ledger:"
        self.marker_key = f"{self.prefix}applied_through"
        self._replay = redis.register_script(_REPLAY)
        self._open = redis.register_script(_OPEN)
        self._reserve = redis.register_script(_RESERVE)
        self._commit = redis.register_script(_COMMIT)
        self._release_all = redis.register_script(_RELEASE_ALL)
        self._raise_marker = redis.register_script(_RAISE_MARKER)

    def budget_key(self, run_id: uuid.UUID | str) -> str:
        return f"{self.prefix}run:{run_id}"

    def reservations_key(self, run_id: uuid.UUID | str) -> str:
        return f"{self.prefix}run:{run_id}:reservations"

    def ended_key(self, run_id: uuid.UUID | str) -> str:
        return f"{self.prefix}run:{run_id}:ended"

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
        result = await _run(self._open, self._keys(run_id), [cap_cents, tenant])
        return OpenBudget(cap_cents=int(result[1]), tenant=result[2], is_new=result[0] == "new")

    async def reserve(
        self,
        run_id: uuid.UUID,
        reservation_id: uuid.UUID,
        step_id: str,
        attempt: int,
        amount_cents: int,
        request_id: uuid.UUID,
    ) -> Change:
        """Reserve `amount_cents` if the run has that much left, else deny; a reservation
        decided before keeps (and returns) its first decision."""
        args: list[str | int] = [
            str(reservation_id),
            step_id,
            attempt,
            amount_cents,
            str(request_id),
        ]
        result = await _run(self._reserve, self._keys(run_id), args)
        return Change(Reservation.from_json(str(reservation_id), result[1]), result[0] == "new")

    async def commit(
        self, run_id: uuid.UUID, reservation_id: uuid.UUID, step_id: str, cost_cents: int
    ) -> Change | None:
        """Charge a step's actual cost against its reservation; None when there is
        nothing to charge (a denied reservation, or no reservation and no cost)."""
        args: list[str | int] = [str(reservation_id), step_id, cost_cents]
        result = await _run(self._commit, self._keys(run_id), args)
        if result[0] == "ignored":
            return None
        return Change(Reservation.from_json(str(reservation_id), result[1]), result[0] == "new")

    async def release_all(self, run_id: uuid.UUID, reason: str) -> list[Change]:
        """Release every reservation of the run still held; returns every released one."""
        result = await _run(self._release_all, self._keys(run_id), [reason])
        rest = result[1:]
        return [
            Change(Reservation.from_json(rest[i], rest[i + 1]), int(rest[i + 2]) == 1)
            for i in range(0, len(rest), 3)
        ]

    # --- the log ----------------------------------------------------------------------

    async def replay(self, events: Sequence[EventEnvelope]) -> int:
        """Apply events read from the budget stream, in order, in one round trip; returns
        how many changed the state (the others had been applied already)."""
        budget_events = [e for e in events if getattr(e, "type", None) in BUDGET_EVENT_TYPES]
        if not budget_events:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for event in budget_events:
                keys = [self.budget_key(event.run_id), self.reservations_key(event.run_id)]
                await self._replay(keys=keys, args=[event.model_dump_json()], client=pipe)
            results = await pipe.execute()
        return sum(int(changed) for changed in results)

    async def applied_through(self) -> int | None:
        """The marker: None when Redis does not hold a complete fold of the log."""
        value = await self.redis.get(self.marker_key)
        return None if value is None else int(value)

    async def mark_rebuilt(self, seq: int) -> None:
        await self._raise_marker(keys=[self.marker_key], args=[seq, 1])

    async def mark_published(self, seq: int) -> None:
        await self._raise_marker(keys=[self.marker_key], args=[seq, 0])

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

    async def reservations(self, run_id: uuid.UUID | str) -> dict[str, Reservation]:
        raw = await self.redis.hgetall(self.reservations_key(run_id))
        return {
            _text(rid): Reservation.from_json(_text(rid), _text(record))
            for rid, record in raw.items()
        }

    async def ping(self) -> bool:
        return bool(await self.redis.ping())


async def _run(script: AsyncScript, keys: list[str], args: list[str | int]) -> list[Any]:
    """Run a decision script: its reply with text decoded, or the exception it signals."""
    reply = [_text(item) if isinstance(item, bytes) else item for item in await script(keys, args)]
    if reply[0] == "not_ready":
        raise StoreNotRebuilt("the budget store has no applied_through marker")
    if reply[0] == "not_open":
        raise BudgetNotOpen("the run has no open budget")
    return reply


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
