"""Address retention: `tracker maintain` truncates the client addresses of clicks older than
TRACKER_IP_RETENTION_DAYS (IPv4 to /24, IPv6 to /48) and notes when, a daily partition at a time,
each partition once (address_truncated_days), each in a transaction of its own; and those of the
clicks kept in quarantine."""
from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

import asyncpg

from .click import COLUMNS
from .db import _partitions

PARTITION = re.compile(r"clicks_p(\d{8})")


async def truncate_addresses(conn: asyncpg.Connection, days: int, today: date | None = None) -> int:
    """Truncate the addresses of every partition whose whole day is older than `days`; how many
    addresses were truncated."""
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
    return truncated + await _truncate_quarantined(conn, cutoff)


# A quarantined click is its refused row as a JSON list in the clicks' column order (store/refused.py).
_QUARANTINED_ADDRESS = COLUMNS.index("client_ip")


async def _truncate_quarantined(conn: asyncpg.Connection, cutoff: date) -> int:
    """The addresses of clicks PostgreSQL refused, quarantined before `cutoff`: kept with the rest of
    the row for TRACKER_RETENTION_DAYS, but whole no longer than a stored click's. A truncated address
    truncates to itself, so a row is changed once."""
    status = await conn.execute(
        "UPDATE clicks_quarantine SET record = jsonb_set(record::jsonb, ARRAY[$2::text], "
        "coalesce(to_jsonb(truncated_address(record::jsonb->>$2::int)), 'null'::jsonb))::text "
        "WHERE created_at < $1 AND record::jsonb->>$2::int IS NOT NULL "
        "AND truncated_address(record::jsonb->>$2::int) IS DISTINCT FROM record::jsonb->>$2::int",
        datetime.combine(cutoff, datetime.min.time(), tzinfo=timezone.utc), _QUARANTINED_ADDRESS)
    return int(status.rsplit(" ", 1)[-1])
