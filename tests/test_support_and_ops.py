import pytest

from tracker import keys
from tracker.domain.clickid import new_click_id

from .conftest import ADMIN, BROWSER


async def test_click_view_needs_the_admin_key(client, tokens):
    resp = await client.get("/go/aliexpress", params={"u": tokens.mint("kim"), "device": "dev-9"},
                            allow_redirects=False, headers=BROWSER)
    cid = resp.headers["X-Click-Id"]
    assert (await client.get(f"/v1/clicks/{cid}")).status == 401
    wrong = await client.get(f"/v1/clicks/{cid}", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401 and (await wrong.json())["error"] == "unauthorized"
    view = await client.get(f"/v1/clicks/{cid}", headers=ADMIN)
    assert view.status == 200
    body = await view.json()
    click = body["click"]
    assert (click["click_id"], click["user_id"], click["merchant"], click["source"], click["bot"]) == (
        cid, "kim", "aliexpress", "web", False)
    assert click["created_at"].endswith("Z")
    assert body["state"] == "active"
    assert isinstance(body["signals"], list) and isinstance(body["conversions"], list)
    assert isinstance(body["diagnosis"], list)


async def test_click_view_404s(client):
    for cid in (new_click_id()[0], "not-an-id", "x" * 200):
        resp = await client.get(f"/v1/clicks/{cid}", headers=ADMIN)
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"


async def test_health_ready_and_metrics(client, tokens):
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {"status": "ready", "postgres": "up", "redis": "up", "spool": "ok", "writer": "up"}
    await client.get("/go/nike", params={"u": tokens.mint("lee")}, allow_redirects=False, headers=BROWSER)
    text = await (await client.get("/metrics")).text()
    for name in ("tracker_clicks_total", "tracker_redirect_duration_seconds_bucket",
                 "tracker_spool_pending_clicks", "tracker_writer_batch_size_bucket"):
        assert name in text
    assert 'tracker_clicks_total{bot="false",merchant="nike",source="web"}' in text


async def test_unknown_routes_and_methods_answer_json(client):
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    resp = await client.post("/go/nike")
    assert resp.status == 405 and (await resp.json())["error"] == "method_not_allowed"


def test_tally_adds_up_exactly_like_direct_observation():
    import random

    from prometheus_client import CollectorRegistry, Counter, Histogram

    from tracker.metrics import Tally

    registry = CollectorRegistry()
    buckets = (.001, .005, .01, .05, .1)
    direct = Histogram("direct_seconds", "d", buckets=buckets, registry=registry)
    tallied = Histogram("tallied_seconds", "t", buckets=buckets, registry=registry)
    counter = Counter("tallied_total", "c", ["k"], registry=registry)
    tally = Tally(tallied)
    rng = random.Random(500)  # the same values on every run
    values = [rng.choice([0.0, 0.001, 0.0010001, 0.05, 0.2, rng.random() / 10]) for _ in range(500)]
    for v in values:
        direct.observe(v)
        tally.observe(v)
        tally.count(counter.labels("a"))
    assert registry.get_sample_value("tallied_total", {"k": "a"}) == 0  # nothing until the flush
    tally.flush()
    for le in ("0.001", "0.005", "0.01", "0.05", "0.1", "+Inf"):
        assert registry.get_sample_value("tallied_seconds_bucket", {"le": le}) == \
            registry.get_sample_value("direct_seconds_bucket", {"le": le})
    assert registry.get_sample_value("tallied_seconds_sum") == pytest.approx(registry.get_sample_value("direct_seconds_sum"))
    assert registry.get_sample_value("tallied_total", {"k": "a"}) == 500
    tally.flush()  # idempotent when nothing new came
    assert registry.get_sample_value("tallied_total", {"k": "a"}) == 500


async def test_a_started_app_keeps_its_startup_objects_out_of_the_gc(settings, aiohttp_client):
    """Start-up ends with gc.freeze(): what was built by then (the app, its pools and writer) is out
    of the collector's reach, so a full collection under load scans only what came after."""
    import gc

    from tracker.app import create_app

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    client = await aiohttp_client(create_app(settings))
    writer = client.server.app[keys.WRITER]
    assert gc.get_freeze_count() > 10_000
    assert gc.is_tracked(writer)  # a GC object, but frozen: get_objects() lists only the collectable ones
    assert not any(o is writer for o in gc.get_objects())
