"""A background task that dies is never a silent stop: its death is logged with the traceback and
counted, and it runs again after a backoff; cancelling it stops it for good."""
from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tracker.store.tasks import Supervised, cancel_and_wait

from .waiting import until


def restarts(task: str) -> float:
    return REGISTRY.get_sample_value("tracker_task_restarts_total", {"task": task}) or 0.0


async def test_a_task_that_dies_is_logged_with_its_traceback_and_started_again() -> None:
    runs: list[int] = []
    working = asyncio.Event()

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) <= 2:
            raise OSError(f"the disk went away (run {len(runs)})")
        working.set()
        await asyncio.Event().wait()  # a loop that runs until cancelled

    with capture_logs() as logs:
        task = Supervised("test-dying-loop", loop)
        await asyncio.wait_for(working.wait(), 10)
        assert task.running and task.deaths == 2
        await cancel_and_wait([task.task])
    assert task.task.cancelled()
    deaths = [e for e in logs if e["event"] == "task_died"]
    assert [e["task"] for e in deaths] == ["test-dying-loop"] * 2
    assert all(e["log_level"] == "error" and e["exc_info"] for e in deaths)
    assert [e["deaths"] for e in logs if e["event"] == "task_restarted"] == [1, 2]
    assert restarts("test-dying-loop") == 2


async def test_a_loop_that_returns_is_reported_and_started_again() -> None:
    runs = 0

    async def returns_once() -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            await asyncio.Event().wait()

    with capture_logs() as logs:
        task = Supervised("test-returning-loop", returns_once)
        await until(lambda: runs == 2, "the loop started again")
        await cancel_and_wait([task.task])
    assert [e["event"] for e in logs if e.get("task") == "test-returning-loop"] == ["task_stopped", "task_restarted"]
