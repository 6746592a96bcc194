"""Each worker's part in an erasure: on the erasure's NOTIFY, once this worker's click writer,
signal writer and session batcher have sent what they held, run the erasure again for the clicks
made before its time (store/erasure.py) and delete their Redis sessions. A click of the user that
was still in this worker's hands when the erasure ran is pseudonymised this way; one in the spool,
on its replay. A notification missed while the listening connection was down is made up for by
`tracker maintain`, which sweeps the last day's erasures again."""
from __future__ import annotations

import asyncio
import secrets
from datetime import datetime

import asyncpg
import orjson
import structlog

from ..domain.backoff import Backoff
from .clicks import ClickWriter
from .db import connect
from .erasure import CHANNEL, Erased, erase
from .sessions import SessionStore
from .signals import SignalWriter
from .tasks import cancel_and_wait

log = structlog.get_logger("tracker.erasure")


class ErasureWatch:
    def __init__(self, dsn: str, pool: asyncpg.Pool, writer: ClickWriter, signals: SignalWriter,
                 sessions: SessionStore) -> None:
        self._dsn, self.pool, self.writer, self.signals, self.sessions = dsn, pool, writer, signals, sessions
        self._task: asyncio.Task[None] | None = None
        self._sweeps: set[asyncio.Task[Erased]] = set()
        self.name = secrets.token_hex(8)  # an erasure this worker ran says so: it sweeps itself

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="erasure-listener")

    async def stop(self) -> None:
        await cancel_and_wait([self._task, *self._sweeps])

    async def sweep(self, user_id: str, before: datetime | None) -> Erased:
        """Erase again what this worker held of the user when the erasure ran, and their sessions."""
        await self.writer.settle()
        await self.signals.flush()
        await self.sessions.settle()
        async with self.pool.acquire() as conn:
            done = await erase(conn, user_id, before)
        done.sessions = await self.sessions.forget(done.click_ids)
        return done

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            doc = orjson.loads(str(payload))  # a NOTIFY payload is text
            user_id, before = str(doc["user_id"]), datetime.fromisoformat(doc["before"])
        except (ValueError, KeyError, TypeError):
            log.error("erasure_notice_unreadable")
            return
        if doc.get("from") == self.name:
            return
        task = asyncio.create_task(self._sweep_logged(user_id, before), name="erasure-sweep")
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def _sweep_logged(self, user_id: str, before: datetime) -> Erased:
        try:
            done = await self.sweep(user_id, before)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - `tracker maintain` sweeps again
            log.error("erasure_sweep_failed", error=repr(exc)[:200])
            return Erased()
        if done.clicks or done.signals or done.sessions:
            log.info("erasure_swept_late_data", **done.counts())  # counts only: never the user id
        return done

    async def _listen(self) -> None:
        reconnect = Backoff(first=1.0, cap=10.0)
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self._dsn)
                await conn.add_listener(CHANNEL, self._notified)
                reconnect.reset()
                while not conn.is_closed():
                    await asyncio.sleep(5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - listen again; maintain covers the gap
                log.warning("erasure_listener_down", error=str(exc)[:200])
                await asyncio.sleep(reconnect.next())
            finally:
                if conn is not None:
                    try:
                        await asyncio.wait_for(conn.close(), 2)
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        conn.terminate()
