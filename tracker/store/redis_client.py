"""Connecting to Redis: a standalone server (the embedded one included) or a Redis Cluster, told
apart at start by the server itself (`INFO cluster`: cluster_enabled), so that TRACKER_REDIS_URL
names either a standalone server or any one node of a cluster (a seed: the client learns the other
nodes and the slots from it, and again after a failover).

On a cluster the client is redis-py's RedisCluster: each command goes to the master of its key's
slot, a pipeline is split by node, and a MOVED answer or a dead node makes it learn the slots
again. tracker's keys are laid out for it (redis_keys.py): nothing it sends spans two slots."""
from __future__ import annotations

import asyncio
from typing import TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

CLUSTER_HEADROOM = 8
AnyRedis: TypeAlias = "aioredis.Redis | RedisCluster"
# A pooled connection that Redis closed (a restart, a failover) fails its next command once; that one
# is sent again on a new connection. Only connection errors: a timed-out call may have run, and the
# batch script counts rate-limit hits, so it is never sent twice for a timeout. (A pool built with
# from_url gets no retry at all, unlike redis-py's default client: after Redis came back, each of
# up to 32 stale connections failed a request, /readyz included, and marked Redis down again.)
STALE_CONNECTION_RETRY = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


async def is_cluster(url: str, timeout: float = 2.0) -> bool | None:
    """Whether the server at `url` runs in cluster mode; None when it does not answer."""
    probe = aioredis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=timeout)
    try:
        info = await asyncio.wait_for(probe.info("cluster"), timeout)
        return bool(info.get("cluster_enabled"))
    except Exception:  # noqa: BLE001 - unreachable, or refusing: unknown
        return None
    finally:
        try:
            await asyncio.wait_for(probe.aclose(), 1.0)
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


def connect(url: str, cluster: bool, *, max_connections: int, timeout: float, name: str) -> AnyRedis:
    """A client for everything but pub/sub: a blocking pool of `max_connections` on a standalone
    server (a burst waits for a connection within each call's own deadline); on a cluster, whose
    pools do not wait, SessionStore lets `max_connections` calls at a time through and each node's
    pool has a few more (the wrong-key count, /readyz's probe). `timeout` is the socket's deadline, the
    longest of the calls' own."""
    if cluster:
        # One retry, at once: a command that met a dead master (a worker that had not talked to Redis
        # since a failover still has the old slots) learns the slots again and goes to the new master,
        # instead of failing and taking Redis for down. RedisCluster retries a timed-out command too,
        # but the calls' own deadlines (wait_for) end no later than the socket's, so none is sent
        # twice for a timeout; a MOVED answer is followed at once, not retried.
        return RedisCluster.from_url(
            url, max_connections=max_connections + CLUSTER_HEADROOM, socket_timeout=timeout, socket_connect_timeout=1.0,
            health_check_interval=0, client_name=name, retry=Retry(NoBackoff(), 1))
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=1.0, health_check_interval=0, client_name=name, retry=STALE_CONNECTION_RETRY)
    return aioredis.Redis.from_pool(pool)


async def open_client(url: str, *, max_connections: int = 32, timeout: float = 5.0,
                      name: str = "tracker") -> tuple[AnyRedis, bool | None]:
    """connect() after asking the server what it is: (client, cluster or not, None when it did not
    answer: then a standalone client, which SessionStore replaces once Redis answers)."""
    cluster = await is_cluster(url)
    return connect(url, bool(cluster), max_connections=max_connections, timeout=timeout, name=name), cluster
