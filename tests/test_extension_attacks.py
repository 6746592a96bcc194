"""What a page cannot make the reference extension do, in Debian's chromium against `tracker serve`:
a store page's script cannot report a promo code or press the banner's button, nor take the banner
away; a page of our site other than the sign-in page cannot hand the extension its credentials; and
the extension reaches only the tabs it follows (no content script elsewhere, nothing reported from
them, nothing once the click's session is over).

A report that must not happen is checked behind a later one that must: the extension handles a tab's
events and a content script's messages in order, so once the later one is seen, the earlier one would
have been too."""
from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tracker.domain.tokens import UserTokens

from . import extension_harness
from .conftest import SECRET
from .extension_harness import (
    BANNER,
    CHROMIUM,
    SIGN_IN,
    Banner,
    activate,
    extension_worlds,
    reported,
    sign_in,
    support_view,
    tab_click,
    tab_id,
    until,
)
from .test_console_browser import SHOTS

# The harness's fixtures, used here by name.
sites, tracker_settings, tracker, browser = (extension_harness.sites, extension_harness.tracker_settings,
                                            extension_harness.tracker, extension_harness.browser)
pytestmark = [pytest.mark.fault, pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")]

FORGE_PROMO = """() => {
    const field = document.querySelector("input[name=promo_code]");
    field.focus();
    document.execCommand("insertText", false, "FORGED-CODE");  // a trusted input event, and change on blur
    field.blur();
    for (const type of ["input", "change"]) field.dispatchEvent(new Event(type, {bubbles: true}));
    field.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", bubbles: true}));
    field.form.dispatchEvent(new Event("submit", {bubbles: true, cancelable: true}));
    document.getElementById("apply").click();   // a click from a script; the form's submit that follows is the browser's
    field.form.requestSubmit();
}"""


def _typed(page: Any, code: str) -> None:
    """The shopper types a code and presses Enter (the browser's own input events)."""
    page.fill("input[name=promo_code]", code)
    page.press("input[name=promo_code]", "Enter")


def test_a_page_script_cannot_report_a_promo_code(browser, tracker):
    context, worker = browser
    sign_in(worker, tracker, "shopper-forged-code")
    page, cid = activate(browser, "https://aliexpress.ru/item/1005001.html")
    until(page, lambda: extension_worlds(page), "the content script in the followed tab")
    page.evaluate(FORGE_PROMO)
    assert page.locator("#done").inner_text() == "Coupon applied"  # the page's own handler ran
    _typed(page, "SAVE10")  # then the shopper's own code, which must be reported
    page.locator(BANNER).wait_for(state="visible", timeout=5_000)
    # Signals are written a moment after observe answers (the signal writer's batch): wait for ours.
    view = until(page, lambda: (v := support_view(tracker, cid))["signals"] and v, "the shopper's code stored")
    assert [(s["kind"], s["evidence"].get("code")) for s in view["signals"]] == [("foreign_promo_code", "SAVE10")]
    assert "FORGED-CODE" not in json.dumps(reported(worker))
    page.close()


HIJACK_BANNER = """() => {
    const host = document.getElementById("tracker-cashback-banner");
    const reached = Boolean(host.shadowRoot);
    if (host.shadowRoot) host.shadowRoot.querySelector("button").click();
    host.click();
    host.dispatchEvent(new MouseEvent("click", {bubbles: true, composed: true}));
    return reached;
}"""
HIDE_BANNER = [  # each a page script that would take the banner out of the shopper's sight
    "() => document.getElementById('tracker-cashback-banner').remove()",
    "() => { const b = document.getElementById('tracker-cashback-banner'); document.body.append(b); b.hidden = true; }",
    "() => document.getElementById('tracker-cashback-banner').setAttribute('style', 'display: none')",
    """() => document.head.append(Object.assign(document.createElement('style'), {textContent:
       '#tracker-cashback-banner, html > :last-child { display: none !important; visibility: hidden !important }'}))""",
    "() => document.getElementById('tracker-cashback-banner').hidePopover?.()",
]


def test_a_page_script_can_neither_press_nor_remove_the_banner(browser, tracker):
    context, worker = browser
    sign_in(worker, tracker, "shopper-banner")
    page, cid = activate(browser, "https://aliexpress.ru/item/1005001.html")
    page.goto("https://coupons.example/")
    page.click("#deal")  # a real overwrite: the banner is due
    page.wait_for_url("https://aliexpress.ru/item/1005001.html?cjevent=*")
    banner = Banner(page)
    banner.host.wait_for(state="visible", timeout=5_000)
    landed = page.url
    assert page.evaluate(HIJACK_BANNER) is False  # the inside of the banner is out of the page's reach
    for script in HIDE_BANNER:
        page.evaluate(script)
        banner.host.wait_for(state="visible", timeout=5_000)
        assert "Your cashback is at risk" in banner.text(), script
    tab = tab_id(worker, page, cid)
    assert worker.evaluate("(tabId) => chrome.action.getBadgeText({tabId})", tab) == "!"
    page.screenshot(path=str(SHOTS / "e2e-06-banner-after-page-attacks.png"))
    _typed(page, "MEGA5")  # a later message of the content script, handled after any activation
    until(page, lambda: any(r.get("detail") == "MEGA5" for r in reported(worker)), "our own code reported")
    assert not [r for r in reported(worker) if r["what"] == "reactivate"]
    assert page.url == landed and worker.evaluate("(t) => trackerExtension.tabs.get(t).clickId", tab) == cid
    # The popup, out of the page's reach, says the same and re-activates the store's tab.
    page.bring_to_front()
    with context.expect_page() as opened:  # the popup's page beside the store's tab, which stays the active one
        worker.evaluate("() => chrome.tabs.create({url: chrome.runtime.getURL('popup.html'), active: false})")
    popup = opened.value
    popup.locator("#risk").wait_for(state="visible")
    assert "shopper-banner" in popup.locator("#account").inner_text()
    popup.screenshot(path=str(SHOTS / "e2e-08-popup-at-risk.png"))
    popup.click("#again")
    assert tab_click(worker, page, other_than=cid) != cid
    page.locator(BANNER).wait_for(state="detached", timeout=5_000)
    until(page, lambda: worker.evaluate("(tabId) => chrome.action.getBadgeText({tabId})", tab) == "", "the badge gone")
    popup.close()
    page.close()


def _send_credentials(page: Any, extension: str, base: str, token: str) -> Any:
    """What a page does to hand the extension credentials; the extension's answer, or why none."""
    return page.evaluate("""async ([extension, baseUrl, token]) => {
        if (!globalThis.chrome || !chrome.runtime || !chrome.runtime.sendMessage) return "no way to send";
        try { return await chrome.runtime.sendMessage(extension, {type: "credentials", baseUrl, token}); }
        catch (error) { return "refused: " + error.message; }
    }""", [extension, base, token])


def test_only_our_sign_in_page_hands_over_credentials(browser, tracker):
    context, worker = browser
    extension = worker.url.split("/")[2]
    mine = sign_in(worker, tracker, "shopper-credentials")
    attacker = UserTokens(SECRET).mint("attacker")
    page = context.new_page()
    for where, base in [("https://app.example.com/promo/landing", tracker),  # our origin, not the sign-in page
                        ("https://app.example.com/extension/connect-other", tracker),
                        ("http://app.example.com/extension/connect", tracker),  # the sign-in path without TLS
                        (SIGN_IN, "https://t.attacker.example")]:  # the sign-in page, another service
        page.goto(where)
        answer = _send_credentials(page, extension, base, attacker)
        stored = worker.evaluate("() => chrome.storage.local.get(['baseUrl', 'token'])")
        assert stored == {"baseUrl": tracker, "token": mine}, (where, base, answer)
        assert not (isinstance(answer, dict) and answer.get("ok")), (where, answer)
    renewed = UserTokens(SECRET).mint("shopper-signed-in-again")  # the real sign-in page may replace it
    page.goto(SIGN_IN + "?next=/account")
    assert _send_credentials(page, extension, tracker, renewed) == {"ok": True, "account": "shopper-signed-in-again"}
    assert worker.evaluate("() => chrome.storage.local.get('token')") == {"token": renewed}
    popup = context.new_page()
    popup.goto(f"chrome-extension://{extension}/popup.html")
    until(popup, lambda: "shopper-signed-in-again" in popup.locator("#account").inner_text(),
          "the popup naming the account")
    popup.screenshot(path=str(SHOTS / "e2e-07-popup-connected-account.png"))
    popup.close()
    page.close()


def test_an_untracked_tab_gets_no_content_script_and_nothing_reported(browser, tracker):
    context, worker = browser
    sign_in(worker, tracker, "shopper-untracked")
    before = len(reported(worker))
    page = context.new_page()  # reaches the store without an activation
    page.goto("https://aliexpress.ru/item/untracked-1.html")
    page.click("#next")
    page.wait_for_url("https://aliexpress.ru/item/1005002.html")
    page.goto("https://coupons.example/")
    page.click("#deal")
    page.wait_for_url("https://aliexpress.ru/item/1005001.html?cjevent=*")
    page.wait_for_selector("#title")
    assert extension_worlds(page) == []
    followed, cid = activate(browser, "https://aliexpress.ru/item/1005001.html?after=untracked")
    until(followed, lambda: any("after=untracked" in str(r.get("detail")) for r in reported(worker)),
          "the followed tab's landing reported")
    until(followed, lambda: extension_worlds(followed), "the content script in the followed tab")
    seen = reported(worker)[before:]
    assert [r for r in seen if any(s in str(r.get("detail")) for s in ("untracked-1", "1005002", "coupons", "cjevent"))] == []
    page.close()
    followed.close()


def test_a_tab_is_followed_until_its_session_ends(browser, tracker):
    context, worker = browser
    sign_in(worker, tracker, "shopper-session-end")
    page, cid = activate(browser, "https://aliexpress.ru/item/1005001.html")
    assert support_view(tracker, cid)["click"]["bot"] is False  # a shopper's click, which converts
    tab = tab_id(worker, page, cid)
    page.goto("https://coupons.example/")  # a foreign host within the session: reported
    until(page, lambda: any("coupons.example" in str(r.get("detail")) for r in reported(worker)),
          "the coupon site reported")
    params = {"token": "test-admitad-token", "subid": cid, "order_id": f"E2E-{cid}", "status": "pending",
              "payment_sum": "123.40", "order_sum": "2468.00", "currency": "RUB", "time": "1795660800"}
    assert requests.get(f"{tracker}/postback/admitad", params=params, timeout=10).status_code == 200
    until(page, lambda: worker.evaluate("(t) => !trackerExtension.tabs.has(t)", tab),
          "the extension no longer following the converted click's tab")
    page.click("#deal")  # after the session: the hop and the store are none of the extension's business
    page.wait_for_url("https://aliexpress.ru/item/1005001.html?cjevent=*")
    page.wait_for_selector("#title")
    other, _ = activate(browser, "https://aliexpress.ru/item/1005001.html?after=session-end")
    until(other, lambda: any("after=session-end" in str(r.get("detail")) for r in reported(worker)),
          "a later tab's landing reported")
    assert not [r for r in reported(worker) if r["tab"] == tab and "cjevent" in str(r.get("detail"))]
    assert extension_worlds(page) == []
    assert [s["kind"] for s in support_view(tracker, cid)["signals"]] == []
    page.close()
    other.close()
