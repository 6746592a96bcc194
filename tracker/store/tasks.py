"""Stopping background tasks reliably."""
from __future__ import annotations

import asyncio
from typing import Iterable


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
