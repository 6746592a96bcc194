"""The PostgreSQL pool, the migrations runner and the clicks partitions."""
from __future__ import annotations

import asyncio
import os
import re
from datetime import date, datetime, timedelta, timezone
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeAlias, TypeVar

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

_MIGRATION = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
# Arbitrary constants for pg_advisory_lock: one for migrations, one for partition maintenance.
MIGRATE_LOCK = 7_403_911_001
PARTITION_LOCK = 7_403_911_002

T = TypeVar("T")
# An acquired connection: one of its own (asyncpg.connect) or one a pool lends (a proxy to it).
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy
# Whatever runs a query: a pool (each query on a connection it lends) or an acquired connection.
Executor: TypeAlias = asyncpg.Pool | Connection


async def _release(conn: asyncpg.Connection) -> None:
    """Cheaper than asyncpg's default reset (RESET ALL, UNLISTEN, advisory unlock, ... on every
    release: 6% of a worker's CPU under load). Our code sets no session state on pooled
    connections, so only an unfinished transaction needs undoing."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


async def json_codecs(conn: asyncpg.Connection) -> None:
    """json and jsonb as Python values on this connection, both ways, through orjson: a query reads
    objects, not their text, and an INSERT passes the object, never text dumped beforehand (text
    would be stored as a JSON string). Text format, so a COPY (binary) of a table with a json column
    would refuse it: none has one. Built-in types: no round trip to look them up."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, schema="pg_catalog", encoder=_json_text, decoder=orjson.loads,
                                  format="text")


async def connect(dsn: str | None, **options: Any) -> asyncpg.Connection:
    """A connection of its own, json decoded as the pool's are (json_codecs)."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn, **options)
    try:
        await json_codecs(conn)
    except BaseException:
        conn.terminate()
        raise
    return conn


def connect_options(pooler: str | None) -> dict[str, Any]:
    """asyncpg's options for a DSN that may be a transaction-pooling PgBouncer (`pooler`): behind
    one, consecutive transactions of a client may run on different server connections, so a
    statement prepared by name in one of them is not there in the next ("prepared statement
    __asyncpg_stmt_N__ does not exist"). Without a statement cache asyncpg prepares each query
    unnamed, and sends its Parse, Bind and Execute before one Sync: one transaction for PgBouncer,
    in two round trips (Parse and Describe, then Bind and Execute), and PostgreSQL plans the query
    each time. What that costs: docs/performance.md, "PgBouncer in transaction mode"."""
    return {"statement_cache_size": 0} if pooler else {}


async def create_pool(dsn: str, min_size: int = 2, max_size: int = 10, pooler: str | None = None,
                      timeout: float = 5.0, check: bool = True) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=30, timeout=timeout, reset=_release,
        init=json_codecs, server_settings={"application_name": "tracker"}, **connect_options(pooler),
    )
    if check:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
    return pool


# How long a starting process waits for PostgreSQL to answer before it gives up (`tracker serve`'s
# workers, then the arbiter, exit non-zero; docs/operations.md): a restart of PostgreSQL or of its pod
# takes less, a PostgreSQL that is not there is named within about half a minute.
START_WAIT = 15.0


def _never() -> bool:
    return False


# Whether this process waits for PostgreSQL without end instead: a worker of a server that has served
# already (one replacing a worker that was killed, SIGHUP's new ones, or one still starting when
# another had started): the server is up, its other workers are serving (spooling, while PostgreSQL
# is away), and a worker that gave up would stop all of them (tracker serve's arbiter stops on a
# failed boot). Asked at each attempt; set by tracker serve's worker before its app starts.
patient: Callable[[], bool] = _never
# Failures worth waiting out at start: nothing listens yet, a timeout, PostgreSQL starting or
# shutting down. Anything else (a wrong password, no such database) is named at once.
_TRANSIENT = (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.ConnectionDoesNotExistError,
              asyncpg.TooManyConnectionsError, asyncpg.AdminShutdownError)


class StartFailed(RuntimeError):
    """A process cannot start; the message says why, for the operator (no traceback needed)."""


async def at_start(dsn: str, what: Callable[[], Awaitable[T]], wait: float = START_WAIT) -> T:
    """`what()` (a connection or a pool to `dsn`), tried again with backoff while PostgreSQL is
    unreachable, for up to `wait` seconds (without end while `patient()`); then StartFailed
    naming the server (password hidden) and the last error. Each failed attempt is logged
    (postgres_unreachable_at_start)."""
    import structlog

    from ..settings import censor_dsn

    log = structlog.get_logger("tracker.db")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    attempt = 0
    while True:
        attempt += 1
        try:
            return await what()
        except _TRANSIENT as exc:
            error = f"{type(exc).__name__}: {exc}"
            if patient():
                log.warning("postgres_unreachable_at_start", dsn=censor_dsn(dsn), attempt=attempt, error=error,
                            waiting_s=None, replacing_a_worker=True, pid=os.getpid())
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
                continue
            left = deadline - loop.time()
            log.warning("postgres_unreachable_at_start", dsn=censor_dsn(dsn), attempt=attempt, error=error,
                        waiting_s=round(max(left, 0.0), 1), pid=os.getpid())
            if left <= 0:
                raise StartFailed(f"PostgreSQL at {censor_dsn(dsn)} did not answer in {wait:.0f} s "
                                  f"({attempt} attempts): {error}") from exc
            await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 4.0, left))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            raise StartFailed(f"PostgreSQL at {censor_dsn(dsn)} refused tracker: {type(exc).__name__}: {exc}") \
                from exc


class MigrationsError(RuntimeError):
    """The migrations cannot be found or do not number cleanly."""


def sql_dir() -> Traversable:
    """Where the migrations are: TRACKER_SQL_DIR when set, else the ones shipped inside the package
    (tracker/sql, package data, so an installed wheel finds them wherever it runs)."""
    configured = os.environ.get("TRACKER_SQL_DIR")
    return Path(configured) if configured else resources.files("tracker") / "sql"


def migrations(directory: Traversable | None = None) -> list[tuple[int, str, Traversable]]:
    """The numbered migrations `NNNN_name.sql`, in order. Finding none is an error: a database
    "migrated" with nothing would only fail later, on the first query."""
    directory = sql_dir() if directory is None else directory
    try:
        entries = list(directory.iterdir())
    except OSError:  # missing or not a directory: the same mistake as an empty one
        entries = []
    found = []
    for path in entries:
        match = _MIGRATION.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path.name, path))
    found.sort(key=lambda m: (m[0], m[1]))
    if not found:
        raise MigrationsError(f"no migrations (NNNN_name.sql) found in {directory}")
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise MigrationsError(f"duplicate migration numbers in {directory}")
    return found


async def migrate(conn: asyncpg.Connection, directory: Traversable | None = None) -> list[str]:
    """Apply pending migrations in order, each once, under an advisory lock (safe from many pods)."""
    pending = migrations(directory)  # before the lock: no migrations fails without touching the database
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, path in pending:
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text(encoding="utf-8"))
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied_now.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK)
    return applied_now


def partition_name(day: date) -> str:
    return f"clicks_p{day:%Y%m%d}"


async def ensure_partitions(conn: Connection, first: date, days: int) -> list[str]:
    """Create the daily partitions of clicks for [first, first + days) that do not exist yet."""
    created = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
        existing = await _partitions(conn)
        for offset in range(days):
            day = first + timedelta(days=offset)
            name = partition_name(day)
            if name in existing:
                continue
            # Identifiers and bounds come from a date we formatted ourselves, not from input.
            await conn.execute(
                f"CREATE TABLE {name} PARTITION OF clicks FOR VALUES FROM "
                f"('{day.isoformat()} 00:00:00+00') TO ('{(day + timedelta(days=1)).isoformat()} 00:00:00+00')"
            )
            created.append(name)
    return created


async def _partitions(conn: Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'clicks'")
    return {r["relname"] for r in rows}


async def drop_old_partitions(conn: asyncpg.Connection, retention_days: int,
                              today: date | None = None) -> list[str]:
    """Drop the daily partitions that end before today - retention_days."""
    today = today or datetime.now(timezone.utc).date()
    cutoff = today - timedelta(days=retention_days)
    dropped = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
        for name in sorted(await _partitions(conn)):
            match = re.fullmatch(r"clicks_p(\d{8})", name)
            if not match:
                continue
            day = datetime.strptime(match.group(1), "%Y%m%d").date()
            if day < cutoff:
                await conn.execute(f"DROP TABLE {name}")
                dropped.append(name)
    return dropped


async def ensure_near_partitions(conn: Connection, ahead: int = 7) -> list[str]:
    today = datetime.now(timezone.utc).date()
    return await ensure_partitions(conn, today - timedelta(days=1), ahead + 2)


async def near_partitions_at_start(dsn: str, pool: asyncpg.Pool) -> list[str]:
    """ensure_near_partitions on one of the pool's connections as a worker starts: PostgreSQL going
    away just then is waited out as at start (at_start), instead of failing the worker's boot and
    with it the whole server (gunicorn stops on a worker that cannot boot)."""
    async def run() -> list[str]:
        async with pool.acquire() as conn:
            return await ensure_near_partitions(conn)
    return await at_start(dsn, run)
