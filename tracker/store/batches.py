"""The clicks a worker holds for PostgreSQL, in batches: the open batch requests append to, the sealed
(full) ones waiting for a flusher, and when a flusher may take which.

A batch is sealed at `batch_limit` rows. A flusher takes the oldest sealed batch, merged with the
ones behind it when the writer fell behind; otherwise the open batch, once the linger rule lets it go.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from .click import Click

Failure = Callable[[], BaseException]  # makes the exception each waiting request raises

# Rows in one COPY of sealed batches merged under a backlog (or batch_limit, if larger).
MERGE_LIMIT = 300

# Measured with benchmarks/ab.py (docs/performance.md): commit 1 -> 10 ms, 11 -> 14 rows per COPY, worker CPU per
# redirect 112 -> 97 us (6 alternating rounds); async 0 -> 10 ms, 65-109 -> 201-268 rows per COPY.
COMMIT_LINGER = 0.010
ASYNC_LINGER = 0.010


class Batch:
    __slots__ = ("rows", "waiters", "parts")

    def __init__(self) -> None:
        self.rows: list[Click] = []
        self.parts: list[Batch] = []  # the batches a merged batch stands for
        # One future per waiting request, not a shared one: a cancelled request cancels only its
        # own wait. (An asyncio.Event does the same with a deque and a loop check per wait.)
        self.waiters: list[asyncio.Future[None]] = []

    def release(self, failure: Failure | None = None) -> None:
        """The batch is committed or spooled (`failure` None), or could be neither: wake every
        request waiting on it (or on its parts), with the exception `failure` makes if so."""
        for batch in (self, *self.parts):
            for waiter in batch.waiters:
                if not waiter.done():
                    if failure is None:
                        waiter.set_result(None)
                    else:
                        waiter.set_exception(failure())
            batch.waiters.clear()


class Batches:
    """The queue between the requests and the flushers. ClickWriter.write appends to `open` and
    counts `queued` itself (the redirect's path: no call more per click); the flushers `take`."""

    __slots__ = ("wait_commit", "queue_limit", "batch_limit", "merge_limit", "linger", "open", "sealed",
                 "queued", "wake", "room", "closing", "in_flight", "running", "last_start", "_loop")

    def __init__(self, *, wait_commit: bool, queue_limit: int, batch_limit: int, merge_limit: int,
                 linger: float | None) -> None:
        self.wait_commit = wait_commit
        self.queue_limit, self.batch_limit = queue_limit, batch_limit
        self.merge_limit = max(batch_limit, merge_limit)
        # A batch that is not full starts its COPY only `linger` seconds after the previous COPY
        # started (or, in commit mode, at once when no COPY is running). Every COPY costs the same
        # two round trips and one commit whatever its size (~150 us of client CPU and ~250 us of the
        # server's for a dozen rows), so fewer, bigger COPYs leave more CPU to the redirects.
        self.linger = (COMMIT_LINGER if wait_commit else ASYNC_LINGER) if linger is None else linger
        self.open = Batch()
        self.sealed: list[Batch] = []
        self.queued = 0  # clicks appended and not yet committed or spooled
        self.wake = asyncio.Event()  # set when there is a batch to take
        self.room = asyncio.Event()  # set while queued is under queue_limit
        self.room.set()
        self.closing = False
        self.in_flight = 0  # COPYs running
        self.running: set[Batch] = set()  # the batches being written (for ClickWriter.settle)
        self.last_start = 0.0  # when the last COPY started (loop time)
        self._loop = asyncio.get_running_loop()

    def seal(self) -> None:
        self.sealed.append(self.open)
        self.open = Batch()

    def take(self) -> Batch | None:
        if self.sealed:
            batch = self.sealed.pop(0)
            if not self.sealed or self.merge_limit <= self.batch_limit:
                return batch
            # A backlog (the writer fell behind): one COPY for several sealed batches, up to
            # merge_limit rows, so that throughput grows with the backlog while batches stay small
            # (short loop stalls) when the writer keeps up.
            merged, parts = Batch(), [batch]
            merged.rows = list(batch.rows)
            while self.sealed and len(merged.rows) + len(self.sealed[0].rows) <= self.merge_limit:
                part = self.sealed.pop(0)
                parts.append(part)
                merged.rows.extend(part.rows)
            merged.parts = parts
            return merged
        if self.open.rows and self.may_start():
            batch = self.open
            self.open = Batch()
            return batch
        return None

    def may_start(self) -> bool:
        """Whether a batch that is not full may start its COPY now."""
        return ((self.wait_commit and self.in_flight == 0) or self.closing
                or self._loop.time() - self.last_start >= self.linger)

    def linger_left(self) -> float:
        """Seconds until the open batch may start its COPY."""
        return max(0.0, self.last_start + self.linger - self._loop.time())

    def done(self, batch: Batch, failure: Failure | None = None) -> None:
        """The batch is committed or spooled (or, with `failure`, refused): its rows leave the
        queue, its requests are answered."""
        self.queued -= len(batch.rows)
        if self.queued < self.queue_limit:
            self.room.set()
        batch.release(failure)

    def put_back(self, batch: Batch) -> None:
        """A batch taken but neither committed nor spooled goes back to the head of the queue (a
        merged one as its parts), still counted in `queued`, its requests still waiting."""
        self.sealed[:0] = batch.parts or [batch]
        self.wake.set()

    def empty(self) -> bool:
        return not (self.queued or self.sealed or self.open.rows)
