"""The exceptions that mean a backing service is away (not that the request or the data is wrong):
web/common.py answers them with 503, the click writer spools, the event stream waits."""
from __future__ import annotations

import asyncpg
import redis.exceptions

POSTGRES_DOWN: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError, asyncpg.AdminShutdownError)
REDIS_DOWN: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
DEPENDENCY_DOWN = POSTGRES_DOWN + REDIS_DOWN
