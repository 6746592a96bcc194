"""Address retention: `tracker maintain` truncates the client addresses of clicks older than
TRACKER_IP_RETENTION_DAYS (IPv4 to /24, IPv6 to /48), once per daily partition, and the support view
and the console say when an address was truncated; the addresses among postbacks' parameters go the
same way; an IPv4 client that reaches a dual-stack listener is stored and truncated as IPv4."""
from __future__ import annotations

import ipaddress
import json
import time
from datetime import date, timedelta

import pytest
from aiohttp.test_utils import make_mocked_request

from tracker.domain.addresses import is_address, truncated, with_truncated_addresses, without_addresses
from tracker.domain.clickid import click_time, new_click_id
from tracker.store.clicks import Click, ClickWriter
from tracker.store.db import create_pool, ensure_partitions
from tracker.store.spool import Spool
from tracker.web.common import client_ip

from .conftest import ADMIN, cli
from .test_console import sign_in
from .test_postbacks import activate


@pytest.mark.parametrize("value,network", [
    ("198.51.100.123", "198.51.100.0/24"),
    ("::ffff:198.51.100.9", "198.51.100.0/24"),  # IPv4-mapped: the IPv4 address it carries
    ("2001:db8:1234:5678::9", "2001:db8:1234::/48"),
    ("fe80::1%eth0", "fe80::/48"),  # a zone is no part of the network
    ("198.51.100.0/24", None), ("10.0.0.0/8", None),  # a network is not an address
    ("12345", None), ("1.5", None), ("ORD-1", None), ("", None), (" 198.51.100.1", None),
])
def test_which_parameter_values_are_addresses_and_what_they_truncate_to(value, network):
    assert is_address(value) is (network is not None)
    assert truncated(value) == network


def test_postback_parameters_without_or_with_truncated_addresses():
    raw = {"order_id": "O-1", "action_ip": "198.51.100.123", "peer": "::ffff:203.0.113.9",
           "v6": "2001:db8:1:2::3", "net": "10.0.0.0/8", "payment_sum": "1.50"}
    assert with_truncated_addresses(raw) == {**raw, "action_ip": "198.51.100.0/24", "peer": "203.0.113.0/24",
                                             "v6": "2001:db8:1::/48"}
    assert without_addresses(raw) == {"order_id": "O-1", "net": "10.0.0.0/8", "payment_sum": "1.50"}
    # An erasure after retention ends where one before it does: a truncated address goes too.
    assert without_addresses(with_truncated_addresses(raw)) == without_addresses(raw)
    assert with_truncated_addresses(with_truncated_addresses(raw)) == with_truncated_addresses(raw)


async def old_click(db, days_ago: int, address: str | None) -> str:  # noqa: ANN001
    cid, _ = new_click_id(int((time.time() - days_ago * 86400) * 1000))
    await ensure_partitions(db, click_time(cid).date(), 1)
    await db.execute("INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target, client_ip) "
                     "VALUES ($1, $2, 'old-user', 'nike', 'web', 'https://www.nike.com/', $3)",
                     cid, click_time(cid), address)
    return cid


async def test_maintain_truncates_old_addresses_once_and_the_support_view_says_when(client, settings, tokens, db):
    v4 = await old_click(db, 40, "192.0.2.77")
    v6 = await old_click(db, 41, "2001:db8:1234:5678::9")
    none = await old_click(db, 40, None)
    odd = await old_click(db, 42, "not an address")
    fresh_old = await old_click(db, 20, "198.51.100.9")  # within the 30 days
    recent = await activate(client, tokens, "recent-user")
    out = cli(settings, "maintain")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["addresses_truncated"] == 3
    stored = {r["click_id"]: (r["client_ip"], r["client_ip_truncated_at"] is not None) for r in await db.fetch(
        "SELECT click_id, client_ip, client_ip_truncated_at FROM clicks WHERE click_id = ANY($1)",
        [v4, v6, none, odd, fresh_old, recent])}
    assert stored == {v4: ("192.0.2.0/24", True), v6: ("2001:db8:1234::/48", True), none: (None, False),
                      odd: (None, True), fresh_old: ("198.51.100.9", False), recent: ("127.0.0.1", False)}
    # Each partition once: a second run scans nothing again and truncates nothing.
    again = cli(settings, "maintain")
    assert json.loads(again.stdout)["addresses_truncated"] == 0
    view = await (await client.get(f"/v1/clicks/{v4}", headers=ADMIN)).json()
    assert view["click"]["client_ip"] == "192.0.2.0/24" and view["click"]["client_ip_truncated_at"].endswith("Z")
    whole = await (await client.get(f"/v1/clicks/{recent}", headers=ADMIN)).json()
    assert whole["click"]["client_ip"] == "127.0.0.1" and whole["click"]["client_ip_truncated_at"] is None
    assert (await sign_in(client)).status == 303
    page = await (await client.get(f"/support/clicks/{v4}")).text()
    assert "192.0.2.0/24" in page and "truncated to its network on" in page
    assert "truncated to its network" not in await (await client.get(f"/support/clicks/{recent}")).text()


async def test_the_retention_follows_the_setting(client, settings, db):
    cid = await old_click(db, 3, "203.0.113.200")
    out = cli(settings, "maintain", TRACKER_IP_RETENTION_DAYS="2")
    assert out.returncode == 0, out.stderr
    assert await db.fetchval("SELECT client_ip FROM clicks WHERE click_id = $1", cid) == "203.0.113.0/24"
    assert cli(settings, "maintain", TRACKER_IP_RETENTION_DAYS="0").returncode == 2  # a bad setting, named
    assert date.today() - timedelta(days=3) <= click_time(cid).date()


async def test_a_click_that_reaches_a_truncated_day_late_is_stored_truncated(client, settings, db, tmp_path):
    """`tracker maintain` truncates each day once: a click of that day replayed from a spool after
    it (a pod that kept its spool through a long outage) kept its whole address until the partition
    was dropped. The replay stores it truncated, as the day's other clicks are."""
    ms = int((time.time() - 45 * 86400) * 1000)
    first, _ = new_click_id(ms)
    await ensure_partitions(db, click_time(first).date(), 1)
    await db.execute("INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target, client_ip) "
                     "VALUES ($1, $2, 'old-user', 'nike', 'web', 'https://www.nike.com/', '192.0.2.77')",
                     first, click_time(first))
    assert cli(settings, "maintain").returncode == 0
    assert await db.fetchval("SELECT count(*) FROM address_truncated_days WHERE day = $1", click_time(first).date())
    pool = await create_pool(settings.database_url or "")
    writer = ClickWriter(pool, Spool(tmp_path / "spool"), durability="async")
    try:
        late, late_ms = new_click_id(ms + 1)
        recent, recent_ms = new_click_id()
        await writer.spool.spill([Click(late, late_ms, "late-user", "nike", "web", "https://www.nike.com/", None,
                                        "198.51.100.77", "ua", False, "GET"),
                                  Click(recent, recent_ms, "late-user", "nike", "web", "https://www.nike.com/", None,
                                        "2001:db8:1:2::7", "ua", False, "GET")])
        assert await writer.replay() == 2
        rows = {r["click_id"]: (r["client_ip"], r["client_ip_truncated_at"] is not None) for r in await db.fetch(
            "SELECT click_id, client_ip, client_ip_truncated_at FROM clicks WHERE click_id = ANY($1)", [late, recent])}
        assert rows == {late: ("198.51.100.0/24", True), recent: ("2001:db8:1:2::7", False)}
    finally:
        writer.spool.close()
        await pool.close()


async def test_a_quarantined_clicks_address_is_truncated_after_the_retention_too(settings, db):
    """A click PostgreSQL refused is kept whole in clicks_quarantine (for TRACKER_RETENTION_DAYS): its
    address goes to its network after TRACKER_IP_RETENTION_DAYS, as a stored click's does."""
    ids = {}
    for name, days_ago, address in (("old", 40, "192.0.2.123"), ("old6", 40, "2001:db8:aa:bb::1"),
                                    ("odd", 40, "not an address"), ("fresh", 3, "198.51.100.44")):
        cid, _ = new_click_id(int((time.time() - days_ago * 86400) * 1000))
        record = [cid, click_time(cid).isoformat(), "quarantined-user", "nike", "web", "https://www.nike.com/",
                  None, address, "Mozilla/5.0", False, "GET"]
        await db.execute("INSERT INTO clicks_quarantine (click_id, record, reason, created_at) "
                         "VALUES ($1, $2, 'UntranslatableCharacterError: test', now() - make_interval(days => $3))",
                         cid, json.dumps(record), days_ago)
        ids[name] = cid
    out = cli(settings, "maintain")
    assert out.returncode == 0, out.stderr
    rows = {r["click_id"]: json.loads(r["record"]) for r in await db.fetch(
        "SELECT click_id, record FROM clicks_quarantine WHERE click_id = ANY($1)", list(ids.values()))}
    assert rows[ids["old"]][7] == "192.0.2.0/24"
    assert rows[ids["old6"]][7] == "2001:db8:aa::/48"
    assert rows[ids["odd"]][7] is None
    assert rows[ids["fresh"]][7] == "198.51.100.44"
    assert rows[ids["old"]][2] == "quarantined-user" and rows[ids["old"]][8] == "Mozilla/5.0"  # the rest kept
    again = cli(settings, "maintain")
    assert again.returncode == 0 and json.loads(again.stdout)["addresses_truncated"] == 0


async def postback_row(db, table: str, days_ago: int, **raw: str) -> int:  # noqa: ANN001
    """A postback kept `days_ago` (history or orphan), its parameters `raw`."""
    columns = "outcome" if table == "postback_history" else "reason"
    return await db.fetchval(
        f"INSERT INTO {table} (network, order_id, {columns}, raw, received_at) "
        "VALUES ('admitad', $1, 'accepted', $2, now() - make_interval(days => $3)) RETURNING id",
        raw.get("order_id", "O"), raw, days_ago)


async def test_the_addresses_among_postback_parameters_are_truncated_after_the_retention(settings, db):
    """Networks pass the shopper's address on as a parameter (Admitad's action_ip), kept with the
    postback as sent: it goes to its network after TRACKER_IP_RETENTION_DAYS, as a click's does.
    Each table is read from where the last run stopped (its watermark), up to the first row that is
    not old enough yet."""
    history_old = await postback_row(db, "postback_history", 40, order_id="RET-1", action_ip="198.51.100.123")
    await postback_row(db, "postback_history", 40, order_id="RET-2", action_ip="198.51.100.0/24")  # truncated
    history_none = await postback_row(db, "postback_history", 40, order_id="RET-3", payment_sum="1.00")
    orphan_old = await postback_row(db, "orphan_postbacks", 41, order_id="RET-4", ip="::ffff:203.0.113.9")
    orphan_old6 = await postback_row(db, "orphan_postbacks", 40, order_id="RET-5", ip="2001:db8:1234:5678::9")
    history_fresh = await postback_row(db, "postback_history", 20, order_id="RET-6", action_ip="198.51.100.7")
    history_after = await postback_row(db, "postback_history", 40, order_id="RET-7", action_ip="198.51.100.8")

    async def raws() -> dict[int, dict[str, str]]:
        rows = await db.fetch("SELECT id, raw FROM postback_history UNION ALL SELECT id + 1000000, raw "
                              "FROM orphan_postbacks")
        return {r["id"]: r["raw"] for r in rows}

    out = cli(settings, "maintain")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["addresses_truncated"] == 3
    stored = await raws()
    assert stored[history_old] == {"order_id": "RET-1", "action_ip": "198.51.100.0/24"}
    assert stored[1000000 + orphan_old]["ip"] == "203.0.113.0/24"
    assert stored[1000000 + orphan_old6]["ip"] == "2001:db8:1234::/48"
    assert stored[history_fresh]["action_ip"] == "198.51.100.7"  # within the 30 days
    assert stored[history_after]["action_ip"] == "198.51.100.8"  # after the first row that is not: next time
    marks = {r["table_name"]: r["last_id"] for r in await db.fetch("SELECT * FROM address_truncated_rows")}
    assert marks == {"postback_history": history_none, "orphan_postbacks": orphan_old6}
    # A run reads only the rows after the watermark: one put back whole behind it stays as it is.
    await db.execute("UPDATE postback_history SET raw = $2 WHERE id = $1", history_old,
                     {"order_id": "RET-1", "action_ip": "198.51.100.123"})
    again = cli(settings, "maintain")
    assert again.returncode == 0 and json.loads(again.stdout)["addresses_truncated"] == 0
    assert (await raws())[history_old]["action_ip"] == "198.51.100.123"
    # Ten days' retention: the fresh row is old enough now, and the run goes on past it.
    later = cli(settings, "maintain", TRACKER_IP_RETENTION_DAYS="10")
    assert later.returncode == 0 and json.loads(later.stdout)["addresses_truncated"] == 2
    stored = await raws()
    assert (stored[history_fresh]["action_ip"], stored[history_after]["action_ip"]) == (
        "198.51.100.0/24", "198.51.100.0/24")


@pytest.mark.parametrize("address,network", [
    ("::ffff:198.51.100.9", "198.51.100.0/24"), ("::FFFF:c633:6409", "198.51.100.0/24"),
    ("198.51.100.9", "198.51.100.0/24"), ("2001:db8:1234:5678::9", "2001:db8:1234::/48"),
    ("::1", "::/48"), ("not an address", None),
])
async def test_an_ipv4_mapped_address_truncates_as_ipv4(db, address, network):
    """A dual-stack listener on `::` reports an IPv4 client as `::ffff:a.b.c.d`: truncated as IPv6,
    every such address became `::/48`, one value for all of them."""
    assert await db.fetchval("SELECT truncated_address($1)", address) == network


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize("remote,forwarded,expected", [
    ("::ffff:198.51.100.9", None, "198.51.100.9"),  # a dual-stack listener's IPv4 client
    ("::ffff:10.1.2.3", "198.51.100.9", "198.51.100.9"),  # a trusted proxy that reached us over IPv4
    ("10.1.2.3", "::ffff:198.51.100.9", "198.51.100.9"),  # a mapped hop
    ("10.1.2.3", "198.51.100.9, ::ffff:10.9.9.9", "198.51.100.9"),  # a mapped proxy among the hops
    ("2001:db8::1", None, "2001:db8::1"), ("198.51.100.9", None, "198.51.100.9"),
])
def test_the_client_address_of_an_ipv4_client_on_a_dual_stack_listener_is_ipv4(remote, forwarded, expected):
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    request = make_mocked_request("GET", "/go/nike", headers=headers).clone(remote=remote)
    assert client_ip(request, TRUSTED) == expected
    if not forwarded:
        assert client_ip(request, ()) == expected
