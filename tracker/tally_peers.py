"""Every worker's tally flushed before a scrape, so that /metrics counts every request answered
before it was asked for, whichever worker answered it.

The redirect path tallies its counts in memory (metrics.Tally) and each worker adds them to the shared
metrics files every second: a scrape served by one worker would miss the other workers' last second.
So each worker of `tracker serve` binds a datagram socket, in Linux's abstract namespace (no file, and
no limit from the length of the data directory's path), named after the metrics directory and its
pid, and leaves a marker `flush-<pid>` in that directory. /metrics sends every other worker a request;
each flushes its tally on its event loop and answers; the scrape is collected once all have answered.
A count is tallied before its response is sent, hence before any scrape it could precede: none is
missed. The redirect path is untouched; a scrape costs a datagram and its answer per other worker.
A worker whose loop does not answer within ANSWER_WAIT (stuck, and serving nothing either) is not
waited for longer.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import socket
from pathlib import Path

import structlog

from . import metrics

log = structlog.get_logger("tracker.metrics")

ANSWER_WAIT = 2.0  # seconds a scrape waits for the other workers' answers at most


class _Asked:
    """One scrape's request: how many workers have yet to answer it."""

    def __init__(self, left: int) -> None:
        self.left = left
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class TallyPeers:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._prefix = b"\0tracker-tally-" + hashlib.sha256(str(directory).encode()).hexdigest()[:16].encode() + b"-"
        self._sock: socket.socket | None = None
        self._marker = directory / f"flush-{os.getpid()}"
        self._tokens = itertools.count()
        self._asked: dict[bytes, _Asked] = {}

    def _address(self, pid: str) -> bytes:
        return self._prefix + pid.encode()

    def start(self) -> None:
        """Listen for the other workers' requests (on the running loop), then say so with the marker."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self._address(str(os.getpid())))
        except OSError as exc:  # no abstract namespace (not Linux): each scrape flushes its own worker only
            sock.close()
            log.warning("tally_peers_unavailable", error=repr(exc)[:200])
            return
        try:
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._marker.touch()

    def close(self) -> None:
        self._marker.unlink(missing_ok=True)
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, sender = self._sock.recvfrom(64)
            except (BlockingIOError, InterruptedError):
                return
            if data[:1] == b"?":  # another worker's scrape: flush, then answer
                metrics.tally.flush()
                try:
                    self._sock.sendto(b"!" + data[1:], sender)
                except OSError:
                    pass  # that worker is gone (or its queue full: it stops waiting by itself)
            elif data[:1] == b"!":
                asked = self._asked.get(data[1:])
                if asked is not None:
                    asked.left -= 1
                    if asked.left == 0 and not asked.answered.done():
                        asked.answered.set_result(None)

    async def flush(self) -> None:
        """This worker's tally flushed, and every other worker's: on return, the metrics files hold
        every count tallied anywhere before this was called."""
        metrics.tally.flush()
        if self._sock is None:
            return
        token = str(next(self._tokens)).encode()
        own, asked = self._marker.name, 0
        for marker in self.dir.glob("flush-*"):
            if marker.name == own:
                continue
            try:
                self._sock.sendto(b"?" + token, self._address(marker.name.removeprefix("flush-")))
            except ConnectionRefusedError:
                marker.unlink(missing_ok=True)  # no socket of that name: its worker has exited
            except OSError as exc:  # its queue full: not waited for
                log.warning("tally_flush_not_asked", worker=marker.name, error=repr(exc)[:200])
            else:
                asked += 1
        if not asked:
            return
        self._asked[token] = waiting = _Asked(asked)
        try:
            await asyncio.wait_for(waiting.answered, ANSWER_WAIT)
        except asyncio.TimeoutError:
            log.warning("tally_flush_unanswered", workers=waiting.left, waited_s=ANSWER_WAIT)
        finally:
            del self._asked[token]
