"""The signal writer against real PostgreSQL: a row PostgreSQL refuses is bisected out and
quarantined, every other row is stored, and nothing is retried for ever."""

from tracker.domain.clickid import new_click_id
from tracker.domain.signals import Signal
from tracker.domain.states import StoredState
from tracker.store.db import create_pool
from tracker.store.signals import SignalWriter


def signal(kind="foreign_promo_code", evidence=None):
    return Signal(kind, None, evidence or {"code": "SAVE10"}, 1_795_660_800_000, False)


async def test_a_refused_row_is_quarantined_and_the_rest_stored(database):
    pool = await create_pool(database, min_size=1, max_size=2)
    writer = SignalWriter(pool)
    try:
        good = [new_click_id()[0] for _ in range(7)]
        bad_signal, bad_state = new_click_id()[0], new_click_id()[0]
        for i, cid in enumerate(good[:4]):
            writer.add(cid, "aliexpress", f"u{i}", [signal()], {"state": "overwritten", "overwritten_at": None})
        # Evidence that reached the writer with a NUL (jsonb cannot hold \u0000): whatever let it
        # through, the writer must not stop on it.
        writer.add(bad_signal, "aliexpress", "u-bad", [signal(evidence={"code": "X\u0000Y"})], None)
        writer.add(bad_state, "aliexpress", "u-bad", [], {"state": "overwritten", "bound": {"a:b": "\u0000"}})
        for i, cid in enumerate(good[4:]):
            writer.add(cid, "aliexpress", f"v{i}", [signal(), signal("cross_device")], None)
        await writer.flush()
        assert not writer._signals and not writer._states  # nothing left to retry
        async with pool.acquire() as conn:
            stored = await conn.fetch("SELECT click_id, count(*) AS n FROM signals WHERE click_id = ANY($1) "
                                      "GROUP BY click_id", good + [bad_signal])
            assert {r["click_id"]: r["n"] for r in stored} == {**{c: 1 for c in good[:4]}, **{c: 2 for c in good[4:]}}
            states = await conn.fetch("SELECT click_id FROM click_states WHERE click_id = ANY($1)",
                                      good + [bad_state])
            assert {r["click_id"] for r in states} == set(good[:4])
            quarantined = await conn.fetch("SELECT click_id, record, reason FROM signals_quarantine "
                                           "WHERE click_id = ANY($1) ORDER BY click_id", [bad_signal, bad_state])
            assert {r["click_id"] for r in quarantined} == {bad_signal, bad_state}
            assert all(any(nul in r["reason"] for nul in ("Unicode", "\\u0000", "0x00")) for r in quarantined), quarantined
        await writer.flush()  # and the next round has nothing to do
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM signals_quarantine WHERE click_id = ANY($1)",
                                       [bad_signal, bad_state]) == 2
    finally:
        await pool.close()


async def test_an_older_state_flushed_later_does_not_move_a_click_back(database):
    """Two workers' writers flush one click's states in the wrong order: overwritten stays."""
    pool = await create_pool(database, min_size=1, max_size=2)
    first, second = SignalWriter(pool), SignalWriter(pool)
    try:
        cid = new_click_id()[0]
        newer: StoredState = {"state": "overwritten", "landed": True, "bound": {"admitad:admitad_uid": "ours"},
                 "overwritten_at": 1_795_660_900_000}
        older: StoredState = {"state": "active", "landed": True, "bound": {"admitad:admitad_uid": "ours"},
                 "overwritten_at": None}
        first.add(cid, "aliexpress", "race-user", [signal()], newer)
        second.add(cid, "aliexpress", "race-user", [], older)
        await first.flush()
        await second.flush()
        async with pool.acquire() as conn:
            row = await conn.fetchrow("SELECT state, overwritten_at, detector::text FROM click_states "
                                      "WHERE click_id = $1", cid)
        assert row is not None
        assert row["state"] == "overwritten" and row["overwritten_at"] is not None
        assert '"overwritten"' in row["detector"]
        # Forward moves still happen: expired and converted clicks are not pinned to older states.
        other = new_click_id()[0]
        first.add(other, "aliexpress", "race-user", [], older)
        await first.flush()
        second.add(other, "aliexpress", "race-user", [], {**older, "state": "expired"})
        await second.flush()
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT state FROM click_states WHERE click_id = $1", other) == "expired"
    finally:
        await pool.close()


async def test_signals_past_the_queue_limit_are_counted_as_dropped(database):
    """While nothing flushes (PostgreSQL away), the queue stops at its limit and what it turns away is
    counted in tracker_signals_dropped_total{reason="queue_full"}; what it kept is stored later."""
    from prometheus_client import REGISTRY

    def dropped() -> float:
        return REGISTRY.get_sample_value("tracker_signals_dropped_total", {"reason": "queue_full"}) or 0.0

    pool = await create_pool(database, min_size=1, max_size=2)
    writer = SignalWriter(pool, queue_limit=3)
    try:
        before = dropped()
        cids = [new_click_id()[0] for _ in range(5)]
        for cid in cids:
            writer.add(cid, "aliexpress", "u-full", [signal()], None)
        assert dropped() - before == 2
        await writer.flush()
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM signals WHERE click_id = ANY($1)", cids) == 3
    finally:
        await pool.close()
