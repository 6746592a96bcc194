"""The local click spool: where clicks go while PostgreSQL cannot take them.

Append-only segment files under TRACKER_DATA_DIR/spool, one open segment per process, each record
`<u32 length><u32 crc32><orjson payload>` and fsynced before the requests it holds are answered. A torn
tail (a crash mid-append, never answered) fails its checksum and ends the segment. A process holds an
exclusive flock on the segment it appends to; any process may replay a segment whose lock it can take,
which is how a crashed worker's spool is found and replayed by the next one (store/replay.py).

An append that fails (the disk full, read-only or failing, or the spool past its own cap) raises
SpoolRefused and leaves no partial record behind: the segment is cut back to where the append began
and set aside, so that a torn record can never hide the acknowledged ones a later append would put
after it.

The spool also leaves its volume a reserve (a sixteenth of the volume, at most DISK_RESERVE): an append
that would eat into it is refused as "full", and a check says "full" below twice the reserve. Every
worker thus reads a nearly full volume alike, whatever it last wrote itself: a worker whose large
record was refused (and cut back, freeing its pages) does not flap back to ready on the few pages that
a probe still finds free, nor does another worker that has not written since.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import orjson

_HEADER = struct.Struct("<II")
MAX_RECORD = 64 * 1024 * 1024
FULL_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG))
PROBE_BYTES = 4096  # a probe writes a page: an empty file can still be made on a full tmpfs
DISK_RESERVE = 16 * 1024 * 1024  # at most this much of the volume is left free (see above)


class SpoolRefused(Exception):
    """The spool cannot take a record: `state` is "full" (its cap or its disk) or "failing"."""

    def __init__(self, state: str, reason: str) -> None:
        super().__init__(f"spool {state}: {reason}")
        self.state, self.reason = state, reason


def refused(exc: OSError) -> SpoolRefused:
    return SpoolRefused("full" if exc.errno in FULL_ERRNOS else "failing", f"{exc.strerror or exc!r}")


class Spool:
    def __init__(self, directory: Path, max_bytes: int = 1 << 30) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._path: Path | None = None

    def _open(self) -> int:
        if self._fd is None:
            name = f"seg-{time.time_ns():020d}-{os.getpid()}.spool"
            path = self.dir / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fd, self._path = fd, path
            _fsync_dir(self.dir)
        return self._fd

    def append(self, rows: list[list[Any]], sync: bool = True) -> None:
        """Append one record of rows; durable on return when `sync`. Raises SpoolRefused, having
        written nothing that a replay would read, when it cannot."""
        payload = orjson.dumps(rows)
        data = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        used = self.used_bytes()
        if used + len(data) > self.max_bytes:
            raise SpoolRefused("full", f"{used} bytes spooled, the cap is {self.max_bytes}")
        try:
            free, reserve = self.disk_room()
            if free - len(data) < reserve:
                raise SpoolRefused("full", f"{free} bytes free on the spool's volume, {reserve} kept free")
            fd = self._open()
        except OSError as exc:
            raise refused(exc) from exc
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            if sync:
                os.fsync(fd)
        except OSError as exc:
            self._set_aside(fd, start)
            raise refused(exc) from exc

    def _set_aside(self, fd: int, start: int) -> None:
        """After a failed append: cut the segment back to `start` and close it. Its earlier records
        were fsynced and stay for the replay; the next append opens a new segment."""
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass  # a torn tail fails its checksum; nothing follows it in this segment
        self._fd, self._path = None, None
        os.close(fd)

    def used_bytes(self) -> int:
        """Bytes in every segment of the directory (every worker's), for the cap."""
        total = 0
        for path in self.dir.glob("seg-*.spool"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass  # replayed and removed meanwhile
        return total

    def disk_room(self) -> tuple[int, int]:
        """(bytes free on the spool's volume for this process, the reserve the spool leaves free)."""
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize, min(DISK_RESERVE, st.f_blocks * st.f_frsize // 16)

    def probe(self, headroom: int = PROBE_BYTES) -> None:
        """Raise SpoolRefused unless the spool can take a record now: `headroom` bytes under its cap,
        twice the reserve free on its volume, and a page written and fsynced there (then removed)."""
        if self.used_bytes() + max(headroom, PROBE_BYTES) > self.max_bytes:
            raise SpoolRefused("full", f"the cap of {self.max_bytes} bytes is reached")
        try:
            free, reserve = self.disk_room()
        except OSError as exc:
            raise refused(exc) from exc
        if free < 2 * reserve:
            raise SpoolRefused("full", f"{free} bytes free on the spool's volume, below twice the {reserve} kept free")
        path = self.dir / f"probe-{os.getpid()}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, bytes(PROBE_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise refused(exc) from exc

    def rotate(self) -> None:
        """Close the open segment so that it can be replayed; the next append opens a new one.
        Every record in it was fsynced when appended (or was never acknowledged)."""
        if self._fd is not None:
            fd, self._fd, self._path = self._fd, None, None
            try:
                os.fsync(fd)  # for appends made with sync=False (bulk loads)
            except OSError:
                pass  # a failing disk: the acknowledged records were fsynced one by one
            os.close(fd)  # releases the flock

    def close(self) -> None:
        self.rotate()

    def segments(self) -> list[Path]:
        """Segments not being appended to by this process, oldest first."""
        return sorted(p for p in self.dir.glob("seg-*.spool") if p != self._path)

    def has_backlog(self) -> bool:
        return self._fd is not None or any(p != self._path for p in self.dir.glob("seg-*.spool"))


class SegmentLock:
    """Exclusive ownership of a closed segment for replay; None from `take` if someone holds it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def take(cls, path: Path) -> "SegmentLock | None":
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not path.exists():  # replayed and removed by another process meanwhile
            os.close(fd)
            return None
        return cls(path, fd)

    def records(self) -> Iterator[list[list[Any]]]:
        with open(self.path, "rb") as fh:
            for record, _ in _records(fh):
                yield record

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)
        self.release()

    def release(self) -> None:
        os.close(self.fd)


def _records(fh: BinaryIO) -> Iterator[tuple[list[list[Any]], int]]:
    """Each whole record from the file's position on, with the offset where it ends. A record not
    whole (a torn tail of a crash, never acknowledged, or an append still under way) ends them."""
    while True:
        header = fh.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        length, crc = _HEADER.unpack(header)
        if length > MAX_RECORD:
            return
        payload = fh.read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        yield orjson.loads(payload), fh.tell()


class RowCount:
    """Clicks waiting in all segments of a spool directory (every worker's), for the gauge: each
    segment is read from where the last count stopped (segments only grow), so a count reads only
    what was appended since; a segment shorter than that (a failed append cut back) is read again."""

    def __init__(self) -> None:
        self._read: dict[str, tuple[int, int]] = {}  # segment name -> (offset read up to, rows before it)
        self._lock = threading.Lock()  # counts run in threads (asyncio.to_thread)

    def count(self, directory: Path) -> int:
        with self._lock:
            read, total = {}, 0
            for path in directory.glob("seg-*.spool"):
                offset, rows = self._read.get(path.name, (0, 0))
                try:
                    with open(path, "rb") as fh:
                        if os.fstat(fh.fileno()).st_size < offset:
                            offset, rows = 0, 0
                        fh.seek(offset)
                        for record, end in _records(fh):
                            offset, rows = end, rows + len(record)
                except FileNotFoundError:
                    continue  # replayed and removed meanwhile
                read[path.name] = (offset, rows)
                total += rows
            self._read = read
            return total


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
