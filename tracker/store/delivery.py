"""The webhook dispatcher of one worker: a loop per subscriber that leases due deliveries, POSTs them
signed (Standard Webhooks) and records the outcome.

It stays off everything else's path: its own PostgreSQL pool (two connections) and its own HTTP
client, and at most `concurrency` requests in flight per subscriber, so a subscriber that hangs ties
up only its own slots (each for at most `timeout`), never the postback or redirect paths, nor the
other subscribers. Redirects are not followed: a 3xx is a failed attempt like any non-2xx.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import structlog

from .. import metrics
from ..domain.backoff import Backoff
from ..domain.events import encode_cursor, envelope
from ..domain.webhooks import RETRY_FOR, Webhook, public_url, retry_delay, sign, signing_key
from . import webhooks as queries
from .db import connect_options, json_codecs
from .tasks import Outage, cancel_and_wait, supervised

log = structlog.get_logger("tracker.webhooks")
OUTCOMES = ("delivered", "retried", "failed")
USER_AGENT = "tracker-webhooks/1"


@dataclass(frozen=True, slots=True)
class DeliveryOptions:
    concurrency: int = 8  # requests in flight per subscriber per worker
    timeout: float = 10.0
    lease: float = 60.0  # a leased delivery is taken again after this long (must exceed timeout)
    retry_base: float = 5.0  # seconds before the first retry, doubling up to an hour
    retry_for: float = RETRY_FOR
    poll: float = 0.5  # how often an idle subscriber looks for due work
    pooler: str | None = None  # TRACKER_DATABASE_POOLER (store/db.py: connect_options)
    refresh: float = 5.0  # how often the subscriber list and the backlog gauge are refreshed


class Dispatcher:
    def __init__(self, dsn: str, options: DeliveryOptions = DeliveryOptions()) -> None:
        self.dsn, self.options = dsn, options
        self.webhooks: dict[str, Webhook] = {}
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._inflight: dict[str, dict[asyncio.Task[None], tuple[int, int]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._pool: asyncpg.Pool | None = None
        self._http: aiohttp.ClientSession | None = None
        self._stopping = False
        self._outage = Outage(log, "webhook_dispatcher_db_unavailable", "webhook_dispatcher_reconnected")

    async def start(self) -> None:
        # min_size=0: no connection at start. The worker's start has already waited for PostgreSQL
        # (its main pool); if PostgreSQL goes away right after, the dispatcher's loop rides the outage
        # out like every other background task, where a connection made here would fail the worker's
        # start and, with it, the whole server (gunicorn stops on a worker that cannot boot).
        self._pool = await asyncpg.create_pool(self.dsn, min_size=0, max_size=2, command_timeout=30, timeout=5,
                                               init=json_codecs,
                                               server_settings={"application_name": "tracker-webhooks"},
                                               **connect_options(self.options.pooler))
        # No connection limit here: each subscriber's own limit bounds it. No cookies, no redirects.
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
            timeout=aiohttp.ClientTimeout(total=self.options.timeout), cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": USER_AGENT}, auto_decompress=False)
        self._task = supervised("webhook-dispatcher", self._run)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop leasing; let sends in flight finish for `grace` seconds, then cancel them and give
        their leases back so that another worker sends them at once."""
        self._stopping = True
        await cancel_and_wait([self._task, *self._loops.values()])
        leases = {name: dict(tasks) for name, tasks in self._inflight.items()}  # sends finish on their own
        inflight = [t for tasks in leases.values() for t in tasks]
        if inflight:
            await asyncio.wait(inflight, timeout=grace)
        await cancel_and_wait(inflight)
        for name, tasks in leases.items():
            cut = [lease for task, lease in tasks.items() if task.cancelled()]
            if cut and self._pool is not None:
                try:
                    await asyncio.wait_for(queries.release(self._pool, name, cut), 2)
                except Exception as exc:  # noqa: BLE001 - the leases then just run out
                    log.warning("webhook_leases_not_released", webhook=name, error=repr(exc)[:200])
        if self._http is not None:
            await self._http.close()
        if self._pool is not None:
            await self._pool.close()

    async def refresh(self) -> None:
        """Reload the subscribers, start a loop for each new one, set the backlog gauges."""
        assert self._pool is not None
        self.webhooks = await queries.load(self._pool)
        for name in self.webhooks:
            _report_death(f"webhook-{name}", self._loops.get(name))
            if name not in self._loops or self._loops[name].done():
                for outcome in OUTCOMES:  # a 0 to rate() from, before the first delivery
                    metrics.WEBHOOK_DELIVERIES.labels(name, outcome)
                self._loops[name] = asyncio.create_task(self._serve(name), name=f"webhook-{name}")
        for name in list(self.webhooks) + [n for n in self._loops if n not in self.webhooks]:
            oldest = await queries.oldest_pending(self._pool, name) if name in self.webhooks else None
            age = 0.0 if oldest is None else max(0.0, time.time() - oldest.timestamp())
            metrics.WEBHOOK_BACKLOG.labels(name).set(age)

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
                self._outage.ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - PostgreSQL away: keep the loops, try again
                self._outage.failed(exc)
            await asyncio.sleep(self.options.refresh)

    async def _serve(self, name: str) -> None:
        """One subscriber: keep up to `concurrency` sends in flight while work is due."""
        opts = self.options
        inflight = self._inflight.setdefault(name, {})
        retry = Backoff(first=1.0, cap=5.0)
        assert self._pool is not None
        while name in self.webhooks and not self._stopping:
            free = opts.concurrency - len(inflight)
            claimed: list[queries.Claimed] = []
            # Lease in bunches (half the slots at least) rather than one row per finished send.
            if free > 0 and (not inflight or free * 2 >= opts.concurrency):
                try:
                    claimed = await queries.claim(self._pool, name, free, opts.lease)
                    retry.reset()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - PostgreSQL away: the refresh loop says so
                    log.debug("webhook_claim_failed", webhook=name, error=repr(exc)[:200])
                    await asyncio.sleep(retry.next())
                    continue
                for row in claimed:
                    task = asyncio.create_task(self._deliver(name, row))
                    inflight[task] = (row["event_id"], row["attempts"])
                    task.add_done_callback(inflight.pop)
            if inflight and (len(claimed) < free or len(inflight) >= opts.concurrency):
                await asyncio.wait(list(inflight), timeout=opts.poll, return_when=asyncio.FIRST_COMPLETED)
            elif not claimed:
                await asyncio.sleep(opts.poll)

    async def _deliver(self, name: str, row: queries.Claimed) -> None:
        try:
            await self._deliver_one(name, row)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one send's failure must not go unseen, nor stop the others
            log.exception("webhook_delivery_error", webhook=name, event_id=row["public_id"])

    async def _deliver_one(self, name: str, row: queries.Claimed) -> None:
        assert self._http is not None and self._pool is not None
        webhook = self.webhooks.get(name)
        if webhook is None:  # removed meanwhile: give it back for when it returns
            await queries.release(self._pool, name, [(row["event_id"], row["attempts"])])
            return
        body = orjson.dumps(envelope(row["public_id"], row["type"], row["created_at"],
                                     encode_cursor(row["seq"]), row["data"]))
        status, error = await self._post(webhook, row["public_id"], body)
        try:
            if status is not None and 200 <= status < 300:
                await queries.delivered(self._pool, name, row["event_id"], status)
                metrics.WEBHOOK_DELIVERIES.labels(name, "delivered").inc()
                return
            delay = retry_delay(row["attempts"], self.options.retry_base)
            state = await queries.failed(self._pool, name, row["event_id"], row["attempts"], status, error,
                                         status == 410, self.options.retry_for, delay)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            # The outcome is lost; the lease runs out and the event is sent again (at least once).
            log.warning("webhook_outcome_not_recorded", webhook=name, event_id=row["public_id"],
                        error=repr(exc)[:200])
            return
        if state is None:
            return  # the lease had passed to another worker, which owns the schedule now
        outcome = "failed" if state == "failed" else "retried"
        metrics.WEBHOOK_DELIVERIES.labels(name, outcome).inc()
        (log.warning if outcome == "failed" else log.info)(
            "webhook_delivery_failed" if outcome == "failed" else "webhook_delivery_retry", webhook=name,
            url=public_url(webhook.url), event_id=row["public_id"], attempt=row["attempts"], status=status,
            error=error, retry_in_s=None if outcome == "failed" else round(delay, 1))

    async def _post(self, webhook: Webhook, webhook_id: str, body: bytes) -> tuple[int | None, str | None]:
        assert self._http is not None
        timestamp = int(time.time())
        headers = {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(signing_key(webhook.secret), webhook_id, timestamp, body),
                   "Content-Type": "application/json"}
        try:
            async with self._http.post(webhook.url, data=body, headers=headers, allow_redirects=False) as resp:
                await resp.content.read(65536)  # some of the answer, so the connection can be reused
                return resp.status, None if resp.status < 300 else f"HTTP {resp.status}"
        except TimeoutError:
            return None, f"timeout after {self.options.timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def options_from(settings: Any) -> DeliveryOptions:
    return DeliveryOptions(concurrency=settings.webhook_concurrency, timeout=float(settings.webhook_timeout),
                           lease=float(settings.webhook_lease), retry_base=settings.webhook_retry_base_ms / 1000,
                           poll=settings.webhook_poll_ms / 1000, pooler=settings.database_pooler)


def _report_death(name: str, task: asyncio.Task[None] | None) -> None:
    """A subscriber's loop that died is started again by the refresh; its death is said first."""
    if task is not None and task.done() and not task.cancelled() and (exc := task.exception()) is not None:
        log.error("task_died", task=name, exc_info=exc)
        metrics.TASK_RESTARTS.labels(name).inc()
