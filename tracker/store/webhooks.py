"""Webhook deliveries in PostgreSQL: leasing due work, recording outcomes, status and retry.

A delivery is leased by moving its next_attempt_at past the send's timeout, in a transaction of its
own that commits at once (`FOR UPDATE SKIP LOCKED`: workers and pods racing for the same rows each
take different ones, none waits). No transaction stays open while a request is out, so a slow
subscriber holds no connection. A worker that dies mid-send
leaves its rows leased; they are taken again when the lease ends (at least once).

Order: a delivery is due only when no earlier delivery with the same ordering key (one conversion)
is still pending for that webhook, so a conversion's events arrive in the order they happened.
A delivery that has failed for good does not hold the ones after it back.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, AsyncIterator, TypedDict, cast

import asyncpg

from ..domain.webhooks import Webhook
from .db import Connection

# Candidates come from the due index in order, a bounded number of them, so the work per call stays
# small whatever the backlog and whatever the planner's statistics say of a table that just grew. A
# candidate behind a pending delivery of the same conversion is not sent: it is deferred to that
# delivery's next attempt (and woken when it ends), so that blocked rows do not fill the head of the
# due index and starve the rest.
_CLAIM = (
    "WITH cand AS MATERIALIZED (SELECT d.event_id, d.next_attempt_at, (SELECT p.next_attempt_at "
    "FROM webhook_deliveries p WHERE p.webhook = $1 AND p.ordering_key = d.ordering_key AND p.state = 'pending' "
    "AND p.event_id < d.event_id ORDER BY p.event_id LIMIT 1) AS blocked_until FROM webhook_deliveries d "
    "WHERE d.webhook = $1 AND d.state = 'pending' AND d.next_attempt_at <= now() "
    "ORDER BY d.next_attempt_at, d.event_id LIMIT $4 FOR UPDATE OF d SKIP LOCKED), "
    "deferred AS (UPDATE webhook_deliveries d SET next_attempt_at = greatest(c.blocked_until, now() + interval '1 s') "
    "FROM cand c WHERE d.webhook = $1 AND d.event_id = c.event_id AND c.blocked_until IS NOT NULL), "
    "due AS (SELECT event_id FROM cand WHERE blocked_until IS NULL ORDER BY next_attempt_at, event_id LIMIT $2) "
    "UPDATE webhook_deliveries d SET next_attempt_at = now() + make_interval(secs => $3), "
    "attempts = d.attempts + 1, last_attempt_at = now() FROM due, events e "
    "WHERE d.webhook = $1 AND d.event_id = due.event_id AND e.id = d.event_id "
    "RETURNING d.event_id, d.attempts, e.public_id, e.type, e.created_at, e.seq, e.data")
# A delivery that stops being pending (delivered, or failed for good) wakes the next delivery of its
# conversion, deferred while it was pending. One statement each: one round trip per outcome.
_WAKE_NEXT = (
    "UPDATE webhook_deliveries n SET next_attempt_at = now() FROM done WHERE n.webhook = $1 "
    "AND n.ordering_key = done.ordering_key AND n.state = 'pending' AND n.event_id > $2 "
    "AND n.next_attempt_at > now()")
# A failed attempt: retried after `delay` seconds, unless the delivery has been retried for
# `retry_for` seconds already (or the subscriber said 410 Gone): then it has failed for good. Only
# the lease holder (same attempt number) records it; a success is recorded whoever sent it.
_FAILED = (
    "WITH done AS (UPDATE webhook_deliveries SET last_status = $4, last_error = $5, "
    "state = CASE WHEN $6 OR now() - retry_from >= make_interval(secs => $7) THEN 'failed' ELSE 'pending' END, "
    "next_attempt_at = now() + make_interval(secs => $8) "
    "WHERE webhook = $1 AND event_id = $2 AND attempts = $3 AND state = 'pending' RETURNING state, ordering_key), "
    "woken AS (" + _WAKE_NEXT.replace("FROM done WHERE", "FROM done WHERE done.state = 'failed' AND") + ") "
    "SELECT state FROM done")
_DELIVERED = (
    "WITH done AS (UPDATE webhook_deliveries SET state = 'delivered', delivered_at = now(), last_status = $3, "
    "last_error = NULL WHERE webhook = $1 AND event_id = $2 AND state = 'pending' RETURNING ordering_key) "
    + _WAKE_NEXT)


class Claimed(TypedDict):
    """A delivery leased to this worker (claim), with the event it sends."""
    event_id: int
    attempts: int  # this attempt's number
    public_id: str
    type: str
    created_at: datetime
    seq: int
    data: dict[str, Any]


class LastFailure(TypedDict):
    status: int | None
    error: str | None
    at: str


class SubscriberStatus(TypedDict):
    """A subscriber as `tracker webhooks status` shows it."""
    name: str
    url: str  # without its query (public_url)
    active: bool
    types: list[str] | None
    backlog: int
    oldest_pending_seconds: float
    retrying: int
    failed: int
    last_failure: LastFailure | None


async def load(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, Webhook]:
    rows = await conn.fetch("SELECT name, url, secret, types FROM webhooks WHERE active ORDER BY name")
    return {r["name"]: Webhook(r["name"], r["url"], r["secret"], tuple(r["types"]) if r["types"] is not None else None)
            for r in rows}


@asynccontextmanager
async def _unflushed(pool: asyncpg.Pool) -> AsyncIterator[Connection]:
    """A transaction whose commit does not wait for its WAL flush: a lease or an outcome lost in a
    PostgreSQL crash means a send again (deliveries are at least once anyway), and no send waits for
    a flush. SET LOCAL, not a session setting: a transaction pooler refuses that at connect, and
    would carry it to other clients. BEGIN and SET in one round trip; on an error the pool's release
    rolls back."""
    async with pool.acquire() as conn:
        await conn.execute("BEGIN; SET LOCAL synchronous_commit = off")
        yield conn
        await conn.execute("COMMIT")


async def claim(pool: asyncpg.Pool, webhook: str, limit: int, lease: float) -> list[Claimed]:
    async with _unflushed(pool) as conn:
        rows = await conn.fetch(_CLAIM, webhook, limit, float(lease), max(4 * limit, 32))
        return [cast(Claimed, dict(r)) for r in rows]


async def delivered(pool: asyncpg.Pool, webhook: str, event_id: int, status: int) -> None:
    async with _unflushed(pool) as conn:
        await conn.execute(_DELIVERED, webhook, event_id, status)


async def failed(pool: asyncpg.Pool, webhook: str, event_id: int, attempt: int, status: int | None,
                 error: str | None, gone: bool, retry_for: float, delay: float) -> str | None:
    """Record a failed attempt; the delivery's state after it ('pending' or 'failed'), or None when
    the lease had passed to another worker meanwhile."""
    async with _unflushed(pool) as conn:
        state: str | None = await conn.fetchval(_FAILED, webhook, event_id, attempt, status, error, gone,
                                                float(retry_for), float(delay))
        return state


async def release(pool: asyncpg.Pool, webhook: str, leases: list[tuple[int, int]]) -> None:
    """Give back leases of sends cancelled by a stop, so that another worker takes them at once."""
    async with _unflushed(pool) as conn:
        await conn.executemany(
            "UPDATE webhook_deliveries SET next_attempt_at = now(), attempts = attempts - 1 "
            "WHERE webhook = $1 AND event_id = $2 AND attempts = $3 AND state = 'pending'",
            [(webhook, event_id, attempt) for event_id, attempt in leases])


async def oldest_pending(conn: asyncpg.Connection | asyncpg.Pool, webhook: str) -> datetime | None:
    oldest: datetime | None = await conn.fetchval(
        "SELECT min(created_at) FROM webhook_deliveries WHERE webhook = $1 AND state = 'pending'", webhook)
    return oldest


async def status(conn: Connection) -> list[SubscriberStatus]:
    """Per subscriber: backlog, the oldest pending event's age, failures and the last error (no
    secret, and the URL without its query)."""
    from ..domain.webhooks import public_url

    out: list[SubscriberStatus] = []
    for w in await conn.fetch("SELECT name, url, types, active FROM webhooks ORDER BY name"):
        row = await conn.fetchrow(
            "SELECT count(*) AS backlog, extract(epoch FROM now() - min(created_at))::float8 AS age, "
            "count(*) FILTER (WHERE attempts > 0) AS retrying FROM webhook_deliveries "
            "WHERE webhook = $1 AND state = 'pending'", w["name"])
        assert row is not None  # an aggregate without GROUP BY: always one row
        failed_count = await conn.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE webhook = $1 AND state = 'failed'", w["name"])
        last = await conn.fetchrow(
            "SELECT last_status, last_error, last_attempt_at FROM webhook_deliveries WHERE webhook = $1 "
            "AND state IN ('pending', 'failed') AND attempts > 0 AND last_attempt_at IS NOT NULL "
            "ORDER BY last_attempt_at DESC LIMIT 1", w["name"])
        out.append({
            "name": w["name"], "url": public_url(w["url"]), "active": w["active"],
            "types": list(w["types"]) if w["types"] is not None else None,
            "backlog": row["backlog"], "oldest_pending_seconds": round(row["age"] or 0.0, 3),
            "retrying": row["retrying"], "failed": failed_count,
            "last_failure": None if last is None else {
                "status": last["last_status"], "error": last["last_error"],
                "at": last["last_attempt_at"].isoformat()},
        })
    return out


async def retry_failed(conn: Connection, webhook: str) -> int | None:
    """Send a subscriber's failed deliveries again, with a fresh 24 h of retries. None: no such
    subscriber."""
    async with conn.transaction():
        if await conn.fetchval("SELECT 1 FROM webhooks WHERE name = $1", webhook) is None:
            return None
        done = await conn.execute(
            "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = now(), "
            "retry_from = now() WHERE webhook = $1 AND state = 'failed'", webhook)
    return int(done.split()[-1])
