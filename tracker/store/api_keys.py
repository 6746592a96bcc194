"""Machine keys in PostgreSQL (table api_keys): create, list, revoke, and the check of a key sent to
us. Every check reads the primary (no cache): a revoked key is refused by the next request, on
every worker and pod."""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypedDict, cast

import asyncpg

from ..domain.access import key_hash, new_key

# last_used_at is written when the stored one is older than this: at most about one write a minute
# per key, whatever the key's request rate.
TOUCH_EVERY = timedelta(seconds=60)


class ListedKey(TypedDict):
    """A live key as `tracker keys list` shows it (never its hash)."""
    name: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None


class KeyNameTaken(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class StoredKey:
    id: int
    name: str
    scopes: frozenset[str]


async def create(conn: asyncpg.Pool | asyncpg.Connection, name: str, scopes: list[str]) -> str:
    """Store a new key's hash; the key itself, which is shown once and kept nowhere."""
    key = new_key()
    try:
        await conn.execute("INSERT INTO api_keys (name, scopes, key_hash) VALUES ($1, $2, $3)",
                           name, scopes, key_hash(key))
    except asyncpg.UniqueViolationError:
        raise KeyNameTaken(f"a live key named {name!r} exists: revoke it first, or choose another name") from None
    return key


async def listed(conn: asyncpg.Pool | asyncpg.Connection) -> list[ListedKey]:
    rows = await conn.fetch("SELECT name, scopes, created_at, last_used_at FROM api_keys "
                            "WHERE revoked_at IS NULL ORDER BY name")
    return [cast(ListedKey, dict(r)) for r in rows]


async def revoke(conn: asyncpg.Pool | asyncpg.Connection, name: str) -> bool:
    """Revoke the live key of that name; False when there is none."""
    return await conn.fetchval("UPDATE api_keys SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL "
                               "RETURNING true", name) is not None


async def find(pool: asyncpg.Pool, key: str) -> StoredKey | None:
    """The live key `key` is, or None (unknown or revoked); notes its use at most once a minute."""
    digest = key_hash(key)
    row = await pool.fetchrow("SELECT id, name, scopes, key_hash, revoked_at, last_used_at, now() AS now "
                              "FROM api_keys WHERE key_hash = $1", digest)
    # The index found the row by the digest; compared again in constant time all the same.
    if row is None or row["revoked_at"] is not None or not hmac.compare_digest(row["key_hash"], digest):
        return None
    last: datetime | None = row["last_used_at"]
    if last is None or row["now"] - last >= TOUCH_EVERY:
        await pool.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", row["id"])
    return StoredKey(row["id"], row["name"], frozenset(row["scopes"]))
