"""The click writer's side of the spool: spilling the clicks PostgreSQL cannot take, and replaying
closed segments into `clicks` exactly once when it is back.

A segment is replayed through a temporary table and `INSERT ... ON CONFLICT DO NOTHING`, in chunks,
and removed only once every chunk is committed: a replay that dies halfway simply runs again. Every
worker replays, each second, the segments no live process holds (a crashed worker's among them).
"""
from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog

from .. import metrics
from ..domain.backoff import Backoff
from ..errors import Unavailable
from .click import COLUMNS, Click, Record, to_record
from .health import UNREACHABLE, PostgresHealth
from .refused import REFUSED, add_partitions, quarantine
from .spool import RowCount, SegmentLock, Spool, SpoolRefused

log = structlog.get_logger("tracker.clicks")

REPLAY_CHUNK = 5_000  # clicks per replay transaction
SPOOL_RETRY = 1.0  # seconds between two checks of a spool that refused a record


def not_stored() -> Unavailable:
    return Unavailable("the click could not be stored (PostgreSQL and the spool are unavailable); retry later")


class ClickSpool:
    def __init__(self, pool: asyncpg.Pool, spool: Spool) -> None:
        self.pool, self.spool = pool, spool
        # Clicks in the spool directory (every worker's) at the last count, plus this worker's
        # appends since. The gauge is set only from a count: /metrics counts before it answers.
        self.pending = 0
        self._rows = RowCount()
        # "ok", or why the last append or check failed: "full" (the cap or the disk) or "failing"
        # (read-only, I/O errors). The replayer checks it again every SPOOL_RETRY while it is not ok.
        self.state = "ok"
        self._append_lock = asyncio.Lock()
        self._replay_lock = asyncio.Lock()

    async def count(self) -> None:
        """Count the clicks in every segment of the spool directory into the gauge (each count reads
        only what was appended since the last one)."""
        try:
            self.pending = await asyncio.to_thread(self._rows.count, self.spool.dir)
        except OSError as exc:  # an unreadable segment: the gauge keeps its last value
            log.error("spool_unreadable", error=repr(exc)[:200])
            return
        metrics.SPOOL_PENDING.set(self.pending)

    async def spill(self, rows: list[Click]) -> None:
        """Append clicks to the spool, fsynced before this returns (and their requests are answered);
        Unavailable (a 503) when the spool cannot take them."""
        try:
            async with self._append_lock:
                await asyncio.to_thread(self.spool.append, [list(r) for r in rows])
        except SpoolRefused as exc:
            self._refused(exc, len(rows))
            raise not_stored() from exc
        self._took()
        self.pending += len(rows)
        metrics.SPOOLED.inc(len(rows))

    def _refused(self, exc: SpoolRefused, rows: int) -> None:
        if self.state != exc.state:
            log.error("spool_refused", state=exc.state, reason=exc.reason, rows=rows, directory=str(self.spool.dir))
        self.state = exc.state
        metrics.SPOOL_OK.set(0)

    def _took(self) -> None:
        if self.state != "ok":
            log.info("spool_writable", directory=str(self.spool.dir))
        self.state = "ok"
        metrics.SPOOL_OK.set(1)

    async def check(self) -> None:
        """Whether the spool takes records (again): a probe write, and room under the cap. Once full,
        a tenth of the cap must be free again, so that it does not flap between a refusal and the
        next batch that does not fit."""
        headroom = self.spool.max_bytes // 10 if self.state == "full" else 0
        try:
            async with self._append_lock:
                await asyncio.to_thread(self.spool.probe, headroom)
        except SpoolRefused as exc:
            self._refused(exc, 0)
        else:
            self._took()

    def close(self) -> None:
        self.spool.close()

    async def replayer(self, health: PostgresHealth, interval: float = 1.0) -> None:
        """Replay the backlog every `interval`. While PostgreSQL is down, probe it with the shared
        backoff instead: the probe after a failed one comes within 0.5 s (a blip is over soon), then
        the waits double up to 2.5-5 s, jittered so that many workers' probes (each a connection
        attempt) do not hit a PostgreSQL coming back together. A later probe loses no click: what
        arrives meanwhile is spooled and replayed."""
        backoff = Backoff(first=0.5, cap=5.0)
        wait = interval
        while True:
            await asyncio.sleep(wait)
            wait = interval
            if self.state != "ok":
                await self.check()
            try:
                if not health.ok:
                    await health.probe()
                backoff.reset()
                if self.spool.has_backlog():
                    await self.replay()
            except asyncio.CancelledError:
                raise
            except UNREACHABLE as exc:
                health.down(exc)
                # A spool that refused is checked every SPOOL_RETRY all the same.
                wait = backoff.next() if self.state == "ok" else min(backoff.next(), SPOOL_RETRY)
            except Exception as exc:  # noqa: BLE001 - keep trying; the spool keeps the clicks
                log.error("spool_replay_failed", error=repr(exc)[:300])

    async def replay(self, chunk: int = REPLAY_CHUNK) -> int:
        """Replay every closed spool segment into clicks, exactly once; returns clicks inserted."""
        inserted = 0
        async with self._replay_lock:
            async with self._append_lock:
                self.spool.rotate()
            for path in self.spool.segments():
                lock = await asyncio.to_thread(SegmentLock.take, path)
                if lock is None:
                    continue  # its writer is alive, or another worker is replaying it
                try:
                    rows = await asyncio.to_thread(all_rows, lock)
                except OSError as exc:  # the disk's error, not PostgreSQL's; tried again next time
                    lock.release()
                    log.error("spool_segment_unreadable", segment=path.name, error=repr(exc)[:200])
                    continue
                try:
                    for start in range(0, len(rows), chunk):
                        inserted += await insert_missing(self.pool, [to_record(r) for r in rows[start:start + chunk]])
                except BaseException:
                    lock.release()
                    raise
                # Removed only after every chunk committed. A disk that refuses (read-only) keeps
                # it: replayed again later, its rows are skipped as already there. (Its OSError is
                # the disk's, not PostgreSQL's: the caller must not take it for an outage.)
                try:
                    await asyncio.to_thread(lock.remove)
                except OSError as exc:
                    lock.release()
                    log.error("spool_segment_not_removed", segment=path.name, error=repr(exc)[:200])
                    continue
                metrics.REPLAYED.inc(len(rows))
                log.info("spool_replayed", segment=path.name, rows=len(rows))
            await self.count()
        return inserted


def all_rows(lock: SegmentLock) -> list[list[Any]]:
    return [row for record in lock.records() for row in record]


async def insert_missing(pool: asyncpg.Pool, records: list[Record]) -> int:
    """Insert the records that clicks does not have yet; refused ones are bisected out and
    quarantined. Returns how many were inserted."""
    await add_partitions(pool, records)
    try:
        return await _insert_new(pool, records)
    except REFUSED as exc:
        if len(records) == 1:
            await quarantine(pool, records[0], exc)
            return 0
        mid = len(records) // 2
        return await insert_missing(pool, records[:mid]) + await insert_missing(pool, records[mid:])


# A click of a user erased after it was made (it waited in the spool meanwhile) goes in under the
# erasure's pseudonym, without its address, user agent or device (store/erasure.py). One of a day
# whose addresses `tracker maintain` has truncated already goes in truncated (store/addresses.py).
REPLAY_INSERT = (
    f"INSERT INTO clicks ({', '.join(COLUMNS)}, client_ip_truncated_at) SELECT r.click_id, r.created_at, "
    "coalesce(e.pseudonym, r.user_id), r.merchant, r.source, r.target, CASE WHEN e.user_id IS NULL THEN r.device END, "
    "CASE WHEN e.user_id IS NOT NULL THEN NULL WHEN t.day IS NULL THEN r.client_ip "
    "ELSE truncated_address(r.client_ip) END, CASE WHEN e.user_id IS NULL THEN r.user_agent END, "
    "r.bot, r.method, CASE WHEN t.day IS NOT NULL AND r.client_ip IS NOT NULL AND e.user_id IS NULL THEN now() END "
    "FROM clicks_replay r "
    "LEFT JOIN erasures e ON e.user_id = r.user_id AND r.created_at <= e.erased_at "
    "LEFT JOIN address_truncated_days t ON t.day = (r.created_at AT TIME ZONE 'UTC')::date "
    "ON CONFLICT (click_id, created_at) DO NOTHING")


async def _insert_new(pool: asyncpg.Pool, records: list[Record]) -> int:
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS clicks_replay "
                "(LIKE clicks INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            await conn.copy_records_to_table("clicks_replay", records=records, columns=COLUMNS)
            status = await conn.execute(REPLAY_INSERT)
    return int(status.rsplit(" ", 1)[-1])
