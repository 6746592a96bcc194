"""create_app(): routes, middlewares, and one cleanup context per resource, in dependency order."""
from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path
from typing import AsyncIterator

import structlog
from aiohttp import web

from . import internals, keys, metrics
from .domain.catalog import load_catalog
from .domain.detection import Detector
from .domain.tokens import UserTokens
from .settings import Settings, censor_dsn
from .store.clicks import ClickWriter
from .store.db import at_start, create_pool, near_partitions_at_start
from .store.delivery import Dispatcher, options_from
from .store.erasure_watch import ErasureWatch
from .store.feed import StateFeed
from .store.key_guard import KeyGuard
from .store.merchants import MerchantCache
from .store.redis_client import AnyRedis, connect, is_cluster, open_client
from .store.replica import SupportReads
from .store.sequencer import Sequencer
from .store.sessions import SYNC_TIMEOUT, SessionStore
from .store.signals import SignalWriter
from .store.spool import Spool
from .store.tasks import cancel_and_wait, supervised
from .tally_peers import TallyPeers
from .web import activation, audit, erasure, event_feed, events, lookups, observe, ops, postbacks, support
from .web.common import answer, answer_protocol_errors_as_json, errors
from .web.console import setup_console
from .web.console_guard import console_headers
from .web.cors import preflight, setup_cors

log = structlog.get_logger("tracker.app")


async def _postgres(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    assert settings.database_url, "resolve the database before create_app"
    # PostgreSQL unreachable at start: waited for (db.START_WAIT), then StartFailed, which stops
    # `tracker serve` with the reason (serve.Worker).
    pool = await at_start(settings.database_url, lambda: create_pool(settings.database_url or "",
                                                                     pooler=settings.database_pooler))
    created = await near_partitions_at_start(settings.database_url, pool)
    log.info("postgres_ready", dsn=censor_dsn(settings.database_url), partitions_created=created)
    metrics.DEPENDENCY_UP.labels("postgres").set(1)
    app[keys.POOL] = pool
    yield
    await pool.close()


async def _reads(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    reads = SupportReads(app[keys.POOL], settings.database_replica_url, settings.database_pooler)
    await reads.start()
    if settings.database_replica_url:
        log.info("replica_configured", dsn=censor_dsn(settings.database_replica_url))
    app[keys.READS] = reads
    yield
    await reads.stop()


async def _merchants(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    # Reloads are NOTIFYed: LISTEN needs a session of its own, on the primary itself.
    cache = MerchantCache(settings.direct_url or "", app[keys.POOL])
    await cache.start()
    app[keys.MERCHANTS] = cache
    yield
    await cache.stop()


# The worker's Redis connections for everything but the event streams (those share the one
# connection of the state feed). Each user holds a connection for one round trip at a time: the
# session batcher (one call in flight), observe (a session read, then maybe a state write), an event
# stream's opening read, /readyz and the outage probe (a PING each); the open streams' own reads
# take at most feed.STREAM_READS (4) at a time. An observe worker at full speed (3,000 requests/s)
# keeps about 3 busy; 32 leaves ten times that, and a burst past it waits for a connection
# (BlockingConnectionPool) within each call's own deadline. redis-py's default pool has 100 and
# raises MaxConnectionsError past them, which the fail-open code took for "Redis is down".
# Per worker: at most REDIS_MAX_CONNECTIONS + 1 connections, whatever the number of streams (on a
# Redis Cluster as many per master, and a feed connection per master: store/redis_client.py).
REDIS_MAX_CONNECTIONS = 32


async def _redis(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    # Each call has its own, shorter, deadline (wait_for); the socket's is the longest of them, the
    # batch call's (SessionStore.sync_timeout). The name shows the worker in Redis's CLIENT LIST.
    url, name = settings.redis_url or "", f"tracker-{os.getpid()}"
    client, cluster = await open_client(url, max_connections=REDIS_MAX_CONNECTIONS, timeout=SYNC_TIMEOUT, name=name)

    async def reconnect() -> AnyRedis | None:
        """Redis was unreachable at start: once it answers, the client for what it is."""
        found = await is_cluster(url)
        if found is None:
            return None
        return connect(url, True, max_connections=REDIS_MAX_CONNECTIONS, timeout=SYNC_TIMEOUT,
                       name=name) if found else client

    sessions = SessionStore(client, settings.redis_prefix, reconnect=reconnect if cluster is None else None,
                            max_calls=REDIS_MAX_CONNECTIONS, pod_workers=settings.workers)
    redis_up = await sessions.ping()
    metrics.DEPENDENCY_UP.labels("redis").set(int(redis_up))
    if not redis_up:
        log.warning("redis_unreachable_at_start", url=censor_dsn(settings.redis_url))
    elif cluster:
        log.info("redis_cluster", url=censor_dsn(settings.redis_url))
    await sessions.start()
    app[keys.SESSIONS] = sessions
    app[keys.KEY_GUARD] = KeyGuard(lambda: sessions.client, settings.redis_prefix, up=lambda: sessions.ok,
                                   window=settings.key_guess_window)
    yield
    await sessions.stop()
    await client.aclose()
    if sessions.client is not client:
        await sessions.client.aclose()


async def _feed(app: web.Application) -> AsyncIterator[None]:
    """The one pub/sub connection of this worker, for all its event streams (store/feed.py)."""
    feed = StateFeed(app[keys.SETTINGS].redis_url or "", name=f"tracker-feed-{os.getpid()}")
    await feed.start()
    app[keys.FEED] = feed
    yield
    await feed.stop()


async def _writer(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    spool = Spool(settings.spool_dir, settings.spool_max_bytes)
    writer = ClickWriter(app[keys.POOL], spool, durability=settings.durability,
                         queue_limit=settings.queue_limit, batch_limit=settings.batch_limit,
                         dsn=settings.database_url, pooler=settings.database_pooler)
    await writer.start()
    app[keys.WRITER] = writer
    yield
    await writer.close()


async def _signals(app: web.Application) -> AsyncIterator[None]:
    writer = SignalWriter(app[keys.POOL], forget=app[keys.SESSIONS].forget_states)
    await writer.start()
    app[keys.SIGNALS] = writer
    yield
    await writer.stop()


async def _erasures(app: web.Application) -> AsyncIterator[None]:
    """This worker's sweep of what it held of a user when an erasure ran (store/erasure_watch.py)."""
    # LISTEN needs a session of its own: on the primary itself, never through a transaction pooler.
    watch = ErasureWatch(app[keys.SETTINGS].direct_url or "", app[keys.POOL], app[keys.WRITER],
                         app[keys.SIGNALS], app[keys.SESSIONS])
    await watch.start()
    app[keys.ERASURES] = watch
    yield
    await watch.stop()


async def _sequencer(app: web.Application) -> AsyncIterator[None]:
    """This worker's offer to number committed events into the feed (one worker at a time does)."""
    sequencer = Sequencer(app[keys.POOL])
    await sequencer.start()
    yield
    await sequencer.stop()


async def _webhooks(app: web.Application) -> AsyncIterator[None]:
    """This worker's webhook dispatcher: its own pool and HTTP client, off the request path."""
    settings = app[keys.SETTINGS]
    if not settings.webhooks:
        yield
        return
    dispatcher = Dispatcher(settings.database_url or "", options_from(settings))
    await dispatcher.start()
    app[keys.WEBHOOKS] = dispatcher
    yield
    await dispatcher.stop()


async def _tally(app: web.Application) -> AsyncIterator[None]:
    async def flush_every_second() -> None:
        while True:
            await asyncio.sleep(1.0)
            metrics.tally.flush()

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    peers = TallyPeers(Path(directory)) if directory else None
    if peers is not None:
        peers.start()
        app[keys.TALLY_PEERS] = peers
    task = supervised("metrics-tally", flush_every_second)
    yield
    await cancel_and_wait([task])
    if peers is not None:
        peers.close()
    metrics.tally.flush()


async def _freeze_startup_objects(app: web.Application) -> None:
    """Move everything built so far (modules, classes, the app and its resources, ~64,000 objects)
    out of the cyclic GC's reach: a full collection then scans only what was made since.
    Measured under wrk (async mode, 2 workers): full collections took 38-55 ms, stalling every
    request on that worker; with the freeze, 2-3 ms."""
    gc.freeze()


async def _closing(app: web.Application) -> None:
    app[keys.CLOSING].set()  # live event streams end so that shutdown does not wait for them
    if keys.FEED in app:
        app[keys.FEED].wake_listeners()  # now, not at their next heartbeat


def _route_go_directly(app: web.Application) -> None:
    """Send `GET|HEAD /go/<slug>` straight to the activation handler, past aiohttp's router and
    middleware chain, with the same error handling (`answer`). Every other request, and any /go path
    that is not a plain slug (escapes, more segments, empty), goes the routed way. Measured in
    alternating wrk runs (docs/performance.md, history): 160 -> 131 us of worker CPU per redirect.

    aiohttp's server calls the app's private `_handle` for each request (tracker/internals.py, checked
    at start); tests/test_activation.py checks both ways agree."""
    routed = internals.routed_handle(app)
    go = activation.activate_in

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        path = request.raw_path
        if path.startswith("/go/") and (request.method == "GET" or request.method == "HEAD"):
            slug = path[4:].partition("?")[0]
            if slug and "/" not in slug and "%" not in slug:
                return await answer(app, request, "go", go(app, request, slug))
        return await routed(request)

    internals.replace_handle(app, handle)


def create_app(settings: Settings, *, direct_go: bool = True) -> web.Application:
    # Long query strings (deep links) get our own 400 rather than aiohttp's bare one.
    app = web.Application(middlewares=[preflight, console_headers, errors], client_max_size=64 * 1024,
                          handler_args={"max_line_size": 16384, "max_field_size": 16384})
    app[keys.SETTINGS] = settings
    internals.check(metrics.REDIRECT_SECONDS)  # the private internals used below are still there
    answer_protocol_errors_as_json()
    metrics.prime()
    app[keys.TOKENS] = UserTokens(settings.secret, settings.secret_previous, settings.secret_previous_until)
    app[keys.DETECTOR] = Detector(load_catalog())
    app[keys.CLOSING] = asyncio.Event()
    app[keys.STREAMS] = keys.OpenStreams()
    app[keys.HELD] = keys.HeldAnswers()
    app.on_startup.append(_freeze_startup_objects)  # after the cleanup contexts' start-up
    app.on_shutdown.append(_closing)
    app.cleanup_ctx.extend([_tally, _postgres, _reads, _merchants, _redis, _feed, _writer, _signals, _erasures, _sequencer,
                            _webhooks])
    app.router.add_get("/go/{merchant}", activation.activate, name="go")  # HEAD too: link previews
    app.router.add_get("/healthz", ops.healthz, name="healthz")  # HEAD too: some load balancers probe so
    app.router.add_get("/readyz", ops.readyz, name="readyz")
    app.router.add_get("/metrics", ops.metrics_view, name="metrics", allow_head=False)
    app.router.add_get("/openapi.json", ops.openapi, name="openapi", allow_head=False)
    app.router.add_get("/v1/clicks/{click_id}", support.click_view, name="click", allow_head=False)
    app.router.add_get("/v1/users/{user_id}/clicks", lookups.user_clicks, name="user_clicks", allow_head=False)
    app.router.add_delete("/v1/users/{user_id}", erasure.erase_user, name="erase_user")
    app.router.add_get("/v1/conversions", lookups.conversions, name="conversions", allow_head=False)
    app.router.add_get("/v1/postbacks/orphans", lookups.orphans, name="orphans", allow_head=False)
    app.router.add_post("/v1/postbacks/orphans/reconcile", lookups.reconcile_view, name="orphans_reconcile")
    setup_console(app)  # the support console at /support/
    setup_cors(app)  # TRACKER_CORS_ORIGINS on /v1/observe and the event stream, nowhere else
    app.router.add_get("/v1/events", event_feed.events_feed, name="events_feed", allow_head=False)
    app.router.add_get("/v1/audit", audit.audit_view, name="audit", allow_head=False)
    app.router.add_post("/v1/observe", observe.observe, name="observe")
    app.router.add_get("/v1/clicks/{click_id}/events", events.events, name="click_events", allow_head=False)
    app.router.add_get("/postback/{network}", postbacks.postback, name="postback", allow_head=False)
    app.router.add_post("/postback/{network}", postbacks.postback, name="postback_post")
    if direct_go:
        _route_go_directly(app)
    log.debug("app_created", pid=os.getpid())
    return app
