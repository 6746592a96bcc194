"""Webhooks against real PostgreSQL and a real HTTP receiver (tests/receiver.py) that fails, times
out, redirects, answers 410 and recovers; every request's signature is checked with the Standard
Webhooks reference library. The merchants file's `webhooks:` section is validated at sync."""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import subprocess
from collections import Counter
from typing import Any, Callable

import pytest
import yaml

from tracker.app import create_app
from tracker.domain.merchants import MerchantsFileError
from tracker.domain.webhooks import retry_delay
from tracker.store.merchants import sync

from .conftest import ADMIN, HERE
from .conftest import cli as run_cli
from .receiver import Receiver, new_secret
from .test_merchants_file import parse
from .test_postbacks import activate, admitad
from .waiting import until

GOOD = yaml.safe_load((HERE / "merchants.yaml").read_text())
FAST = {"webhook_timeout": 1, "webhook_lease": 3, "webhook_retry_base_ms": 50, "webhook_poll_ms": 20,
        "webhook_concurrency": 2}


def with_webhooks(*hooks: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    doc["webhooks"] = list(hooks)
    return doc


async def subscribe(db, *hooks: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    """Make the module database's subscribers exactly these (the others are deactivated)."""
    return await sync(db, parse(with_webhooks(*hooks)))


async def start_app(aiohttp_client, settings, **overrides):  # noqa: ANN001, ANN201
    return await aiohttp_client(create_app(dataclasses.replace(settings, **{**FAST, **overrides})))


async def deliveries(db, webhook: str) -> list[dict[str, Any]]:  # noqa: ANN001
    rows = await db.fetch("SELECT d.state, d.attempts, d.last_status, e.public_id, e.type FROM webhook_deliveries d "
                          "JOIN events e ON e.id = d.event_id WHERE d.webhook = $1 ORDER BY d.event_id", webhook)
    return [dict(r) for r in rows]


async def deliveries_once(db, webhook: str, holds: Callable[[list[dict[str, Any]]], bool], what: str) -> list[dict[str, Any]]:  # noqa: ANN001
    """`webhook`'s deliveries once there are some and `holds(rows)` is true (the dispatcher runs apart)."""
    async def check() -> list[dict[str, Any]] | None:
        rows = await deliveries(db, webhook)
        return rows if rows and holds(rows) else None
    return await until(check, f"{webhook}'s deliveries {what}")


# -- the merchants file --------------------------------------------------------------------------
SECRET = new_secret()


@pytest.mark.parametrize("field,value,problem", [
    ("url", "ftp://ledger.internal/hooks", "must be an http or https URL"),
    ("url", "https:///hooks", "must name a host"),
    ("url", "https://user:pass@ledger.internal/hooks", "must not carry credentials"),
    ("url", "https://user@ledger.internal/hooks", "must not carry credentials"),
    ("url", "https://ledger.internal/ho oks", "spaces"),
    ("url", "https://ledger.internal\\@evil.example/", "backslashes"),
    ("url", "https://ledger.internal/hooks#frag", "fragment"),
    ("url", "https://lédger.internal/", "ASCII"),
    ("url", "https://ledger.internal:99999/", "not a valid URL"),
    ("url", "javascript:alert(1)", "must be an http or https URL"),
    ("url", None, "required"),
    ("secret", "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "must start with whsec_"),
    ("secret", "whsec_not base64!", "standard base64"),
    ("secret", "whsec_c2hvcnQ=", "24 to 64 bytes"),
    ("secret", "whsec_" + "QUFB" * 30, "24 to 64 bytes"),
    ("secret", None, "required"),
    ("types", ["conversion.created", "conversion.exploded"], "'conversion.exploded' is not one of"),
    ("types", [], "a non-empty list"),
    ("types", "conversion.created", "a non-empty list"),
    ("name", "Ledger Team", "name: 1-63 characters"),
    ("headers", {"X": "y"}, "headers: unknown field"),
])
def test_bad_subscribers_are_refused_at_sync_with_the_problem_named(field, value, problem):
    hook = {"name": "ledger", "url": "https://ledger.internal/hooks", "secret": SECRET}
    hook[field] = value
    with pytest.raises(MerchantsFileError) as err:
        parse(with_webhooks(hook))
    text = "\n".join(err.value.problems)
    assert problem in text and "webhook" in text, text
    assert SECRET.removeprefix("whsec_") not in text  # a secret is never quoted back


def test_good_subscribers_parse_and_plain_http_is_a_warning():
    parsed = parse(with_webhooks(
        {"name": "ledger", "url": "https://ledger.internal:8443/hooks/tracker?v=1", "secret": SECRET,
         "types": ["conversion.status_changed", "conversion.created"]},
        {"name": "app-push", "url": "http://push.internal/hooks", "secret": new_secret().rstrip("=")}))
    ledger, push = parsed.webhooks
    assert ledger.types == ("conversion.created", "conversion.status_changed") and push.types is None
    assert SECRET not in repr(ledger) and "v=1" not in repr(ledger)
    assert any("app-push" in w and "plain http" in w for w in parsed.warnings)
    with pytest.raises(MerchantsFileError, match="appears more than once"):
        parse(with_webhooks({"name": "a", "url": "https://x.internal/", "secret": SECRET},
                            {"name": "a", "url": "https://y.internal/", "secret": SECRET}))
    with pytest.raises(MerchantsFileError, match="webhooks: must be a list"):
        parse({**GOOD, "webhooks": {"name": "a"}})


async def test_sync_adds_changes_and_deactivates_subscribers(db):
    a = {"name": "sync-a", "url": "https://a.internal/", "secret": new_secret()}
    b = {"name": "sync-b", "url": "https://b.internal/", "secret": new_secret()}
    report = await subscribe(db, a, b)
    assert {"webhook sync-a", "webhook sync-b"} <= set(report["added"])
    report = await subscribe(db, {**a, "types": ["click.overwritten"]})
    assert report["changed"] == ["webhook sync-a"] and report["deactivated"] == ["webhook sync-b"]
    assert a["secret"] not in json.dumps(report)
    assert await db.fetchval("SELECT types FROM webhooks WHERE name = 'sync-a'") == ["click.overwritten"]
    await subscribe(db)


# -- delivery ------------------------------------------------------------------------------------
async def test_failures_timeouts_and_redirects_are_retried_with_the_same_id_until_delivered(
        aiohttp_client, settings, tokens, db):
    """500, then no answer within the timeout, then a redirect (not followed), then 204: four signed
    attempts with one webhook-id, and the delivery ends delivered."""
    plan = iter([500, "hang", "redirect"])
    receiver = Receiver(new_secret(), lambda hit: next(plan, 204))
    await receiver.start()
    await subscribe(db, {"name": "flaky", "url": receiver.url, "secret": receiver.secret})
    client = await start_app(aiohttp_client, settings)
    try:
        cid = await activate(client, tokens, "wh-user-1")
        await client.get("/postback/admitad", params=admitad(cid, "WH-1"))
        # Delivered is final: a fifth attempt would have been sent before it.
        [row] = await deliveries_once(db, "flaky", lambda rows: rows[0]["state"] == "delivered", "delivered")
        assert (row["state"], row["attempts"], row["last_status"]) == ("delivered", 4, 204)
        assert len(receiver.hits) == 4 and all(h.verified for h in receiver.hits)
        assert len({h.webhook_id for h in receiver.hits}) == 1  # the same id on every retry
        payload = receiver.hits[-1].payload
        assert payload["id"] == receiver.hits[0].webhook_id and payload["type"] == "conversion.created"
        assert payload["data"]["conversion"]["order_id"] == "WH-1" and payload["cursor"]
        text = await (await client.get("/metrics", headers=ADMIN)).text()
        assert 'tracker_webhook_deliveries_total{outcome="retried",webhook="flaky"} 3.0' in text
        assert 'tracker_webhook_deliveries_total{outcome="delivered",webhook="flaky"} 1.0' in text
        assert 'tracker_webhook_backlog_seconds{webhook="flaky"}' in text
    finally:
        await client.close()
        await receiver.stop()


async def test_410_fails_at_once_and_retry_sends_again(aiohttp_client, settings, tokens, db):
    gone = {"yes": True}
    receiver = Receiver(new_secret(), lambda hit: 410 if gone["yes"] else 204)
    await receiver.start()
    await subscribe(db, {"name": "gone", "url": receiver.url + "?key=hidden", "secret": receiver.secret})
    client = await start_app(aiohttp_client, settings)
    try:
        cid = await activate(client, tokens, "wh-user-2")
        await client.get("/postback/admitad", params=admitad(cid, "WH-410"))
        await receiver.wait(lambda: len(receiver.hits) == 1)
        [row] = await deliveries_once(db, "gone", lambda rows: rows[0]["state"] != "pending", "settled")
        assert (row["state"], row["attempts"], row["last_status"]) == ("failed", 1, 410)
        status = cli(settings, "webhooks", "status")
        [entry] = [w for w in json.loads(status.stdout)["webhooks"] if w["name"] == "gone"]
        assert (entry["failed"], entry["backlog"], entry["last_failure"]["status"]) == (1, 0, 410)
        assert "hidden" not in status.stdout and receiver.secret.removeprefix("whsec_") not in status.stdout
        gone["yes"] = False
        retried = cli(settings, "webhooks", "retry", "gone")
        assert json.loads(retried.stdout) == {"webhook": "gone", "requeued": 1}
        await receiver.wait(lambda: len(receiver.hits) == 2)
        assert receiver.hits[1].webhook_id == receiver.hits[0].webhook_id and receiver.hits[1].verified
        assert cli(settings, "webhooks", "retry", "nobody", check=False).returncode == 1
    finally:
        await client.close()
        await receiver.stop()


def cli(settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    out = run_cli(settings, *args)
    assert out.returncode == 0 or not check, out.stderr
    return out


async def test_a_delivery_that_keeps_failing_for_24_hours_fails(aiohttp_client, settings, tokens, db):
    receiver = Receiver(new_secret(), lambda hit: 503)
    await receiver.start()
    await subscribe(db, {"name": "down-a-day", "url": receiver.url, "secret": receiver.secret})
    client = await start_app(aiohttp_client, settings, webhook_retry_base_ms=200)
    try:
        cid = await activate(client, tokens, "wh-user-3")
        await client.get("/postback/admitad", params=admitad(cid, "WH-DAY"))
        rows = await deliveries_once(db, "down-a-day", lambda rows: rows[0]["last_status"] == 503,
                                     "with the first failure recorded (and retried)")
        assert rows[0]["state"] == "pending"
        # As if it had been retried since yesterday: the next failure is its last.
        await db.execute("UPDATE webhook_deliveries SET retry_from = now() - interval '24 hours 1 minute' "
                         "WHERE webhook = 'down-a-day'")
        [row] = await deliveries_once(db, "down-a-day", lambda rows: rows[0]["state"] == "failed", "failed")
        assert row["state"] == "failed" and row["last_status"] == 503 and row["attempts"] >= 2
    finally:
        await client.close()
        await receiver.stop()


def test_the_retry_schedule_doubles_with_jitter_and_covers_a_day():
    import random

    rng = random.Random(1)
    delays = [retry_delay(n, 5.0, rng) for n in range(1, 40)]
    assert 2.5 <= delays[0] <= 5 and 5 <= delays[1] <= 10 and all(1800 <= d <= 3600 for d in delays[12:])
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered
    # At least 24 h of retries before a delivery may fail takes about 30 attempts.
    assert sum(retry_delay(n, 5.0, random.Random(n)) for n in range(1, 31)) > 0


async def test_a_conversions_events_arrive_in_order(aiohttp_client, settings, tokens, db):
    """Its created fails twice and its status_changed waits for it, though due long before."""
    failures: Counter[str] = Counter()

    def answer(hit):  # noqa: ANN001, ANN202
        if hit.payload["type"] == "conversion.created" and failures[hit.webhook_id] < 2:
            failures[hit.webhook_id] += 1
            return 500
        return 204

    receiver = Receiver(new_secret(), answer)
    await receiver.start()
    await subscribe(db, {"name": "ordered", "url": receiver.url, "secret": receiver.secret})
    client = await start_app(aiohttp_client, settings, webhook_concurrency=8)
    try:
        orders = [f"WH-ORD-{i}" for i in range(5)]
        for order in orders:
            cid = await activate(client, tokens, "wh-user-4")
            await client.get("/postback/admitad", params=admitad(cid, order))
            await client.get("/postback/admitad", params=admitad(cid, order, "approved"))
        await receiver.wait(lambda: sum(h.payload["type"] == "conversion.status_changed" for h in receiver.hits) == 5)
        for order in orders:
            mine = [h for h in receiver.hits if h.payload["data"]["conversion"]["order_id"] == order]
            assert [h.payload["type"] for h in mine] == ["conversion.created"] * 3 + ["conversion.status_changed"]
    finally:
        await client.close()
        await receiver.stop()


async def test_a_hanging_subscriber_slows_neither_the_others_nor_postbacks(aiohttp_client, settings, tokens, db):
    """One subscriber never answers: it holds at most its own concurrency in requests, while the
    other receives every event and every postback is answered."""
    hanging = Receiver(new_secret(), lambda hit: "hang")
    fast = Receiver(new_secret(), lambda hit: 204)
    await hanging.start()
    await fast.start()
    await subscribe(db, {"name": "hanging", "url": hanging.url, "secret": hanging.secret},
                    {"name": "fast", "url": fast.url, "secret": fast.secret, "types": ["conversion.created"]})
    client = await start_app(aiohttp_client, settings, webhook_timeout=30, webhook_lease=60)
    try:
        answers = []
        for i in range(20):
            cid = await activate(client, tokens, "wh-user-5")
            answers.append((await client.get("/postback/admitad", params=admitad(cid, f"WH-SLOW-{i}"))).status)
        assert answers == [200] * 20
        await fast.wait(lambda: len(set(fast.ids())) == 20)
        assert len(hanging.hits) == FAST["webhook_concurrency"]  # the rest wait their turn
    finally:
        await client.close()
        await hanging.stop()
        await fast.stop()


async def test_types_filter_what_a_subscriber_receives(aiohttp_client, settings, tokens, db):
    receiver = Receiver(new_secret())
    await receiver.start()
    await subscribe(db, {"name": "orphans-only", "url": receiver.url, "secret": receiver.secret,
                         "types": ["postback.orphaned"]})
    client = await start_app(aiohttp_client, settings)
    try:
        cid = await activate(client, tokens, "wh-user-6")
        await client.get("/postback/admitad", params=admitad(cid, "WH-TYPES"))
        await client.get("/postback/admitad", params=admitad("unknown-click", "WH-TYPES-ORPHAN"))
        await receiver.wait(lambda: len(receiver.hits) == 1)
        await asyncio.sleep(0.2)  # an absence (no other type sent) has no event to wait for: a short window
        assert [h.payload["type"] for h in receiver.hits] == ["postback.orphaned"]
    finally:
        await client.close()
        await receiver.stop()
        await subscribe(db)


async def test_deliveries_waiting_behind_a_failing_one_do_not_starve_the_rest(aiohttp_client, settings, tokens, db):
    """Forty conversions whose created keeps failing, each with its status_changed waiting behind it:
    more blocked deliveries than a claim looks at. Other conversions' events still go out."""
    def answer(hit):  # noqa: ANN001, ANN202
        return 500 if hit.payload["data"]["conversion"]["order_id"].startswith("WH-STUCK") else 204

    receiver = Receiver(new_secret(), answer)
    await receiver.start()
    await subscribe(db, {"name": "stuck", "url": receiver.url, "secret": receiver.secret})
    client = await start_app(aiohttp_client, settings, webhook_retry_base_ms=2000)
    try:
        for i in range(40):
            cid = await activate(client, tokens, "wh-user-7")
            await client.get("/postback/admitad", params=admitad(cid, f"WH-STUCK-{i}"))
            await client.get("/postback/admitad", params=admitad(cid, f"WH-STUCK-{i}", "approved"))
        for i in range(10):
            cid = await activate(client, tokens, "wh-user-7")
            await client.get("/postback/admitad", params=admitad(cid, f"WH-FREE-{i}"))
        free = lambda: {h.payload["data"]["conversion"]["order_id"] for h in receiver.hits  # noqa: E731
                        if h.payload["data"]["conversion"]["order_id"].startswith("WH-FREE")}
        await receiver.wait(lambda: len(free()) == 10)
        stuck = [h for h in receiver.hits if h.payload["data"]["conversion"]["order_id"].startswith("WH-STUCK")]
        assert {h.payload["type"] for h in stuck} == {"conversion.created"}  # never a status_changed first
    finally:
        await client.close()
        await receiver.stop()
        await subscribe(db)


async def test_two_workers_share_the_work_without_sending_an_event_twice(aiohttp_client, settings, tokens, db):
    """Two apps (two workers' dispatchers) lease from one subscriber's deliveries at the same time:
    every event arrives exactly once."""
    receiver = Receiver(new_secret())
    await receiver.start()
    await subscribe(db, {"name": "shared", "url": receiver.url, "secret": receiver.secret})
    first = await start_app(aiohttp_client, settings, webhook_concurrency=4)
    second = await start_app(aiohttp_client, settings, webhook_concurrency=4)
    try:
        for i in range(40):
            cid = await activate(first, tokens, "wh-user-8")
            await first.get("/postback/admitad", params=admitad(cid, f"WH-SHARED-{i}"))
        await receiver.wait(lambda: len(set(receiver.ids())) == 40)
        # Marked delivered only after its send was answered: a duplicate send has arrived by then.
        await deliveries_once(db, "shared", lambda rows: all(r["state"] == "delivered" for r in rows), "all delivered")
        assert len(receiver.ids()) == 40 and all(h.verified for h in receiver.hits)
    finally:
        await first.close()
        await second.close()
        await receiver.stop()
        await subscribe(db)
