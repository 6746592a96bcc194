"""Address retention: `tracker maintain` truncates the client addresses of clicks older than
TRACKER_IP_RETENTION_DAYS (IPv4 to /24, IPv6 to /48) and notes when, a daily partition at a time,
each partition once (address_truncated_days), each in a transaction of its own; those of the
clicks kept in quarantine; and the addresses among postbacks' parameters (a network's action_ip,
domain/addresses.py), kept as sent in postback_history and orphan_postbacks."""
from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from itertools import takewhile

import asyncpg
import orjson

from ..domain.addresses import with_truncated_addresses
from .click import COLUMNS
from .db import _partitions

PARTITION = re.compile(r"clicks_p(\d{8})")


async def truncate_addresses(conn: asyncpg.Connection, days: int, today: date | None = None) -> int:
    """Truncate the addresses of every partition whose whole day is older than `days`, and those
    kept of the clicks and postbacks before that day; how many addresses (rows) were truncated."""
    today = today or datetime.now(timezone.utc).date()
    cutoff = today - timedelta(days=days)
    done = {r["day"] for r in await conn.fetch("SELECT day FROM address_truncated_days")}
    truncated = 0
    for name in sorted(await _partitions(conn)):
        match = PARTITION.fullmatch(name)
        if not match:
            continue
        day = datetime.strptime(match.group(1), "%Y%m%d").date()
        if day >= cutoff or day in done:
            continue
        async with conn.transaction():
            # The table name is one we made from a date (store/db.py), never from input.
            status = await conn.execute(
                f"UPDATE {name} SET client_ip = truncated_address(client_ip), client_ip_truncated_at = now() "
                "WHERE client_ip IS NOT NULL AND client_ip_truncated_at IS NULL")
            await conn.execute("INSERT INTO address_truncated_days (day) VALUES ($1) ON CONFLICT DO NOTHING", day)
        truncated += int(status.rsplit(" ", 1)[-1])
    before = datetime.combine(cutoff, datetime.min.time(), tzinfo=timezone.utc)
    truncated += await _truncate_quarantined(conn, before)
    for table in RAW_TABLES:
        truncated += await _truncate_parameters(conn, table, before)
    return truncated


# A quarantined click is its refused row as a JSON list in the clicks' column order (store/refused.py).
_QUARANTINED_ADDRESS = COLUMNS.index("client_ip")


async def _truncate_quarantined(conn: asyncpg.Connection, before: datetime) -> int:
    """The addresses of clicks PostgreSQL refused, quarantined before `cutoff`: kept with the rest of
    the row for TRACKER_RETENTION_DAYS, but whole no longer than a stored click's. A truncated address
    truncates to itself, so a row is changed once."""
    status = await conn.execute(
        "UPDATE clicks_quarantine SET record = jsonb_set(record::jsonb, ARRAY[$2::text], "
        "coalesce(to_jsonb(truncated_address(record::jsonb->>$2::int)), 'null'::jsonb))::text "
        "WHERE created_at < $1 AND record::jsonb->>$2::int IS NOT NULL "
        "AND truncated_address(record::jsonb->>$2::int) IS DISTINCT FROM record::jsonb->>$2::int",
        before, _QUARANTINED_ADDRESS)
    return int(status.rsplit(" ", 1)[-1])


RAW_TABLES = ("postback_history", "orphan_postbacks")


async def _truncate_parameters(conn: asyncpg.Connection, table: str, before: datetime, chunk: int = 1000) -> int:
    """Truncate the addresses among the parameters of the rows received before `before`, from the
    table's watermark on (address_truncated_rows), a chunk per transaction, in id order; how many
    rows changed. Ids follow the time of arrival: the first row received at or after `before` ends
    the run, and the watermark stays just short of it. `table` is one of RAW_TABLES, never input."""
    changed = 0
    while True:
        async with conn.transaction():
            # Locked: two runs at once take turns rather than read the same rows.
            last = await conn.fetchval(
                "SELECT last_id FROM address_truncated_rows WHERE table_name = $1 FOR UPDATE", table)
            rows = await conn.fetch(f"SELECT id, raw, received_at FROM {table} WHERE id > $1 ORDER BY id LIMIT $2",
                                    last, chunk)
            done = list(takewhile(lambda r: r["received_at"] < before, rows))
            new = [(r["id"], orjson.dumps(r["raw"]).decode(), orjson.dumps(t).decode()) for r in done
                   if (t := with_truncated_addresses(r["raw"])) != r["raw"]]
            if new:
                # Only where the row is still as read: an erasure that took its addresses since is kept.
                status = await conn.execute(
                    f"UPDATE {table} t SET raw = u.raw::jsonb "
                    "FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(id, was, raw) "
                    "WHERE t.id = u.id AND t.raw = u.was::jsonb",
                    [n[0] for n in new], [n[1] for n in new], [n[2] for n in new])
                changed += int(status.rsplit(" ", 1)[-1])
            if done:
                await conn.execute("UPDATE address_truncated_rows SET last_id = $2 WHERE table_name = $1",
                                   table, done[-1]["id"])
        if len(done) < chunk:
            return changed
