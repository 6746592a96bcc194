"""The audit trail (table audit_log): entries written, read a page at a time newest first, never
changed. Written and read on the primary: an entry is part of the read or change it records."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence, TypeAlias, TypedDict, cast

from .db import Executor

Conn: TypeAlias = Executor


@dataclass(frozen=True, slots=True)
class Entry:
    actor: str
    action: str
    address: str | None = None
    user_id: str | None = None
    click_id: str | None = None
    order_id: str | None = None


class AuditRow(TypedDict):
    """An entry as a page reads it back."""
    id: int
    at: datetime
    actor: str
    action: str
    user_id: str | None
    click_id: str | None
    order_id: str | None
    address: str | None


async def record(conn: Conn, entries: Sequence[Entry]) -> None:
    """Write entries in one statement (one round trip however many subjects a read touched)."""
    if not entries:
        return
    await conn.execute(
        "INSERT INTO audit_log (actor, action, address, user_id, click_id, order_id) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])",
        [e.actor for e in entries], [e.action for e in entries], [e.address for e in entries],
        [e.user_id for e in entries], [e.click_id for e in entries], [e.order_id for e in entries])


async def page(conn: Conn, *, user_id: str | None, actor: str | None, before: int | None,
               limit: int) -> list[AuditRow]:
    """Entries newest first, filtered by user and/or actor, older than the entry `before`."""
    where, args = [], []
    for clause, value in (("user_id = ${}", user_id), ("actor = ${}", actor), ("id < ${}", before)):
        if value is not None:
            args.append(value)
            where.append(clause.format(len(args)))
    args.append(limit)
    rows = await conn.fetch(
        "SELECT id, at, actor, action, user_id, click_id, order_id, address FROM audit_log "
        f"WHERE {' AND '.join(where) or 'true'} ORDER BY id DESC LIMIT ${len(args)}", *args)
    return [cast(AuditRow, dict(r)) for r in rows]
