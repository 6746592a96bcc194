"""The state feed: one Redis pub/sub connection per worker, shared by every live event stream.

A stream used to subscribe on a connection of its own, taken from the pool that the session batcher
and observe use: 100 streams emptied that pool and the redirects' sessions were dropped.
Now a stream listens here. The first listener of a click's channel SUBSCRIBEs it, the last one to
leave UNSUBSCRIBEs it, and one reader task hands each message to that channel's listeners through a
small queue: a client that does not read loses older changes (each message is the whole state, so
the newest is all it needs) and never grows memory.

Whenever Redis confirms a channel (a stream joined, or the feed reconnected) its listeners get LIVE
and read the state once: that covers whatever was published before the subscription took. When the
connection fails they get LOST and poll until LIVE comes again; the feed reconnects (0.5 s after a
failure at first, backing off to 5 s).
Commands go out only from the reader task, between reads, so nothing races on the connection.

On a Redis Cluster (told apart when the feed connects: redis_client.py) a click's changes are
published with SPUBLISH on the master of the click's slot, so the feed holds one connection per
master that has channels wanted, each SSUBSCRIBEd to the channels of that master's slots, read by a
task of its own. Any of them failing (a master dead, a slot moved: Redis then SUNSUBSCRIBEs it)
fails the whole feed: every stream gets LOST and polls, the feed learns the slots again and
reconnects, and the streams get LIVE again from the masters now serving their slots.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
from typing import Any, Awaitable, Callable, Iterator, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from ..domain.backoff import Backoff
from .redis_client import is_cluster
from .tasks import cancel_and_wait, supervised

log = structlog.get_logger("tracker.feed")
QUEUE_SIZE = 8  # per listener; past it the oldest item goes
READ_WAIT = 0.1  # a new channel is subscribed within this (plus a round trip)
PING_AFTER = 5.0  # seconds of silence before the feed asks Redis for a PONG ...
ANSWER_WAIT = 3.0  # ... and how long it waits for it before taking the connection for dead
# Streams read the state (once after LIVE, and every poll while the feed is away) through a
# semaphore of this size, so that however many are open they take at most this many of the worker's
# Redis connections, or of its PostgreSQL pool while Redis is down; a burst of them waits its turn
# outside the read's deadline instead of queueing inside it.
STREAM_READS = 4


class Link(enum.Enum):
    LIVE = "live"  # the channel is subscribed: read the state once, then wait for messages
    LOST = "lost"  # the connection failed: poll the state until LIVE



class Listener:
    """One stream's place on a channel: the messages (the published state, as bytes), LIVE and LOST."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | Link] = asyncio.Queue(QUEUE_SIZE)

    def put(self, item: bytes | Link) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    async def next(self, timeout: float) -> bytes | Link | None:
        """The next item, or None after `timeout` seconds without one."""
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None


class _Shard:
    """The channels one pub/sub connection carries: every channel on a standalone Redis, those of
    one master's slots (SSUBSCRIBE) on a cluster."""

    __slots__ = ("sharded", "channels", "changed")

    def __init__(self, sharded: bool) -> None:
        self.sharded = sharded
        self.channels: set[str] = set()  # wanted on this connection
        self.changed: set[str] = set()  # channels added or removed since the reader last looked

    def take(self, changed: set[str], wanted: dict[str, set[Listener]]) -> None:
        for channel in changed:
            if channel in wanted:
                self.channels.add(channel)
            else:
                self.channels.discard(channel)
        self.changed |= changed


class StateFeed:
    def __init__(self, url: str, name: str, socket_timeout: float = 2.0) -> None:
        self.url, self.name, self.socket_timeout = url, name, socket_timeout
        self.up: bool | None = None  # None until the first connection
        self._listeners: dict[str, set[Listener]] = {}
        self._live: set[str] = set()  # channels Redis confirmed on the current connection
        self._changed: set[str] = set()  # channels whose first listener came or last one left
        self._task: asyncio.Task[None] | None = None
        self.reads = asyncio.Semaphore(STREAM_READS)
        self._reconnect = Backoff(first=0.5, cap=5.0)

    @contextlib.contextmanager
    def listen(self, channel: str) -> Iterator[Listener]:
        listener = Listener()
        group = self._listeners.get(channel)
        if group is None:
            group = self._listeners[channel] = set()
            self._changed.add(channel)
        group.add(listener)
        if channel in self._live:
            listener.put(Link.LIVE)
        try:
            yield listener
        finally:
            group.discard(listener)
            if not group and self._listeners.get(channel) is group:
                del self._listeners[channel]  # the reader UNSUBSCRIBEs it
                self._changed.add(channel)

    def wake_listeners(self) -> None:
        """Every listener gets LOST now (shutdown: streams look at the closing flag at once)."""
        for group in self._listeners.values():
            for listener in group:
                listener.put(Link.LOST)

    async def start(self) -> None:
        self._task = supervised("state-feed", self._run)

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self.wake_listeners()

    # -- the reader ---------------------------------------------------------------------------
    async def _run(self) -> None:
        # Whether Redis is a cluster, asked until it answers; a cluster's client is kept across
        # reconnections: it knows every node by then, so the seed node's own failure is one more.
        cluster: bool | None = None
        topology: RedisCluster | None = None
        try:
            while True:
                try:
                    if cluster is None:
                        cluster = await is_cluster(self.url)
                    if cluster:
                        if topology is None:
                            topology = RedisCluster.from_url(self.url, socket_timeout=self.socket_timeout,
                                                             socket_connect_timeout=1.0)
                        await self._follow_cluster(topology)
                    else:
                        await self._follow_one()
                except Exception as exc:  # noqa: BLE001 - any failure: tell the streams, reconnect
                    self._lose(exc)
                await asyncio.sleep(self._reconnect.next())
        finally:
            if topology is not None:
                await _close(topology)

    async def _follow_one(self) -> None:
        """A standalone Redis: one connection, classic SUBSCRIBE."""
        # A new client each time: no state of a failed connection (redis-py's resubscription
        # bookkeeping, its pool's counts) survives into the next one. One connection at most.
        client = aioredis.Redis.from_url(self.url, max_connections=1, client_name=self.name,
                                         socket_timeout=self.socket_timeout, socket_connect_timeout=1.0)
        shard = _Shard(sharded=False)

        def route() -> None:
            changed, self._changed = self._changed, set()
            shard.take(changed, self._listeners)
        self._changed = set(self._listeners)  # a new connection: every channel wanted now
        route()
        try:
            await self._follow(client.pubsub(), shard, route)
        finally:
            await _close(client)

    async def _follow_cluster(self, cluster: RedisCluster) -> None:
        """A Redis Cluster: a connection per master that serves a wanted channel's slot, SSUBSCRIBE."""
        shards: dict[str, _Shard] = {}
        # The slots as the cluster serves them now (after a failover: the new masters).
        await asyncio.wait_for(cluster.nodes_manager.initialize(), self.socket_timeout)
        async with asyncio.TaskGroup() as tasks:
            def route() -> None:
                changed, self._changed = self._changed, set()
                by_node: dict[str, set[str]] = {}
                for channel in changed:
                    node = cluster.get_node_from_key(channel)
                    if node is None:
                        raise ConnectionError(f"no master serves the slot of {channel}")
                    by_node.setdefault(node.name, set()).add(channel)
                for name, channels in by_node.items():
                    shard = shards.get(name)
                    if shard is None:
                        shard = shards[name] = _Shard(sharded=True)
                        host, port = name.rsplit(":", 1)
                        tasks.create_task(self._follow_node(host, int(port), shard))
                    shard.take(channels, self._listeners)

            self._changed = set(self._listeners)  # a new connection: every channel wanted now
            route()
            tasks.create_task(self._route_forever(route))

    async def _route_forever(self, route: Callable[[], None]) -> None:
        """Hands new and dropped channels to their master's connection, as often as a reader looks."""
        while True:
            if self._changed:
                route()
            await asyncio.sleep(READ_WAIT / 2)

    async def _follow_node(self, host: str, port: int, shard: _Shard) -> None:
        # No retry of its own: a master gone is the whole feed's reconnect (the slots may have moved).
        client = aioredis.Redis(host=host, port=port, max_connections=1, client_name=self.name,
                                socket_timeout=self.socket_timeout, socket_connect_timeout=1.0,
                                retry=Retry(NoBackoff(), 0))
        try:
            await self._follow(client.pubsub(), shard, lambda: None)
        finally:
            await _close(client)

    async def _follow(self, pubsub: PubSub, shard: _Shard, route: Callable[[], None]) -> None:
        """Reads one connection: subscribes and unsubscribes the shard's channels as streams come and
        go, hands each message to the channel's listeners."""
        try:
            await self._read(pubsub, shard, route)
        finally:
            try:
                await asyncio.wait_for(pubsub.aclose(), 1.0)
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    async def _read(self, pubsub: PubSub, shard: _Shard, route: Callable[[], None]) -> None:
        # redis-py leaves PubSub.connect unannotated: its type, as the library defines it.
        connect = cast(Callable[[], Awaitable[None]], pubsub.connect)
        await connect()
        if not self.up:
            log.info("state_feed_connected", channels=len(self._listeners), sharded=shard.sharded)
        self.up = True
        self._reconnect.reset()
        loop = asyncio.get_running_loop()
        subscribed: set[str] = set()
        unconfirmed: dict[str, int] = {}  # SUBSCRIBEs sent per channel and not yet confirmed
        leaving: dict[str, int] = {}  # SUNSUBSCRIBEs sent per channel and not yet confirmed
        heard, pinged = loop.time(), False
        subscribe = pubsub.ssubscribe if shard.sharded else pubsub.subscribe
        unsubscribe = pubsub.sunsubscribe if shard.sharded else pubsub.unsubscribe
        while True:
            if self._changed:
                route()
            if shard.changed:
                changed, shard.changed = shard.changed, set()
                new = [c for c in changed if c in shard.channels and c not in subscribed]
                gone = [c for c in changed if c not in shard.channels and c in subscribed]
                for group in _by_slot(new, shard.sharded):
                    await subscribe(*group)
                    subscribed.update(group)
                    for channel in group:
                        unconfirmed[channel] = unconfirmed.get(channel, 0) + 1
                for group in _by_slot(gone, shard.sharded):
                    await unsubscribe(*group)
                    subscribed.difference_update(group)
                    for channel in group:
                        leaving[channel] = leaving.get(channel, 0) + 1
                    self._live.difference_update(group)
            msg = await pubsub.get_message(timeout=READ_WAIT)
            now = loop.time()
            if msg is None:
                # A connection that died without a FIN reads as silence: ask, and give up on it
                # when no answer comes (redis-py's own pub/sub health check never gives up).
                if now - heard > PING_AFTER + ANSWER_WAIT:
                    raise ConnectionError(f"no answer from Redis for {now - heard:.1f} s")
                if now - heard > PING_AFTER and not pinged:
                    await pubsub.ping()
                    pinged = True
                continue
            heard, pinged = now, False
            self._dispatch(msg, subscribed, unconfirmed, leaving)

    def _dispatch(self, msg: dict[str, Any], subscribed: set[str], unconfirmed: dict[str, int],
                  leaving: dict[str, int]) -> None:
        kind, raw = msg["type"], msg["channel"]
        channel = raw.decode() if isinstance(raw, bytes) else raw
        if kind in ("message", "smessage"):
            for listener in self._listeners.get(channel, ()):
                listener.put(msg["data"])
        elif kind in ("unsubscribe", "sunsubscribe"):
            left = leaving.get(channel, 0)
            if left > 1:
                leaving[channel] = left - 1
            elif left == 1:
                del leaving[channel]
            elif channel in subscribed:
                # Redis dropped a shard channel the feed did not leave: its slot moved to another master.
                raise ConnectionError(f"the slot of {channel} moved")
        elif kind in ("subscribe", "ssubscribe"):
            # Confirmations come in order: only the one answering the latest SUBSCRIBE of a channel
            # still wanted makes it live (an earlier one may predate an UNSUBSCRIBE sent since).
            left = unconfirmed.get(channel, 1) - 1
            if left > 0:
                unconfirmed[channel] = left
                return
            unconfirmed.pop(channel, None)
            if channel in subscribed:
                self._live.add(channel)
                for listener in self._listeners.get(channel, ()):
                    listener.put(Link.LIVE)

    def _lose(self, exc: BaseException) -> None:
        if self.up is not False:
            log.warning("state_feed_lost", error=repr(exc)[:300], channels=len(self._listeners))
        self.up = False
        self._live.clear()
        self.wake_listeners()


def _by_slot(channels: list[str], sharded: bool) -> list[list[str]]:
    """The channels in groups that one (S)SUBSCRIBE may name: all at once, or those of one slot
    (a shard channel command spanning two slots is refused: CROSSSLOT)."""
    if not channels:
        return []
    if not sharded:
        return [channels]
    groups: dict[int, list[str]] = {}
    for channel in channels:
        groups.setdefault(key_slot(channel.encode()), []).append(channel)
    return list(groups.values())


async def _close(client: aioredis.Redis | RedisCluster) -> None:
    try:
        await asyncio.wait_for(client.aclose(), 1.0)
    except Exception:  # noqa: BLE001 - closing a broken connection
        pass
