"""One click as /go hands it to the writer, and the form COPY sends to PostgreSQL."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, NamedTuple, Sequence


class Click(NamedTuple):
    """A click in the column order of `clicks`, so that COPY takes it as it is but for the time: a
    tuple (built on every redirect, no conversion), and what the spool stores as a JSON list."""

    click_id: str
    created_ms: int  # Unix milliseconds (converted to created_at at flush time, in bulk)
    user_id: str
    merchant: str
    source: str
    target: str
    device: str | None
    client_ip: str | None
    user_agent: str | None
    bot: bool
    method: str


COLUMNS: tuple[str, ...] = ("click_id", "created_at", *Click._fields[2:])
# A small batch as one prepared INSERT of arrays, with created_at computed from the milliseconds by
# PostgreSQL (exact: integer microseconds). See flushers.SMALL_BATCH. The nine text columns go as one
# two-dimensional text[] (a row per column, sliced back apart by PostgreSQL), the milliseconds and the
# bot flags as an array each: asyncpg checks every element of a one-dimensional array for being a
# sub-array (two collections.abc isinstance checks each), but of a two-dimensional one only the
# rows and the first row's elements. Per 16-row batch: 816,000 -> 345,000 instructions of client
# work (callgrind), ~1 us more of PostgreSQL's CPU (docs/performance.md, 2026-12-07).
INSERT_ARRAYS = """
INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target, device, client_ip, user_agent, bot, method)
SELECT id, timestamptz 'epoch' + ms * interval '1 millisecond', u, m, src, t, dev, ip, ua, bot, method
FROM (SELECT $1::text[] AS a) AS p,
     unnest(p.a[1:1], $2::int8[], p.a[2:2], p.a[3:3], p.a[4:4], p.a[5:5], p.a[6:6], p.a[7:7], p.a[8:8], $3::bool[],
            p.a[9:9]) AS c(id, ms, u, m, src, t, dev, ip, ua, bot, method)
"""
# The fields of Click that are text, in order: the rows of INSERT_ARRAYS' $1.
TEXT_FIELDS: tuple[int, ...] = tuple(i for i, name in enumerate(Click._fields) if name not in ("created_ms", "bot"))
_MS, _BOT = Click._fields.index("created_ms"), Click._fields.index("bot")


def insert_arguments(rows: Sequence[Click]) -> tuple[list[list[Any]], tuple[int, ...], tuple[bool, ...]]:
    """INSERT_ARRAYS' three parameters for a batch: the text columns as a list of lists (a tuple
    would be taken for a record), the milliseconds, the bot flags."""
    columns = list(zip(*rows))
    return [list(columns[i]) for i in TEXT_FIELDS], columns[_MS], columns[_BOT]


Record = tuple[Any, ...]  # a click as COPY sends it: created_at a datetime


def to_record(click: Click | list[Any]) -> Record:
    """A click (or a spooled row, a list in the same order) with its time as a datetime."""
    ms = click[1]
    return (click[0], datetime.fromtimestamp(ms / 1000, tz=timezone.utc), *click[2:])
