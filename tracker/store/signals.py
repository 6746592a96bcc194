"""Signals and detector state to PostgreSQL, in batches: observe never waits for the database.

A flusher task COPYs the signals gathered since the last flush and upserts the changed click states
in one transaction, every `interval` seconds or sooner when `batch_limit` rows wait. What is queued
when the process is killed is lost (the state also lives in Redis); a clean stop flushes it.
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

import asyncpg
import orjson
import structlog

from ..domain.clickid import click_time
from .tasks import cancel_and_wait

log = structlog.get_logger("tracker.signals")
COLUMNS = ("click_id", "merchant", "kind", "network", "evidence", "at", "late")


class SignalWriter:
    def __init__(self, pool: asyncpg.Pool, interval: float = 0.1, batch_limit: int = 2000,
                 queue_limit: int = 100_000) -> None:
        self.pool, self.interval, self.batch_limit, self.queue_limit = pool, interval, batch_limit, queue_limit
        self._signals: list[tuple[Any, ...]] = []
        self._states: dict[str, tuple[Any, ...]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def add(self, click_id: str, merchant: str, user_id: str, signals: list[dict[str, Any]],
            state: dict[str, Any] | None) -> None:
        if len(self._signals) >= self.queue_limit:
            self.dropped += len(signals)  # bounded memory while PostgreSQL is away
            signals = []
        for s in signals:
            self._signals.append((click_id, merchant, s["kind"], s["network"],
                                  orjson.dumps(s["evidence"]).decode(),
                                  datetime.fromtimestamp(s["at"] / 1000, tz=timezone.utc), s["late"]))
        if state is not None:
            self._states[click_id] = (click_id, click_time(click_id), state["state"],
                                      _ts(state.get("overwritten_at")), orjson.dumps(state).decode(),
                                      user_id, merchant)
        if len(self._signals) >= self.batch_limit:
            self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="signal-writer")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        try:
            await asyncio.wait_for(self.flush(), 5)
        except Exception as exc:  # noqa: BLE001 - shutting down; say what was lost
            log.error("signals_lost_at_stop", error=repr(exc)[:200], signals=len(self._signals))

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the rows, try again next round
                log.warning("signal_flush_failed", error=repr(exc)[:200])
                await asyncio.sleep(1)

    async def flush(self) -> None:
        if not self._signals and not self._states:
            return
        signals, self._signals = self._signals, []
        states, self._states = self._states, {}
        try:
            async with self.pool.acquire() as conn:
                async with conn.transaction():
                    if signals:
                        await conn.copy_records_to_table("signals", records=signals, columns=COLUMNS)
                    if states:
                        await conn.executemany(
                            "INSERT INTO click_states (click_id, created_at, state, overwritten_at, detector, "
                            "user_id, merchant) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7) "
                            "ON CONFLICT (click_id) DO UPDATE SET "
                            "state = CASE WHEN click_states.state = 'converted' THEN 'converted' "
                            "ELSE EXCLUDED.state END, "
                            "overwritten_at = COALESCE(click_states.overwritten_at, EXCLUDED.overwritten_at), "
                            "detector = EXCLUDED.detector, user_id = EXCLUDED.user_id, "
                            "merchant = EXCLUDED.merchant, updated_at = now()", list(states.values()))
        except BaseException:
            self._signals[:0] = signals
            for key, value in states.items():
                self._states.setdefault(key, value)
            raise


def _ts(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None
