"""Signals and detector state to PostgreSQL, in batches: observe never waits for the database.

A flusher task upserts the signals gathered since the last flush and the changed click states in
one transaction, every `interval` seconds or sooner when `batch_limit` rows wait. The queue holds one
row per signal (click, kind, network, evidence key): sightings of one signal fold into its row's
`count` and `last_at` before they reach PostgreSQL, so a flood of the same report costs one row
update a flush, not a row per sighting. What is queued when the process is killed is lost (the
state also lives in Redis); a clean stop flushes it.

A batch that PostgreSQL refuses (a value it cannot store) is bisected, as the click writer does:
every good row is written and each bad one kept in signals_quarantine with the reason, so one row
never stops everyone's signals. Only an unreachable PostgreSQL makes a batch wait for the next round.

Nothing is written for a click whose user was erased after it was made (store/erasure.py): an
observe that read the click before the erasure may queue its report after the erasure and every
worker's sweep are done. A flush locks its clicks first, as the erasure does before it deletes their
signals and detector trails, so one of the two always sees the other: the flush finds the erasure
and drops the click's rows, or the erasure finds the flush's rows and erases them.
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Awaitable, Callable, NamedTuple, Sequence, TypeAlias

import asyncpg
import orjson
import structlog

from .. import metrics
from ..domain.backoff import Backoff
from ..domain.clickid import click_time
from ..domain.detection import DEFINITIVE
from ..domain.events import CLICK_OVERWRITTEN
from ..domain.signals import MAX_PER_CLICK, Sighting, Signal
from ..domain.states import PROGRESS, StoredState
from .refused import REFUSED, storable
from .tasks import cancel_and_wait, supervised

log = structlog.get_logger("tracker.signals")
# One statement a flush: new signals inserted, known ones counted. A click's new signals are taken in
# time order while it holds fewer than MAX_PER_CLICK (observe admits them against the click's `seen`
# list already; this holds the bound when two workers' observes raced on one click). The flush first
# locks its clicks (LOCK_CLICKS, in one order) so that two workers cannot both fill the last places.
LOCK_CLICKS = "SELECT pg_advisory_xact_lock($2::integer, hashtext(c)) FROM unnest($1::text[]) AS c"
# The clicks of a batch whose user was erased after the click was made (store/erasure.py).
_ERASED_CLICKS = ("SELECT c.click_id FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS c(click_id, user_id, "
                  "created_at) JOIN erasures e ON e.user_id = c.user_id AND e.erased_at >= c.created_at")
_UPSERT_SIGNALS = (
    "WITH b AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], "
    "$7::timestamptz[], $8::timestamptz[], $9::integer[], $10::boolean[]) "
    "AS b(click_id, merchant, kind, network, key, evidence, at, last_at, count, late)), "
    "r AS (SELECT b.*, EXISTS (SELECT 1 FROM signals s WHERE s.click_id = b.click_id AND s.kind = b.kind "
    "AND s.network IS NOT DISTINCT FROM b.network AND s.key = b.key) AS known FROM b), "
    "ranked AS (SELECT r.*, row_number() OVER (PARTITION BY r.click_id, r.known ORDER BY r.at) AS place, "
    "(SELECT count(*) FROM signals c WHERE c.click_id = r.click_id) AS held FROM r) "
    "INSERT INTO signals (click_id, merchant, kind, network, key, evidence, at, last_at, count, late) "
    "SELECT click_id, merchant, kind, network, key, evidence::jsonb, at, last_at, count, late FROM ranked "
    "WHERE known OR held + place <= $11 "
    "ON CONFLICT (click_id, kind, network, key) DO UPDATE SET count = signals.count + EXCLUDED.count, "
    "last_at = GREATEST(signals.last_at, EXCLUDED.last_at)")
SIGNALS_LOCK = 740_391  # the first key of LOCK_CLICKS's two-part advisory locks


def _progress(column: str) -> str:
    """domain/states.PROGRESS as SQL: how far along the state in `column` is."""
    return f"CASE {column} " + " ".join(f"WHEN '{state}' THEN {n}" for state, n in PROGRESS.items()) + " END"


# Several workers (and pods) flush states of one click, each from its own queue, so an older state
# can arrive after a newer one. A click's state only moves forward (domain/states.PROGRESS), so a
# state that would move it back is older news and leaves the row's state as it is, and its detector
# too when that older news is an active one (a late observe's detector after the postback's
# `converted`, which the row alone records, is kept).
_UPSERT_STATE = (
    "INSERT INTO click_states (click_id, created_at, state, overwritten_at, detector, "
    "user_id, merchant) VALUES ($1, $2, $3, $4, $5, $6, $7) "
    "ON CONFLICT (click_id) DO UPDATE SET "
    f"state = CASE WHEN {_progress('EXCLUDED.state')} >= {_progress('click_states.state')} "
    "THEN EXCLUDED.state ELSE click_states.state END, "
    "overwritten_at = COALESCE(click_states.overwritten_at, EXCLUDED.overwritten_at), "
    "detector = CASE WHEN click_states.state <> 'active' AND EXCLUDED.state = 'active' "
    "THEN click_states.detector ELSE EXCLUDED.detector END, user_id = EXCLUDED.user_id, "
    "merchant = EXCLUDED.merchant, updated_at = now()")
# click.overwritten, once per click: in the transaction whose upsert first stores the click's
# overwritten_at (the moment observe found it overwritten), whatever state the row holds by then: a
# postback may have converted the click between the observe and this flush, and the shopper was told
# to re-activate all the same. The flag is set under the row lock, so a second worker flushing the
# same click waits, re-reads the row and finds it announced. Its signals are the definitive ones
# stored so far.
_ANNOUNCE_OVERWRITES = (
    "WITH flipped AS (UPDATE click_states SET overwrite_announced = true WHERE click_id = ANY ($1::text[]) "
    "AND overwritten_at IS NOT NULL AND NOT overwrite_announced RETURNING click_id, user_id, merchant), "
    "e AS (INSERT INTO events (type, ordering_key, data) SELECT $2, 'click:' || f.click_id, "
    "jsonb_build_object('click_id', f.click_id, 'user_id', f.user_id, 'merchant', f.merchant, "
    "'action', 'reactivate', 'signals', COALESCE((SELECT jsonb_agg(jsonb_build_object('kind', g.kind, "
    "'network', g.network) ORDER BY g.first_at) FROM (SELECT kind, network, min(at) AS first_at FROM signals s "
    "WHERE s.click_id = f.click_id AND NOT s.late AND s.kind = ANY ($3::text[]) GROUP BY kind, network) g), "
    "'[]'::jsonb)) FROM flipped f ORDER BY f.click_id RETURNING 1) "
    "SELECT count(*) FROM e")


# Rows as tuples, in their columns' order: executemany and the arrays of unnest take them as they are.
class SignalRecord(NamedTuple):
    """A row of signals, as _UPSERT_SIGNALS takes it: the first sighting, and how many since."""
    click_id: str
    merchant: str
    kind: str
    network: str | None
    key: str  # the evidence key (Signal.key)
    evidence: str  # JSON
    at: datetime
    last_at: datetime
    times: int  # the count column (`count` is a tuple's method)
    late: bool

    @property
    def identity(self) -> tuple[str, str, str | None, str]:
        return self.click_id, self.kind, self.network, self.key

    def folded(self, later: "SignalRecord") -> "SignalRecord":
        """This row with `later`'s sightings added to it."""
        return self._replace(times=self.times + later.times, last_at=max(self.last_at, later.last_at))


class StateRecord(NamedTuple):
    """The values of _UPSERT_STATE: a click's detector state for click_states."""
    click_id: str
    created_at: datetime
    state: str  # a ClickState's value
    overwritten_at: datetime | None
    detector: StoredState  # jsonb: the pool's codec writes it
    user_id: str
    merchant: str


Row: TypeAlias = SignalRecord | StateRecord


class SignalWriter:
    def __init__(self, pool: asyncpg.Pool, interval: float = 0.1, batch_limit: int = 2000,
                 queue_limit: int = 100_000, forget: Callable[[list[str]], Awaitable[int]] | None = None) -> None:
        self.pool, self.interval, self.batch_limit, self.queue_limit = pool, interval, batch_limit, queue_limit
        # Deletes clicks' detector states in Redis (SessionStore.forget_states): for erased clicks
        # whose state an observe in flight wrote back to Redis after the erasure's sweep.
        self.forget = forget
        self._signals: dict[tuple[str, str, str | None, str], SignalRecord] = {}
        self._states: dict[str, StateRecord] = {}
        self._users: dict[str, str] = {}  # the user of each click queued (the token's, as observe got it)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, click_id: str, merchant: str, user_id: str, signals: Sequence[Signal | Sighting],
            state: StoredState | None) -> None:
        """Queue signals (a bare Signal is one sighting) and the click's new state, if any."""
        self._users[click_id] = user_id
        for item in signals:
            seen = item if isinstance(item, Sighting) else Sighting(item, 1, item.at)
            s = seen.signal
            record = SignalRecord(click_id, merchant, s.kind, s.network, s.key, orjson.dumps(s.evidence).decode(),
                                  _at(s.at), _at(seen.last_at), seen.count, s.late)
            self._fold(record)
        if state is not None:
            self._states[click_id] = StateRecord(click_id, click_time(click_id), state["state"],
                                                 _ts(state.get("overwritten_at")), state,
                                                 user_id, merchant)
        if len(self._signals) >= self.batch_limit:
            self._wake.set()

    async def start(self) -> None:
        self._task = supervised("signal-writer", self._run)

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        try:
            await asyncio.wait_for(self.flush(), 5)
        except Exception as exc:  # noqa: BLE001 - shutting down; say what was lost
            log.error("signals_lost_at_stop", error=repr(exc)[:200], signals=len(self._signals))
            metrics.SIGNALS_DROPPED.labels("stop").inc(len(self._signals) + len(self._states))

    async def _run(self) -> None:
        retry = Backoff(first=1.0, cap=5.0)
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
                retry.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the rows, try again next round
                log.warning("signal_flush_failed", error=repr(exc)[:200])
                await asyncio.sleep(retry.next())

    async def flush(self) -> None:
        if not self._signals and not self._states:
            self._users.clear()
            return
        signals, self._signals = list(self._signals.values()), {}
        states, self._states = self._states, {}
        users, self._users = self._users, {}
        try:
            await self._store([*signals, *states.values()], users)
        finally:
            for click_id in {k[0] for k in self._signals} | set(self._states):  # what went back to the queue keeps its user
                if click_id in users:
                    self._users.setdefault(click_id, users[click_id])

    async def _store(self, rows: list[Row], users: dict[str, str]) -> None:
        """Write rows in one transaction; a refused batch is bisected down to the rows PostgreSQL
        will not take, which are quarantined. On any other failure (PostgreSQL away, a stop) what is
        not written yet goes back to the queue and the failure is raised."""
        todo: list[tuple[list[Row], BaseException | None]] = [(rows, None)]
        while todo:
            batch, refused = todo.pop()
            try:
                if refused is None:
                    await self._write(batch, users)
                elif len(batch) == 1:
                    await self._quarantine(batch[0], refused)
                else:
                    mid = len(batch) // 2
                    todo += [(batch[mid:], None), (batch[:mid], None)]
            except REFUSED as exc:
                if refused is not None:  # even the quarantine refused it: say so and go on
                    log.error("signal_lost", error=repr(exc)[:200])
                    metrics.SIGNALS_DROPPED.labels("unstorable").inc()
                    continue
                todo.append((batch, exc))
            except BaseException:
                for pending, _ in [(batch, None), *todo]:
                    self._requeue(pending)
                raise

    async def _write(self, rows: list[Row], users: dict[str, str]) -> None:
        clicks = sorted({r.click_id for r in rows})
        announced = 0
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                # Locked before anything is read, in the erasure's order (store/erasure.py).
                await conn.execute(LOCK_CLICKS, clicks, SIGNALS_LOCK)
                known = [c for c in clicks if c in users]
                erased = {r["click_id"] for r in await conn.fetch(
                    _ERASED_CLICKS, known, [users[c] for c in known], [click_time(c) for c in known])}
                if erased:
                    log.info("erased_clicks_reports_dropped", clicks=len(erased))  # never the user id
                    rows = [r for r in rows if r.click_id not in erased]
                signals = [r for r in rows if isinstance(r, SignalRecord)]
                states = [r for r in rows if isinstance(r, StateRecord)]
                overwritten = [r.click_id for r in states if r.overwritten_at is not None]
                if signals:
                    await conn.execute(_UPSERT_SIGNALS, *zip(*signals), MAX_PER_CLICK)
                if states:
                    await conn.executemany(_UPSERT_STATE, states)
                if overwritten:
                    announced = await conn.fetchval(_ANNOUNCE_OVERWRITES, overwritten, CLICK_OVERWRITTEN,
                                                    sorted(DEFINITIVE))
        if announced:
            metrics.events(CLICK_OVERWRITTEN).inc(announced)
        if erased and self.forget is not None:
            try:
                await self.forget(sorted(erased))
            except Exception as exc:  # noqa: BLE001 - Redis away: the state expires with its session
                log.warning("erased_clicks_states_kept", error=repr(exc)[:200])

    def _fold(self, record: SignalRecord) -> None:
        queued = self._signals.get(record.identity)
        if queued is not None:
            # The earlier sighting stays the row's first (a requeued batch is older than the queue).
            first, later = (queued, record) if queued.at <= record.at else (record, queued)
            self._signals[record.identity] = first.folded(later)
        elif len(self._signals) >= self.queue_limit:  # bounded memory while PostgreSQL is away
            metrics.SIGNALS_DROPPED.labels("queue_full").inc()
        else:
            self._signals[record.identity] = record

    def _requeue(self, rows: list[Row]) -> None:
        for r in rows:
            if isinstance(r, SignalRecord):
                self._fold(r)
            else:
                self._states.setdefault(r.click_id, r)

    async def _quarantine(self, row: Row, exc: BaseException) -> None:
        table = "signal" if isinstance(row, SignalRecord) else "state"
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO signals_quarantine (click_id, record, reason) VALUES ($1, $2, $3)",
                storable(row.click_id), orjson.dumps({"kind": table, "values": [storable(v) for v in row]}).decode(),
                storable(f"{type(exc).__name__}: {exc}")[:500])
        metrics.QUARANTINED_SIGNALS.inc()
        log.warning("signal_quarantined", click_id=str(row.click_id)[:32], row=table, reason=str(exc)[:200])


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _ts(ms: int | None) -> datetime | None:
    return _at(ms) if ms else None
