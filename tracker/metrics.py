"""Prometheus metrics, one definition for every worker process.

`tracker serve` keeps every worker's values in files of one directory (PROMETHEUS_MULTIPROC_DIR, set in
the arbiter before it forks: serve.use_metrics_directory), and /metrics merges them, so it shows the
sum over all workers. Whatever was imported first: metrics defined before the directory was set are
moved to it (use_value_class).
"""
from __future__ import annotations

import os
from bisect import bisect_left
from typing import Any, Callable, Iterable, cast

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from . import internals

_LATENCY = (.0005, .001, .0025, .005, .0075, .01, .015, .02, .03, .05, .1, .25, .5, 1, 2.5)

CLICKS = Counter("tracker_clicks_total", "Activation clicks redirected", ["merchant", "source", "bot"])
REDIRECT_SECONDS = Histogram("tracker_redirect_duration_seconds",
                             "Time to answer an activation redirect", buckets=_LATENCY)
HTTP_REQUESTS = Counter("tracker_http_requests_total", "HTTP requests answered", ["route", "status"])
HTTP_SECONDS = Histogram("tracker_http_request_duration_seconds", "HTTP request latency by route",
                         ["route"], buckets=_LATENCY)
REFUSALS = Counter("tracker_refusals_total", "Requests refused, by route and error code",
                   ["route", "code"])
# Every worker counts the whole spool directory (every worker's segments), and /metrics counts it again
# before it answers: the most recent count is the one shown.
SPOOL_PENDING = Gauge("tracker_spool_pending_clicks", "Clicks in the local spool waiting for PostgreSQL",
                      multiprocess_mode="livemostrecent")
SPOOL_OK = Gauge("tracker_spool_ok", "1 while the local spool takes clicks (0: full or failing)",
                 multiprocess_mode="livemin")
SPOOLED = Counter("tracker_spooled_clicks_total", "Clicks appended to the local spool")
REPLAYED = Counter("tracker_replayed_clicks_total", "Spooled clicks replayed into PostgreSQL")
QUARANTINED = Counter("tracker_quarantined_clicks_total", "Clicks PostgreSQL refused, kept with the reason")
QUARANTINED_SIGNALS = Counter("tracker_quarantined_signals_total",
                              "Signals and click states PostgreSQL refused, kept with the reason")
# Signals lost without a row anywhere: the queue was full while PostgreSQL was away (queue_full), even
# the quarantine refused one (unstorable), or a stop could not flush them (stop).
SIGNALS_DROPPED = Counter("tracker_signals_dropped_total", "Signals and click states lost before PostgreSQL",
                          ["reason"])
WRITER_BATCH = Histogram("tracker_writer_batch_size", "Clicks per committed batch",
                         buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000))
WRITER_FLUSH_SECONDS = Histogram("tracker_writer_flush_seconds", "Time to COPY and commit one batch",
                                 buckets=_LATENCY)
WRITER_QUEUE = Gauge("tracker_writer_queue_clicks", "Clicks waiting in the in-process queue",
                     multiprocess_mode="livesum")
DEPENDENCY_UP = Gauge("tracker_dependency_up", "1 while PostgreSQL / Redis answer this worker",
                      ["dependency"], multiprocess_mode="livemin")
READINESS = Gauge("tracker_readiness", "1 for the status this worker's last /readyz answered (ready, degraded, "
                  "unavailable)", ["status"], multiprocess_mode="livemax")
TASK_RESTARTS = Counter("tracker_task_restarts_total",
                        "Background tasks that died (logged with the traceback) and were started again", ["task"])
REDIS_FAIL_OPEN = Counter("tracker_redis_fail_open_total",
                          "Operations that went on without Redis (rate limit, session)", ["operation"])
RATE_LIMITED = Counter("tracker_rate_limited_total", "Requests refused by a rate limit", ["scope"])
POSTBACKS = Counter("tracker_postbacks_total", "Postbacks by network and outcome", ["network", "outcome"])
CONVERSIONS = Counter("tracker_conversions_total", "Conversion status changes", ["merchant", "status"])
SIGNALS = Counter("tracker_signals_total", "Overwrite and risk signals", ["merchant", "kind", "network"])
# New signals not kept because their click already holds its 100: by design, not a loss to alert on.
SIGNALS_OVER_CAP = Counter("tracker_signals_over_cap_total", "New signals refused: their click holds 100 already")
OBSERVE_EVENTS = Counter("tracker_observe_events_total", "Events reported by the extension", ["type"])
SSE_CLIENTS = Gauge("tracker_sse_clients", "Open live event streams", multiprocess_mode="livesum")
EVENTS = Counter("tracker_events_total", "Events written to the outbox", ["type"])
EVENTS_SEQUENCED = Counter("tracker_events_sequenced_total", "Events numbered into the feed by the sequencer")
WEBHOOK_DELIVERIES = Counter("tracker_webhook_deliveries_total",
                             "Webhook delivery attempts by outcome (delivered, retried, failed)",
                             ["webhook", "outcome"])
# Every worker measures it (a query every few seconds); the freshest live reading is the largest.
WEBHOOK_BACKLOG = Gauge("tracker_webhook_backlog_seconds", "Age of the oldest event not yet delivered",
                        ["webhook"], multiprocess_mode="livemax")


class Children:
    """Labelled children cached by label values: `labels()` costs a lock and a tuple build per call,
    which adds up on the redirect path."""

    __slots__ = ("_metric", "_cache")

    def __init__(self, metric: Counter | Histogram | Gauge) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], object] = {}

    def __call__(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child

    def clear(self) -> None:
        self._cache.clear()


class Tally:
    """This process's counts for the hottest metrics, added to the Prometheus values in bulk.

    In multiprocess mode every `inc()` is a locked write to a memory-mapped file with a pid check;
    three of them per redirect cost 17 % of a worker's throughput (measured with wrk: 14,262 against
    17,079 redirects/s with them stubbed out). The redirect path adds to plain dicts here instead, and
    `flush()` (every second, at shutdown, and in every worker before each /metrics: tally_peers.py)
    moves the totals into the metrics.
    Used from the event loop's thread only.
    """

    def __init__(self, histogram: Histogram) -> None:
        self.counts: dict[Any, int] = {}
        self._histogram = histogram
        self._bounds = internals.histogram_bounds(histogram)  # same buckets, same order
        self._bucket_counts = [0] * len(self._bounds)
        self._sum = 0.0

    def count(self, child: Any) -> None:
        self.counts[child] = self.counts.get(child, 0) + 1

    def observe(self, seconds: float) -> None:
        self._sum += seconds
        self._bucket_counts[bisect_left(self._bounds, seconds)] += 1

    def reset(self) -> None:
        """Forget what was tallied (the children counted may be gone: use_value_class)."""
        self.counts = {}
        self._bucket_counts = [0] * len(self._bounds)
        self._sum = 0.0

    def flush(self) -> None:
        counts, self.counts = self.counts, {}
        for child, n in counts.items():
            child.inc(n)
        if self._sum or any(self._bucket_counts):
            buckets, self._bucket_counts = self._bucket_counts, [0] * len(self._bounds)
            total, self._sum = self._sum, 0.0
            internals.histogram_add(self._histogram, total, buckets)


DEFINED: tuple[Counter | Gauge | Histogram, ...] = tuple(
    value for value in tuple(globals().values()) if isinstance(value, (Counter, Gauge, Histogram)))
tally = Tally(REDIRECT_SECONDS)
clicks = Children(CLICKS)
http_requests = Children(HTTP_REQUESTS)
http_seconds = Children(HTTP_SECONDS)
signals = Children(SIGNALS)
postbacks = Children(POSTBACKS)
conversions = Children(CONVERSIONS)
events = Children(EVENTS)


def prime() -> None:
    """Create the children whose label values are known up front, so that dashboards and alerts
    see a 0 rather than no series until the first event."""
    for operation in ("rate_limit", "session", "state", "key_guard"):
        REDIS_FAIL_OPEN.labels(operation)
    for scope in ("ip", "user", "admin_key"):
        RATE_LIMITED.labels(scope)
    for reason in ("queue_full", "unstorable", "stop"):
        SIGNALS_DROPPED.labels(reason)
    for status in ("ready", "degraded", "unavailable"):  # all 0 until the first /readyz
        READINESS.labels(status)


def use_value_class() -> None:
    """Keep every metric's values in prometheus_client's value class of now (its files once
    PROMETHEUS_MULTIPROC_DIR is set), also those defined before it was: nothing counted so far is kept."""
    for metric in DEFINED:
        internals.reset_values(metric)
    for children in (clicks, http_requests, http_seconds, signals, postbacks, conversions, events):
        children.clear()
    tally.reset()
    prime()


# What the merchants' series are primed with (see prime_merchants): the outcomes of a postback, the
# statuses of a conversion, the sources of a click.
POSTBACK_OUTCOMES = ("accepted", "duplicate", "orphan", "adjustment_refused", "malformed", "rejected_auth")
CONVERSION_STATUSES = ("pending", "approved", "declined", "reversed")
SOURCES = ("web", "app", "ext")


def prime_merchants(merchants: Iterable[str], networks: Iterable[str]) -> None:
    """A 0 for each merchant's human clicks, conversions and foreign promo codes, and each network's
    postbacks by outcome, so that every metric the contract names is exported from the start (a pod
    just restarted shows 0, not nothing, to a rate() or an alert's increase()). A few series per
    merchant: bot clicks and signals by network appear with their first event."""
    for slug in merchants:
        for source in SOURCES:
            clicks(slug, source, "false")
        for status in CONVERSION_STATUSES:
            conversions(slug, status)
        signals(slug, "foreign_promo_code", "none")
    for name in networks:
        for outcome in POSTBACK_OUTCOMES:
            postbacks(name, outcome)


def render() -> bytes:
    """The exposition text. Call `tally.flush()` first, on the event loop's thread: the tally is not
    thread-safe, and this runs in a worker thread."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        # prometheus-client leaves MultiProcessCollector's constructor unannotated: its type, as the
        # library defines it (it registers itself with the registry).
        collector = cast(Callable[[CollectorRegistry], object], multiprocess.MultiProcessCollector)
        collector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
