"""Background tasks: kept running, stopped reliably, their dependency's outages logged once."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterable

import structlog

from .. import metrics
from ..domain.backoff import Backoff

log = structlog.get_logger("tracker.tasks")
STEADY = 60.0  # seconds a task must have run for its next death to start the backoff afresh


class Supervised:
    """A long-running loop (a flusher, the replayer, a feed, a delivery loop) that is never stopped in
    silence: when it dies (raises, or returns, which a loop should not) its death is logged with the
    traceback and counted (`tracker_task_restarts_total{task}`), and it is started again after a
    jittered backoff (0.1 s doubling up to 10 s; afresh once it ran for a minute). Cancelling `task`
    stops it. `running` is False while it waits to be started again (readiness reads it)."""

    __slots__ = ("name", "task", "running", "deaths", "_run")

    def __init__(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self.name, self._run = name, run
        self.running = True
        self.deaths = 0
        metrics.TASK_RESTARTS.labels(name)
        self.task: asyncio.Task[None] = asyncio.create_task(self._keep(), name=name)

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(first=0.1, cap=10.0)
        while True:
            self.running = True
            started = loop.time()
            try:
                await self._run()
                log.error("task_stopped", task=self.name)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the one place a background task's death is reported
                log.exception("task_died", task=self.name)
            self.running = False
            self.deaths += 1
            metrics.TASK_RESTARTS.labels(self.name).inc()
            if loop.time() - started > STEADY:
                backoff.reset()
            await asyncio.sleep(backoff.next())
            log.info("task_restarted", task=self.name, deaths=self.deaths)


def supervised(name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """Start `run()` as a Supervised task; the task to cancel when stopping."""
    return Supervised(name, run).task


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | None], timeout: float = 5.0) -> None:
    """Cancel tasks and wait for them, cancelling again while they run: on Python 3.11 `wait_for`
    can swallow a cancellation that lands as its inner call completes (fixed in 3.12), and a loop
    around such a call would then never stop."""
    pending = {t for t in tasks if t is not None and not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


class Outage:
    """Whether a background loop's dependency (PostgreSQL) is failing it, logged on a change only:
    one warning when its attempts start failing, one info line when one works again."""

    __slots__ = ("_log", "_failed", "_recovered", "down")

    def __init__(self, log: Any, failed: str, recovered: str) -> None:
        self._log, self._failed, self._recovered = log, failed, recovered
        self.down = False

    def ok(self) -> None:
        if self.down:
            self._log.info(self._recovered)
        self.down = False

    def failed(self, exc: BaseException) -> None:
        if not self.down:
            self._log.warning(self._failed, error=repr(exc)[:200])
        self.down = True
