"""`tracker serve`: gunicorn's arbiter over aiohttp's uvloop worker.

The arbiter binds the port and forks the workers; it replaces a worker that dies, stops them
gracefully on SIGTERM or SIGINT (each stops accepting, finishes its requests, then commits or spools its
click queue), replaces them all gracefully on SIGHUP (new workers first), and adds or removes one on
SIGTTIN / SIGTTOU. A worker that cannot boot (PostgreSQL unreachable past its start-up wait, a setting
the app refuses) says why on stderr and in the JSON log and exits with gunicorn's boot-error status:
the arbiter then stops every worker and `tracker serve` exits non-zero, instead of starting it again
for ever. Every worker's Prometheus values are files in one directory of the arbiter's, so /metrics
on any worker shows the sum over all of them; a worker that exits is marked dead there (its live
gauges leave the sum, its counts stay).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.worker import GunicornUVLoopWebWorker
from gunicorn import glogging
from gunicorn import sock as gunicorn_sock
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.errors import HaltServer

from . import logs
from .settings import Settings

log = structlog.get_logger("tracker.serve")

# Seconds the arbiter gives a stopping worker before it kills it: requests (REQUEST_DRAIN), then the
# click queue's commit or spool (up to 10 s), with room; below the pod's grace period less its preStop.
GRACEFUL_TIMEOUT = 30
REQUEST_DRAIN = 10.0
# A worker that has not shown a sign of life for this long is killed and replaced (gunicorn's timeout;
# a booting worker beats every second, see Worker._beat).
HEARTBEAT_TIMEOUT = 30


def _warn_dev_secret(settings: Settings) -> None:
    if settings.secret_generated:
        logs.say("development_secret", f"warning: TRACKER_SECRET is not set; using the development secret in "
                 f"{settings.data_dir / 'secret'} (never do this in production)", level="warning")


def server_options(settings: Settings) -> dict[str, Any]:
    """aiohttp server settings: a connection that idles, or trickles a request head, for
    `idle_timeout` seconds is closed (aiohttp's keep-alive timer runs from the connection's start);
    after an answer given before the whole body arrived (413, 408) the rest is read for at most
    2 s, so that the client can read the answer, then the connection is closed."""
    return {"keepalive_timeout": float(settings.idle_timeout), "lingering_time": 2.0}


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM (a graceful stop) when the arbiter dies, so none is left orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def use_metrics_directory(path: Path) -> None:
    """Keep this process's Prometheus values, and those of the processes it forks, as files in `path`.
    prometheus_client chooses where values live when it is imported, and a metric when it is defined:
    both are redone here for whatever was imported before (the embedded servers' start imports it)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    if "tracker.metrics" in sys.modules:
        from . import metrics

        metrics.use_value_class()
        # Redefining made this process's own files, zeros; this process serves nothing, and its
        # live gauges would count (a 0 in tracker_spool_ok's minimum): only the workers' files stay.
        for own in path.glob(f"*_{os.getpid()}.db"):
            own.unlink()


def metrics_base() -> Path:
    """Where the metrics files live: in memory where there is /dev/shm, else the temporary directory
    (the pod's /tmp), never on the data directory's volume. prometheus_client memory-maps them, and a
    worker that touches a new page of a mapped file on a full disk dies of SIGBUS: with the spool's
    volume full, every worker died on its next metric, and its replacement too."""
    return Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())


def metrics_directory(arbiter: int) -> Path:
    """The metrics files' directory of the `tracker serve` whose arbiter is this pid."""
    return metrics_base() / f"tracker-metrics-{arbiter}"


def _metrics_directory(settings: Settings) -> Path:
    """A fresh directory for this arbiter's metrics files; those of arbiters that are gone (killed
    without their clean-up) are removed, and those an older version kept in the data directory."""
    for old in [*metrics_base().glob("tracker-metrics-*"), *settings.data_dir.glob("prometheus-*")]:
        try:
            os.kill(int(old.name.rsplit("-", 1)[1]), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            pass
    path = metrics_directory(os.getpid())
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _served_marker() -> Path:
    """A file in the server's metrics directory (PROMETHEUS_MULTIPROC_DIR, set by serve before the
    workers fork; prometheus_client reads only its *.db files) that the first worker to start makes:
    from then on the server has served, and a worker that starts is a replacement."""
    return Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]) / "served"


class Worker(GunicornUVLoopWebWorker):
    """aiohttp's uvloop worker that tells a boot failure from a crash itself: it is booted once the
    app's start-up has run (every cleanup context: PostgreSQL, Redis, the writer...), and until then
    it beats the arbiter's heartbeat every second (the start-up may wait for PostgreSQL) and a failure
    is reported, with its reason, as gunicorn's boot error, which stops the arbiter."""

    sockets: list[Any]  # gunicorn's listening socket wrappers (untyped)

    def init_process(self) -> None:
        global _worker
        _worker = self
        _die_with_parent()
        # gunicorn (reuse_port) bound this worker's sockets at the fork: while the app starts, the
        # kernel would queue there a share of new connections, unanswered for seconds (or reset, if
        # it cannot start). The worker listens once its app has started instead (started()).
        for listener in self.sockets:
            listener.close()
        self.sockets = []
        super().init_process()

    def run(self) -> None:
        from .store import db

        self.booted = False
        if not self.alive:  # stopped before its app began to start
            sys.exit(0)
        # Once the server has served, a worker that starts (replacing one that was killed, SIGHUP's,
        # or one still starting when another had started) waits for PostgreSQL without end, while
        # the others serve, instead of stopping the server.
        db.patient = _served_marker().exists
        beat = self.loop.create_task(self._beat())
        self._task = self.loop.create_task(self._run())
        try:
            self.loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            if self.booted or self.alive:
                raise
            # Told to stop while its app was still starting (waiting for PostgreSQL, say): it has
            # listened to nothing and holds no click, so it simply stops; a stop is not a failed boot.
            self._stop_tasks()
            log.info("worker_stopped_while_starting", pid=os.getpid())
            self.exit_code = 0
        except Exception as exc:
            if self.booted:
                raise
            self._stop_tasks()  # what the start-up began before it failed (no cleanup runs for it)
            self._boot_failed(exc)
        finally:
            beat.cancel()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
        sys.exit(self.exit_code)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._stop_starting()

    def handle_quit(self, sig: int, frame: Any) -> None:
        super().handle_quit(sig, frame)
        self._stop_starting()

    def _stop_starting(self) -> None:
        """A stop asked while the app starts ends the start-up at once, instead of letting it wait
        out PostgreSQL and then report a failed boot that would stop the arbiter with an error."""
        task = getattr(self, "_task", None)
        if not getattr(self, "booted", True) and task is not None and not task.done():
            task.cancel()

    def _stop_tasks(self) -> None:
        """Every task of the loop cancelled and waited for, cancelled again while it runs (for at most
        10 s): one cancellation is not enough on Python 3.11, whose wait_for can swallow one that
        lands as its inner call completes (store/tasks.cancel_and_wait). Waiting on a single
        cancellation, a worker stopped by SIGHUP's replacement while it started hung for good (found
        still there 40 minutes after its arbiter was gone)."""
        from .store.tasks import cancel_and_wait

        self.loop.run_until_complete(cancel_and_wait(asyncio.all_tasks(self.loop), timeout=10.0))

    def started(self) -> None:
        """The app's start-up ran (its last on_startup handler): listen, and count as booted."""
        from .store.db import StartFailed

        try:
            self.sockets = gunicorn_sock.create_sockets(self.cfg, self.log)
        except SystemExit:  # gunicorn's way of saying it could not bind, after 5 tries
            raise StartFailed(f"cannot listen on {', '.join(map(str, self.cfg.address))}") from None
        self.booted = True
        with contextlib.suppress(OSError):  # in memory (/dev/shm): a full data volume does not matter
            _served_marker().touch()

    async def _beat(self) -> None:
        while not self.booted:
            self.notify()
            await asyncio.sleep(1.0)

    def _boot_failed(self, exc: BaseException) -> None:
        from .store.db import StartFailed

        # StartFailed says all; anything else is a bug or a setting the app refused: its traceback too.
        reason = str(exc) if isinstance(exc, StartFailed) else f"{type(exc).__name__}: {exc}"
        logs.say("worker_boot_failed", f"worker {os.getpid()} could not start: {reason}", pid=os.getpid(),
                 reason=reason)
        log.error("worker_boot_failed", pid=os.getpid(), reason=reason,
                  exc_info=None if isinstance(exc, StartFailed) else exc)
        sys.exit(Arbiter.WORKER_BOOT_ERROR)


class GunicornLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's own lines (its error log; its access log is off) go the way of the project's log
    (logs.configure): JSON lines on stdout with TRACKER_LOG_FORMAT=json, readable lines with
    `console`, the logger named `gunicorn.error`. The arbiter's "Listening at" names the address the
    workers listen on: each binds its own socket (reuse_port), so the arbiter has none to name."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for own in (self.error_log, self.access_log):
            for handler in list(own.handlers):
                own.removeHandler(handler)
            own.propagate = True  # to the root logger's handler: logs.configure's

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if msg.startswith("Listening at:") and args and not args[0]:
            urls = ",".join(f"http://{_bind(address[0], address[1])}" if isinstance(address, tuple) else str(address)
                            for address in self.cfg.address)
            args = (urls, *args[1:])
        super().info(msg, *args, **kwargs)


def _child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Service(BaseApplication):  # type: ignore[misc]
    """tracker as a gunicorn application: its settings are the config, its app is made in each worker."""

    def __init__(self, settings: Settings, host: str, port: int, workers: int) -> None:
        self.settings, self.host, self.port, self.workers = settings, host, port, workers
        super().__init__()

    def load_config(self) -> None:
        options: dict[str, Any] = {
            "bind": [_bind(self.host, self.port)],
            # Each worker listens on a socket of its own (SO_REUSEPORT), so the kernel spreads new
            # connections evenly over them. On one socket shared by all, one worker took them all:
            # 64 keep-alive connections of wrk, 64 on one worker, none on the other (docs/performance.md).
            "reuse_port": True,
            "workers": self.workers,
            "worker_class": Worker,
            "graceful_timeout": GRACEFUL_TIMEOUT,
            "timeout": HEARTBEAT_TIMEOUT,
            # The heartbeat files (one empty file per worker, its mtime the beat): in memory where there
            # is /dev/shm, else the temporary directory (the pod's /tmp), never on the spool's volume,
            # which may be the full disk.
            "worker_tmp_dir": "/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
            "logger_class": GunicornLogger,
            "errorlog": "-",
            "accesslog": None,
            "loglevel": "info",
            "proc_name": "tracker",
            "child_exit": _child_exit,
            "preload_app": False,  # each worker imports and makes the app after the fork
        }
        if "control_socket_disable" in self.cfg.settings:
            options["control_socket_disable"] = True  # no socket under $HOME (read-only in the image)
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        settings = self.settings

        async def runner() -> web.AppRunner:
            from .app import create_app

            worker = _current_worker()
            logs.configure(settings.log_format)
            app = create_app(settings)

            async def started(_: web.Application) -> None:
                if worker is not None:
                    worker.started()

            app.on_startup.append(started)  # the last: after every cleanup context's start-up
            return web.AppRunner(app, access_log=None, shutdown_timeout=REQUEST_DRAIN, **server_options(settings))

        return runner


_worker: Worker | None = None  # this process's, in a worker


def _current_worker() -> Worker | None:
    return _worker


def _listen_problem(host: str, port: int) -> str | None:
    """Why the workers could not listen on host:port (in use by a program that does not share it, an
    address this machine does not have), or None. Each worker binds its own socket; a worker that
    cannot would only be started again and again."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, port), family=family, reuse_port=True):
            return None
    except OSError as exc:
        return f"cannot listen on {_bind(host, port)}: {exc.strerror or exc}"


def serve(settings: Settings, host: str, port: int, workers: int) -> int:
    logs.configure(settings.log_format)
    logging.captureWarnings(True)  # a library's warning is a log line too, not plain text on stderr
    problem = _listen_problem(host, port)
    if problem:
        logs.say("cannot_listen", problem)
        return 1
    _warn_dev_secret(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    prom_dir = _metrics_directory(settings)
    use_metrics_directory(prom_dir)
    # The workers' own count, whatever TRACKER_WORKERS says: the rate limits' W starts from it.
    service = Service(dataclasses.replace(settings, workers=workers), host, port, workers)
    logs.say("serving", f"serving on http://{_bind(host, port)} with {workers} workers", level="info",
             url=f"http://{_bind(host, port)}", workers=workers)
    arbiter = os.getpid()
    try:
        service.run()
        code = 0
    except SystemExit as exc:
        if os.getpid() != arbiter:
            raise  # a worker's own exit, unwinding through the fork: not the arbiter's to clean up
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except HaltServer as exc:
        # gunicorn halting for a boot failure can meet a second one while it stops the other workers,
        # and let it out; the workers left get SIGTERM when this process ends (_die_with_parent).
        code = exc.exit_status
    shutil.rmtree(prom_dir, ignore_errors=True)
    if code:
        reason = ("a worker could not start (its reason is above)" if code == Arbiter.WORKER_BOOT_ERROR
                  else "see the lines above")
        logs.say("serve_stopped", f"serve stopped with exit status {code}: {reason}", exit_status=code,
                 reason=reason)
        log.error("serve_stopped", exit_status=code, reason=reason)
    return code
