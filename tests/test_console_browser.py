"""The support console in a real browser: Playwright driving Debian's chromium (`make test` installs
it when missing; never a browser build downloaded by `playwright install`) against `tracker serve`.

Screenshots of every page go to $TRACKER_DATA_DIR/screenshots/ (`make test` prints the folder)."""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import asyncpg
import pytest
import requests

from tracker.domain.clickid import new_click_id
from tracker.domain.tokens import UserTokens
from tracker.settings import Settings
from tracker.store.db import ensure_partitions

from .conftest import ADMIN_KEY, BROWSER, SECRET, served
from .waiting import stored

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.fault, pytest.mark.browser, pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")]
SHOTS = Path(os.environ.get("TRACKER_DATA_DIR") or Path(__file__).resolve().parents[1] / ".data").absolute() / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
PAYLOAD = "<script>window.__pwned='{0}';console.error('xss {0}')</script>"
IMG = "\"><img src=x onerror=\"window.__pwned='{0}';console.error('xss {0}')\">"


def _run(coro: Any) -> Any:
    """Run a coroutine to completion from a sync test: on its own thread, since Playwright's sync
    API keeps an event loop running on this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _insert_click(dsn: str, user: str, created: datetime, **fields: Any) -> str:
    cid = new_click_id(int(created.timestamp() * 1000))[0]
    conn = await asyncpg.connect(dsn)
    try:
        await ensure_partitions(conn, created.date(), 1)
        await conn.execute(
            "INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target, device, client_ip, user_agent) "
            "VALUES ($1, $2, $3, 'aliexpress', 'web', $4, $5, '203.0.113.7', $6)", cid, datetime.fromtimestamp(
                int(created.timestamp() * 1000) / 1000, timezone.utc), user,
            fields.get("target", "https://aliexpress.ru/item/1005001.html"), fields.get("device", "dev-laptop-1"),
            fields.get("user_agent", BROWSER["User-Agent"]))
    finally:
        await conn.close()
    return cid


async def _wait_signals(dsn: str, cid: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await stored(conn, "SELECT 1 FROM signals WHERE click_id = $1 HAVING count(*) >= $2", cid, count)
    finally:
        await conn.close()


def _observe(base: str, token: str, cid: str, created: datetime, events: list[tuple[int, dict[str, Any]]]) -> None:
    body: dict[str, Any] = {"click_id": cid, "events": [{**e, "at": (created + timedelta(seconds=s)).isoformat()} for s, e in events]}
    resp = requests.post(f"{base}/v1/observe", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert resp.status_code == 200, resp.text


def _postback(base: str, cid: str, order: str, status: str, at: datetime, **extra: str) -> None:
    params = {"token": "test-admitad-token", "subid": cid, "order_id": order, "status": status,
              "payment_sum": "123.40", "order_sum": "2468.00", "currency": "RUB", "time": str(int(at.timestamp())),
              **extra}
    assert requests.get(f"{base}/postback/admitad", params=params, timeout=10).status_code == 200


@pytest.fixture(scope="module")
def site(servers, database, redis_prefix, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A served tracker with the stories support meets: an overwritten click, a converted one days
    later, a click full of hostile data, and an orphan whose click arrives late."""
    settings = Settings(database_url=database, redis_url=servers[1], data_dir=tmp_path_factory.mktemp("console"),
                        secret=SECRET, admin_key=ADMIN_KEY, redis_prefix=redis_prefix)
    tokens = UserTokens(SECRET)
    now = datetime.now(timezone.utc)
    with served(settings, env={"TRACKER_ADMIN_KEY": ADMIN_KEY}) as (_, base):
        lost_at = now - timedelta(hours=3)
        lost = _run(_insert_click(database, "shopper-1", lost_at))
        partner = f"https://ad.admitad.com/g/1e8d114494/?subid={lost}&ulp=https%3A%2F%2Faliexpress.ru%2Fitem%2F1005001.html"
        _observe(base, tokens.mint("shopper-1"), lost, lost_at, [
            (2, {"type": "navigation", "url": partner}),
            (4, {"type": "navigation", "url": "https://aliexpress.ru/item/1005001.html"}),
            (12 * 60, {"type": "navigation", "url": "https://aliexpress.ru/item/1005001.html?gclid=EAIaIQobChMI8x"}),
            (14 * 60, {"type": "navigation", "url": "https://aliexpress.ru/item/1005001.html?utm_source=coupons"
                                                    "&cjevent=7d1e2a90c4b311ef80d5&sku=12000023"}),
            (20 * 60, {"type": "promo_code", "code": "SAVE10"}),
            (25 * 60, {"type": "checkout", "device": "dev-phone-2", "basket_items_before_activation": 2})])
        paid_at = now - timedelta(days=4, hours=2)
        paid = _run(_insert_click(database, "shopper-1", paid_at, target="https://aliexpress.ru/item/4000.html"))
        _observe(base, tokens.mint("shopper-1"), paid, paid_at, [
            (3, {"type": "navigation", "url": "https://aliexpress.ru/item/4000.html"}),
            (31 * 60, {"type": "promo_code", "code": "MEGA5"})])
        _postback(base, paid, "8101234567", "pending", paid_at + timedelta(minutes=33))
        _postback(base, paid, "8101234567", "approved", paid_at + timedelta(minutes=33))
        evil = _run(_insert_click(database, "shopper-2", now - timedelta(minutes=30),
                                  target="javascript:window.__pwned='target'", device=IMG.format("device")[:120],
                                  user_agent="Mozilla/5.0 " + PAYLOAD.format("ua")))
        _observe(base, tokens.mint("shopper-2"), evil, now - timedelta(minutes=30), [
            (60, {"type": "navigation", "url": "https://aliexpress.ru/item/1.html?cjevent=" + PAYLOAD.format("param")}),
            (90, {"type": "navigation", "url": "https://aliexpress.ru/item/1.html?awc=" + IMG.format("awc")}),
            (120, {"type": "promo_code", "code": IMG.format("promo")[:60]}),
            (150, {"type": "checkout", "device": PAYLOAD.format("checkout"), "store_id": "1102345"})])
        _postback(base, evil, "EVIL-1", "pending", now, comment=PAYLOAD.format("postback"))
        late = new_click_id()[0]
        _postback(base, late, "ORPHAN-77", "pending", now)
        _run(_wait_signals(database, lost, 4))
        _run(_wait_signals(database, evil, 3))
        SHOTS.mkdir(parents=True, exist_ok=True)
        yield {"base": base, "lost": lost, "paid": paid, "evil": evil, "late": late, "dsn": database}


@pytest.fixture(scope="module")
def browser(site: dict[str, Any]) -> Iterator[Any]:
    """Started after the site (and its database) and stopped before them."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


def signed_in_page(browser: Any, base: str, **context: Any) -> Any:
    page = browser.new_context(viewport={"width": 1200, "height": 900}, **context).new_page()
    page.goto(f"{base}/support/")
    assert page.url.startswith(f"{base}/support/login")
    page.fill("input[name=key]", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/support/")
    return page


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_sign_in_and_search_by_each_kind_of_id(browser, site):
    base = site["base"]
    login = browser.new_page()
    login.goto(f"{base}/support/")
    shot(login, "01-login")
    page = signed_in_page(browser, base)
    shot(page, "02-search")
    for query, lands_on in ((site["lost"], f"/support/clicks/{site['lost']}"), ("shopper-1", "/support/users/shopper-1"),
                            ("8101234567", f"/support/clicks/{site['paid']}")):
        page.fill("header input[name=q]", query)
        page.press("header input[name=q]", "Enter")
        page.wait_for_url(f"{base}{lands_on}")
        page.goto(f"{base}/support/")
    page.goto(f"{base}/support/users/shopper-1")
    rows = page.locator("table#activations tbody tr")
    assert rows.count() == 2
    assert "overwritten" in rows.nth(0).inner_text() and "converted" in rows.nth(1).inner_text()
    looked = page.locator("table#looked tbody tr")  # the admin key's own reads of this user, just now
    assert looked.count() >= 1 and "user.read" in looked.nth(0).inner_text()
    shot(page, "03-user")
    page.fill("header input[name=q]", "no-such-order-4242")
    page.press("header input[name=q]", "Enter")
    assert "Nothing found" in page.inner_text("main")


def test_click_page_says_why_first_then_the_timeline(browser, site):
    page = signed_in_page(browser, site["base"])
    page.goto(f"{site['base']}/support/clicks/{site['lost']}")
    first = page.locator("main > section").first
    assert first.inner_text().startswith("No cashback: the link was overwritten")
    why = page.locator(".findings").inner_text()
    assert "CJ link replaced our affiliate link, 14 minutes after activation" in why
    assert "another device" in why and "2 item(s) were already in the basket" in why
    markers = page.locator("svg.timeline circle.m")
    story = page.locator("ol.story > li")
    assert markers.count() == story.count() >= 8
    assert page.locator("svg.timeline circle.m-overwrite").count() >= 2  # the CJ parameter, the promo code
    assert page.locator("ol.story li.k-overwrite mark").first.inner_text().startswith("cjevent=")
    assert "+14 min" in story.filter(has_text="CJ affiliate parameter").inner_text()
    assert "+4 s" in story.filter(has_text="Landed on the store (aliexpress.ru)").inner_text()
    assert page.locator("rect.band-lost").count() == 1
    shot(page, "04-click-overwritten")
    page.goto(f"{site['base']}/support/clicks/{site['paid']}")
    assert page.locator("main > section").first.inner_text().startswith("Cashback due: 61.70 RUB")
    assert page.locator("svg.timeline path.axis-break").count() == 1  # the postbacks came days later
    assert page.locator("ol.story > li.k-postback").count() == 2
    shot(page, "05-click-converted")


def test_hostile_evidence_is_shown_as_text_and_runs_nothing(browser, site):
    for bypass_csp in (False, True):  # with the CSP, and without it: escaping alone must hold
        page = signed_in_page(browser, site["base"], bypass_csp=bypass_csp)
        errors: list[str] = []
        page.on("console", lambda msg, errors=errors: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
        page.goto(f"{site['base']}/support/clicks/{site['evil']}")
        page.locator("details summary").first.click()
        assert page.evaluate("window.__pwned") is None
        assert errors == [], errors
        assert page.evaluate("document.scripts.length") == 0
        assert page.locator("img").count() == 0
        assert page.locator("a[href^='javascript:'], a[href^='data:']").count() == 0
        text = page.inner_text("main")
        for shown in ("<script>window.__pwned='ua'", "onerror=\"window.__pwned='device'",
                      "javascript:window.__pwned='target'", "<script>window.__pwned='postback'"):
            assert shown in text, shown
        if not bypass_csp:
            shot(page, "06-click-hostile")


def test_reconcile_an_orphan(browser, site):
    page = signed_in_page(browser, site["base"])
    page.goto(f"{site['base']}/support/orphans")
    assert "ORPHAN-77" in page.inner_text("table.list")
    shot(page, "07-orphans")
    conn_click = site["late"]

    async def arrive() -> None:  # the orphan's own click, replayed from a spool
        from tracker.domain.clickid import click_time

        conn = await asyncpg.connect(site["dsn"])
        try:
            await conn.execute("INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target) "
                               "VALUES ($1, $2, 'late-user', 'aliexpress', 'web', 'https://aliexpress.ru/')",
                               conn_click, click_time(conn_click))
        finally:
            await conn.close()

    _run(arrive())
    page.click("text=Reconcile now")
    page.wait_for_url("**/support/orphans?attached=*")
    assert "Reconciled: 1 attached" in page.inner_text("main")
    assert "ORPHAN-77" not in page.inner_text("main")
    shot(page, "08-orphans-reconciled")
    page.fill("header input[name=q]", "ORPHAN-77")
    page.press("header input[name=q]", "Enter")
    page.wait_for_url(f"{site['base']}/support/clicks/{conn_click}")


def test_overview_of_the_last_24_hours(browser, site):
    page = signed_in_page(browser, site["base"])
    page.goto(f"{site['base']}/support/overview")
    assert page.locator("svg.chart").count() == 4
    assert "AliExpress" in page.locator("svg.chart").nth(1).inner_html()
    assert "CJ" in page.locator("svg.chart").nth(2).inner_html()
    shot(page, "09-overview")
