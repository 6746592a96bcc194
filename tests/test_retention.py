"""Everything that grows with traffic is pruned by `tracker maintain` with its click's partition
(signals, click states, quarantined rows) or its own retention (events), against real PostgreSQL."""
from __future__ import annotations

import dataclasses
import json
from datetime import date, datetime, time, timedelta, timezone

import asyncpg

from tracker.domain.clickid import new_click_id
from tracker.store.db import ensure_partitions, partition_name
from tracker.store.retention import RETAINED, prune

from .conftest import cli

CLICK_ROWS = ("signals", "click_states", "clicks_quarantine", "signals_quarantine")


async def _click_rows(db: asyncpg.Connection, at: datetime) -> str:
    """A click created at `at` and one row about it in each table that follows the click."""
    cid, _ = new_click_id()
    await db.execute("INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target) "
                     "VALUES ($1, $2, 'u-ret', 'aliexpress', 'web', 'https://aliexpress.ru/')", cid, at)
    await db.execute("INSERT INTO click_states (click_id, created_at, state) VALUES ($1, $2, 'active')", cid, at)
    await db.execute("INSERT INTO signals (click_id, merchant, kind, key, evidence, at, last_at, received_at) "
                     "VALUES ($1, 'aliexpress', 'ad_click_id', '', '{}', $2, $2, $2)", cid, at)
    for table in ("clicks_quarantine", "signals_quarantine"):
        await db.execute(f"INSERT INTO {table} (click_id, record, reason, created_at) VALUES ($1, '[]', 'r', $2)",
                         cid, at)
    return cid


async def _left(db: asyncpg.Connection, table: str, ids: list[str]) -> list[str]:
    rows = await db.fetch(f"SELECT click_id FROM {table} WHERE click_id = ANY ($1::text[])", ids)
    return sorted(r["click_id"] for r in rows)


async def test_maintain_prunes_what_follows_a_click_with_its_partition(db, settings):
    today = datetime.now(timezone.utc).date()
    old_day, kept_day = today - timedelta(days=403), today - timedelta(days=397)  # days clear of a midnight
    await ensure_partitions(db, old_day, 1)
    await ensure_partitions(db, kept_day, 1)
    noon = time(12, tzinfo=timezone.utc)
    old = await _click_rows(db, datetime.combine(old_day, noon))
    kept = await _click_rows(db, datetime.combine(kept_day, noon))

    out = cli(settings, "maintain", TRACKER_RETENTION_DAYS="400")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert partition_name(old_day) in report["dropped"] and partition_name(kept_day) not in report["dropped"]
    assert {t: report["pruned"][t] for t in CLICK_ROWS} == {t: 1 for t in CLICK_ROWS}
    for table in CLICK_ROWS:
        assert await _left(db, table, [old, kept]) == [kept], table

    again = json.loads(cli(settings, "maintain", TRACKER_RETENTION_DAYS="400").stdout)
    assert again["pruned"] == {r.table: 0 for r in RETAINED}


async def test_the_line_is_the_partitions_line_and_goes_in_chunks(db, settings):
    # Rows on both sides of the first day kept (today - retention at 00:00 UTC), more than a chunk of them.
    today = date(2021, 6, 15)
    line = datetime(2020, 5, 11, tzinfo=timezone.utc)  # 400 days before, and before any other test's rows
    await ensure_partitions(db, line.date() - timedelta(days=1), 2)
    before = [await _click_rows(db, line - timedelta(microseconds=1)) for _ in range(5)]
    at_line = await _click_rows(db, line)
    pruned = await prune(db, dataclasses.replace(settings, retention_days=400), today, chunk=2)
    assert {t: pruned[t] for t in CLICK_ROWS} == {t: 5 for t in CLICK_ROWS}
    for table in CLICK_ROWS:
        assert await _left(db, table, [*before, at_line]) == [at_line], table
