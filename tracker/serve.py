"""`tracker serve`: one process per worker on one port (SO_REUSEPORT), supervised.

The parent forks the workers, forwards SIGTERM/SIGINT to them, replaces a worker that dies, and keeps
the Prometheus multiprocess directory so that /metrics on any worker shows the sum over all of them.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from typing import Any, Callable, cast

from .settings import Settings


def _warn_dev_secret(settings: Settings) -> None:
    if settings.secret_generated:
        print(f"tracker: warning: TRACKER_SECRET is not set; using the development secret in "
              f"{settings.data_dir / 'secret'} (never do this in production)", file=sys.stderr)


def _serve_worker(settings: Settings, host: str, port: int) -> None:
    import uvloop
    from aiohttp import web

    from . import logs
    from .app import create_app

    logs.configure(settings.log_format)
    uvloop.install()
    app = create_app(settings)
    web.run_app(app, host=host, port=port, reuse_port=True, access_log=None, print=None,
                shutdown_timeout=10.0, **server_options(settings))


def server_options(settings: Settings) -> dict[str, Any]:
    """aiohttp server settings: a connection that idles, or trickles a request head, for
    `idle_timeout` seconds is closed (aiohttp's keep-alive timer runs from the connection's start);
    after an answer given before the whole body arrived (413, 408) the rest is read for at most
    2 s, so that the client can read the answer, then the connection is closed."""
    return {"keepalive_timeout": float(settings.idle_timeout), "lingering_time": 2.0}


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM when the supervising process dies, so none is left orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(settings: Settings, host: str, port: int, workers: int) -> int:
    _warn_dev_secret(settings)
    if workers == 1:
        _serve_worker(settings, host, port)
        return 0
    # Several processes on one port (SO_REUSEPORT); metrics are shared through files so that
    # /metrics on any worker shows the sum over all of them.
    prom_dir = settings.data_dir / f"prometheus-{os.getpid()}"
    shutil.rmtree(prom_dir, ignore_errors=True)
    prom_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)
    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                _serve_worker(settings, host, port)
            finally:
                os._exit(0)
        children[pid] = slot

    def stop(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(workers):
        spawn(slot)
    print(f"tracker: serving on http://{host}:{port} with {workers} workers", file=sys.stderr)
    from prometheus_client import multiprocess

    # prometheus-client leaves mark_process_dead unannotated: its type, as the library defines it.
    mark_process_dead = cast(Callable[[int], None], multiprocess.mark_process_dead)

    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        freed = children.pop(pid, None)
        mark_process_dead(pid)
        if freed is not None and not stopping:
            # A worker died: replace it. Its unanswered commit-mode clicks were never redirected;
            # its spool segment is replayed by the next worker that finds it.
            print(f"tracker: worker {pid} exited ({status}); starting another", file=sys.stderr)
            time.sleep(0.5)
            spawn(freed)
    shutil.rmtree(prom_dir, ignore_errors=True)
    return 0
