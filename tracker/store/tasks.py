"""Background tasks: stopping them reliably, and logging their dependency's outages once."""
from __future__ import annotations

import asyncio
from typing import Any, Iterable


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
