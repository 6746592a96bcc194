"""The shopper's side end to end, in Debian's chromium with the reference extension loaded
(clients/extension/, Manifest V3, `--headless=new` with a persistent context) against `tracker
serve`: activate, walk the real redirect chain /go -> the network's hop -> the store, get hijacked
by a coupon site or a foreign promo code, see the banner, re-activate; and the store still works
while tracker is down. `--host-resolver-rules` maps the real-looking hosts onto one local TLS server
(a self-signed certificate; the context ignores certificate errors). Screenshots of the banner go
to $TRACKER_DATA_DIR/screenshots/."""
from __future__ import annotations

import json

import pytest
import requests

from tracker.domain.tokens import UserTokens

from . import extension_harness
from .conftest import ADMIN_KEY, BROWSER, SECRET, served
from .extension_harness import (
    BANNER,
    CHROMIUM,
    Banner,
    activate,
    detector_state,
    navigations,
    sign_in,
    support_view,
    tab_click,
    until,
)
from .test_console_browser import SHOTS

# The harness's fixtures, used here by name.
sites, tracker_settings, tracker, browser = (extension_harness.sites, extension_harness.tracker_settings,
                                            extension_harness.tracker, extension_harness.browser)
pytestmark = [pytest.mark.fault, pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")]


def test_a_clean_journey_reports_the_chain_and_shows_no_banner(browser, tracker, tracker_settings):
    sign_in(browser[1], tracker, "shopper-clean")
    page, cid = activate(browser, "https://aliexpress.ru/item/1005001.html")
    state = until(page, lambda: (s := detector_state(tracker_settings, cid)) and s.get("landed") and s,
                  "the landing reported to tracker")
    trail = json.dumps(state["trail"])
    assert state["state"] == "active" and "ad.admitad.com" in trail and "1005001" in trail, state
    assert "u=" not in trail  # the activation URL, with the user's token, is never reported
    before = navigations(tracker)
    page.click("#next")  # ordinary browsing on the store: reported, though the trail keeps only the chain
    page.wait_for_url("https://aliexpress.ru/item/1005002.html")
    until(page, lambda: navigations(tracker) > before, "the second page reported")
    view = support_view(tracker, cid)
    assert (view["state"], view["signals"]) == ("active", [])
    assert page.locator(BANNER).count() == 0
    page.screenshot(path=str(SHOTS / "e2e-01-clean-journey.png"))
    page.close()


def test_a_coupon_site_overwrites_the_link_the_banner_says_so_and_reactivation_clears_it(browser, tracker):
    context, worker = browser
    sign_in(worker, tracker, "shopper-coupon")
    page, cid = activate(browser, "https://aliexpress.ru/item/1005001.html")
    page.goto("https://coupons.example/")
    page.click("#deal")  # -> /out -> 302 -> the store with cjevent
    page.wait_for_url("https://aliexpress.ru/item/1005001.html?cjevent=*")
    banner = Banner(page)
    banner.host.wait_for(state="visible", timeout=5_000)
    assert "Your cashback is at risk" in banner.text()
    page.screenshot(path=str(SHOTS / "e2e-02-banner-coupon-site.png"))
    # Signals are written a moment after observe answers (the signal writer's batch): wait for them.
    view = until(page, lambda: (v := support_view(tracker, cid))["signals"] and v, "the overwrite's signal stored")
    assert view["state"] == "overwritten"
    assert ("foreign_affiliate_param", "cj") in {(s["kind"], s["network"]) for s in view["signals"]}
    # Re-activation: a new click through /go in the same tab, back on the item without the foreign parameter.
    banner.click()  # the shopper's own click
    page.wait_for_url("https://aliexpress.ru/item/1005001.html", timeout=10_000)
    page.wait_for_selector("#title")
    fresh = tab_click(worker, page, other_than=cid)
    assert fresh != cid
    page.locator(BANNER).wait_for(state="detached", timeout=5_000)
    until(page, lambda: support_view(tracker, fresh).get("state") == "active", "the new click, active")
    page.screenshot(path=str(SHOTS / "e2e-03-after-reactivation.png"))
    page.close()


def test_a_foreign_promo_code_at_checkout_shows_the_banner_and_ours_does_not(browser, tracker):
    sign_in(browser[1], tracker, "shopper-promo")
    page, cid = activate(browser, "https://aliexpress.ru/item/1005001.html")
    page.fill("input[name=promo_code]", "MEGA5")  # our own code keeps the attribution
    page.click("#apply")
    until(page, lambda: "MEGA5" in json.dumps(support_view(tracker, cid)) or page.locator("#done").inner_text(),
          "the page's own handler ran")
    page.fill("input[name=promo_code]", "SAVE10")
    page.click("#apply")
    page.locator(BANNER).wait_for(state="visible", timeout=5_000)
    assert page.locator("#done").inner_text() == "Coupon applied"  # the store's own script still ran
    page.screenshot(path=str(SHOTS / "e2e-04-banner-promo-code.png"))
    view = until(page, lambda: (v := support_view(tracker, cid))["signals"] and v, "the foreign code's signal stored")
    assert [(s["kind"], s["evidence"].get("code")) for s in view["signals"]] == [("foreign_promo_code", "SAVE10")]
    page.close()


def test_our_site_calls_tracker_cross_origin_and_another_site_cannot(browser, tracker):
    """The module embedded in a page of TRACKER_CORS_ORIGINS reaches /v1/observe and the event stream
    through the browser's CORS checks; the same code on another origin is refused by the browser and
    the page goes on."""
    context, _ = browser
    token = UserTokens(SECRET).mint("shopper-site")
    go = requests.get(f"{tracker}/go/aliexpress", params={"u": token}, allow_redirects=False, timeout=10, headers=BROWSER)
    cid = go.headers["X-Click-Id"]
    script = """async ([base, token, cid]) => {
        const client = new TrackerClient({baseUrl: base, token, retryBaseMs: 60000});
        const changes = [];
        const stop = client.watch(cid, (c) => changes.push(c));
        client.navigation(cid, "https://aliexpress.ru/item/1.html");
        client.navigation(cid, "https://aliexpress.ru/item/1.html?cjevent=7d1e2a90c4b311ef80d5");
        const answer = await client.flush();
        for (let i = 0; i < 100 && changes.length < 2; i++) await new Promise((r) => setTimeout(r, 50));
        stop();
        return {answer, changes};
    }"""
    ours = context.new_page()
    ours.goto("https://app.example.com/")
    ours.wait_for_function("window.ready === true")
    result = ours.evaluate(script, [tracker, token, cid])
    assert result["answer"]["state"] == "overwritten" and result["answer"]["signals"][0]["network"] == "cj"
    assert [c["state"] for c in result["changes"]] in (["active", "overwritten"], ["overwritten"])
    ours.close()
    other = context.new_page()
    warnings: list[str] = []
    other.on("console", lambda msg: warnings.append(msg.text))
    other.goto("https://coupons.example/")
    other.add_script_tag(type="module", content="""import { TrackerClient } from "/tracker-client.js";
        window.TrackerClient = TrackerClient; window.ready = true;""")
    other.wait_for_function("window.ready === true")
    result = other.evaluate(script.replace("changes.length < 2", "changes.length < 1 && i < 20"), [tracker, token, cid])
    assert result == {"answer": None, "changes": []}
    assert any("CORS" in w or "Access-Control-Allow-Origin" in w for w in warnings), warnings
    other.close()


def test_the_store_works_while_tracker_is_down(browser, tracker_settings, tmp_path):
    context, worker = browser
    with served(tracker_settings, env={"TRACKER_ADMIN_KEY": ADMIN_KEY}) as (proc, base):
        sign_in(worker, base, "shopper-outage")
        page, cid = activate(browser, "https://aliexpress.ru/item/1005001.html")
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        proc.kill()
        proc.wait()
        page.click("#next")
        page.wait_for_url("https://aliexpress.ru/item/1005002.html")
        page.fill("input[name=promo_code]", "SAVE10")
        page.click("#apply")
        assert page.locator("#done").inner_text() == "Coupon applied"
        page.goto("https://coupons.example/")
        page.click("#deal")
        page.wait_for_url("https://aliexpress.ru/item/1005001.html?cjevent=*")
        page.wait_for_selector("#title")
        assert errors == [] and page.locator(BANNER).count() == 0  # nothing could tell; nothing broke
        page.screenshot(path=str(SHOTS / "e2e-05-tracker-down.png"))
        page.close()
