"""One click as /go hands it to the writer, and the form COPY sends to PostgreSQL."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, NamedTuple


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
# A small batch as one prepared INSERT of arrays, a column each, with created_at computed from the
# milliseconds by PostgreSQL (exact: integer microseconds). See flushers.SMALL_BATCH.
INSERT_ARRAYS = """
INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target, device, client_ip, user_agent, bot, method)
SELECT id, timestamptz 'epoch' + ms * interval '1 millisecond', u, m, src, t, dev, ip, ua, bot, method
FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::text[], $10::bool[], $11::text[]) AS c(id, ms, u, m, src, t, dev, ip, ua, bot, method)
"""
Record = tuple[Any, ...]  # a click as COPY sends it: created_at a datetime


def to_record(click: Click | list[Any]) -> Record:
    """A click (or a spooled row, a list in the same order) with its time as a datetime."""
    ms = click[1]
    return (click[0], datetime.fromtimestamp(ms / 1000, tz=timezone.utc), *click[2:])
