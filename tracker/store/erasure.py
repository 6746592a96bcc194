"""Erasing a user's personal data from PostgreSQL, and the sweep for the clicks that arrive late.

An erasure (one transaction, on the primary) records the user's pseudonym and the time in
`erasures`, then: the user id becomes the pseudonym in clicks, click states, conversions and the
events (the feed and the webhooks not yet delivered read the same rows); client addresses, user
agents and devices are cleared, and so are the addresses among the parameters of the user's
postbacks (history and orphans; domain/addresses.py); signals (their evidence), detector trails and quarantined rows go.
The money stays. What the erasure could not see yet (clicks of the user still in a worker's writer,
or in a spool) is caught by running it again, limited to clicks made before the erasure's time:
each worker does so once its own writer has committed what it held (store/erasure_watch.py), and a
spool replay pseudonymises such clicks on the way in (store/replay.py).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from ..domain.addresses import without_addresses
from .db import Connection
from .signals import LOCK_CLICKS, SIGNALS_LOCK

CHANNEL = "tracker_erasures"
PSEUDONYM_PREFIX = "erased~"  # `~` is in no user id: a pseudonym is never a token's or a lookup's user


def is_pseudonym(user_id: str | None) -> bool:
    """Whether a stored user id is an erased user's pseudonym."""
    return user_id is not None and user_id.startswith(PSEUDONYM_PREFIX)


@dataclass(slots=True)
class Erased:
    """What one erasure pass changed (the API's `erased` counts), and the user's clicks' ids."""
    clicks: int = 0
    conversions: int = 0
    signals: int = 0
    events: int = 0
    sessions: int = 0
    click_ids: list[str] = field(default_factory=list)
    before: datetime | None = None  # the erasure's time: clicks made up to it are the erased user's

    def add(self, other: "Erased") -> None:
        self.clicks += other.clicks
        self.conversions += other.conversions
        self.signals += other.signals
        self.events += other.events
        self.sessions += other.sessions

    def counts(self) -> dict[str, int]:
        return {"clicks": self.clicks, "conversions": self.conversions, "signals": self.signals,
                "events": self.events, "sessions": self.sessions}


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


async def erase(conn: Connection, user_id: str, before: datetime | None = None) -> Erased:
    """Erase the user's data made before `before` (None: all of it, now) in one transaction.
    Idempotent: a repeat changes nothing. Then `announce` it, so that every worker sweeps."""
    done = Erased()
    async with conn.transaction():
        pseudonym = await conn.fetchval(
            "INSERT INTO erasures (user_id, pseudonym, erased_at) VALUES ($1, $2, coalesce($3, now())) "
            "ON CONFLICT (user_id) DO UPDATE SET erased_at = greatest(erasures.erased_at, excluded.erased_at) "
            "RETURNING pseudonym", user_id, PSEUDONYM_PREFIX + secrets.token_hex(12), before)
        cutoff = before or await conn.fetchval("SELECT now()")
        done.before = cutoff
        done.clicks = _count(await conn.execute(
            "UPDATE clicks SET user_id = $2, client_ip = NULL, user_agent = NULL, device = NULL "
            "WHERE user_id = $1 AND created_at <= $3", user_id, pseudonym, cutoff))
        # Every click now under the pseudonym: what is still attached to them goes (signals written
        # after an earlier pass by an observe already under way, a detector state flushed late).
        ids = [r["click_id"] for r in await conn.fetch("SELECT click_id FROM clicks WHERE user_id = $1", pseudonym)]
        done.click_ids = ids
        # The signal writer's lock on these clicks (store/signals.py): a flush that began before
        # this point is committed before what follows reads, and one that begins later waits for
        # this erasure and then finds it (it drops what it holds of these clicks).
        await conn.execute(LOCK_CLICKS, sorted(ids), SIGNALS_LOCK)
        done.signals = _count(await conn.execute("DELETE FROM signals WHERE click_id = ANY($1::text[])", ids))
        await conn.execute("DELETE FROM signals_quarantine WHERE click_id = ANY($1::text[])", ids)
        # A quarantined click is its refused row as a JSON list in the clicks' column order: the user
        # id is its third value (not any value that happens to be spelt like it: a merchant `shop`).
        await conn.execute("DELETE FROM clicks_quarantine WHERE strpos(record, $1) > 0 AND record::jsonb->>2 = $2",
                           orjson.dumps(user_id).decode(), user_id)
        await conn.execute(
            "UPDATE click_states SET user_id = $2, detector = NULL WHERE click_id = ANY($1::text[]) "
            "AND (user_id IS DISTINCT FROM $2 OR detector IS NOT NULL)", ids, pseudonym)
        done.conversions = _count(await conn.execute(
            "UPDATE conversions SET user_id = $2 WHERE user_id = $1", user_id, pseudonym))
        # The outbox has no index on the user (postbacks would pay for it on every event): an
        # erasure reads the events kept (TRACKER_EVENT_RETENTION_DAYS) once.
        done.events = _count(await conn.execute(
            "UPDATE events SET data = CASE WHEN data->'conversion'->>'user_id' = $1 "
            "THEN jsonb_set(data, '{conversion,user_id}', to_jsonb($2::text)) "
            "ELSE jsonb_set(data, '{user_id}', to_jsonb($2::text)) END "
            "WHERE data->'conversion'->>'user_id' = $1 OR data->>'user_id' = $1", user_id, pseudonym))
        # Networks pass the shopper's address on as a parameter (Admitad's action_ip). Locked, so
        # that address retention truncating one of these rows meanwhile is read after its commit.
        # Not counted in the answer: the contract's counts are of the rows that name the user.
        await scrub_addresses(conn, "postback_history", await conn.fetch(
            "SELECT h.id, h.raw FROM conversions c JOIN postback_history h "
            "ON h.network = c.network AND h.order_id = c.order_id "
            "WHERE c.user_id = $1 ORDER BY h.id FOR UPDATE OF h", pseudonym))
        # Orphans naming one of the user's clicks, or reconciled into one of their conversions
        # (an orphan's own sub-id may be another click's).
        await scrub_addresses(conn, "orphan_postbacks", await conn.fetch(
            "SELECT id, raw FROM orphan_postbacks WHERE click_id = ANY($1::text[]) "
            "OR conversion_id IN (SELECT id FROM conversions WHERE user_id = $2) ORDER BY id FOR UPDATE",
            ids, pseudonym))
    return done


async def scrub_addresses(conn: Connection, table: str, rows: list[Any]) -> None:
    """Write each row's `raw` without the addresses among its parameters, where that changes it.
    `table` is ours (postback_history or orphan_postbacks), never input."""
    changed = [(r["id"], orjson.dumps(scrubbed).decode()) for r in rows
               if (scrubbed := without_addresses(r["raw"])) != r["raw"]]
    if changed:
        await conn.execute(
            f"UPDATE {table} t SET raw = u.raw::jsonb FROM unnest($1::bigint[], $2::text[]) AS u(id, raw) "
            "WHERE t.id = u.id", [c[0] for c in changed], [c[1] for c in changed])


async def announce(conn: asyncpg.Pool | asyncpg.Connection, user_id: str, before: datetime, sender: str = "") -> None:
    """Tell every worker (but `sender`, which swept itself) to sweep what it held of the user. Sent
    once the erasure's own sessions are deleted, so that the counts it answers are its own."""
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL,
                       orjson.dumps({"user_id": user_id, "before": before.isoformat(), "from": sender}).decode())


async def erased_since(conn: asyncpg.Pool | asyncpg.Connection, since: datetime) -> list[tuple[str, datetime]]:
    """The erasures made since a time (user id, erased_at), for a sweep of late clicks."""
    rows = await conn.fetch("SELECT user_id, erased_at FROM erasures WHERE erased_at >= $1", since)
    return [(r["user_id"], r["erased_at"]) for r in rows]


async def sweep_erasures(conn: asyncpg.Connection, days: int = 1) -> int:
    """Erase again, for the erasures of the last `days`, the clicks made before each that reached
    PostgreSQL since (a worker whose NOTIFY was missed); how many clicks that caught."""
    since = await conn.fetchval("SELECT now() - make_interval(days => $1)", days)
    caught = 0
    for user_id, before in await erased_since(conn, since):
        caught += (await erase(conn, user_id, before)).clicks
    return caught
