"""The detector, without a server: chains, the same-network case, promo codes, risks, expiry, late."""
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import cast

import pytest

from tracker.domain.catalog import load_catalog
from tracker.domain.detection import BadEvent, ClickContext, Detector, SessionState
from tracker.domain.diagnosis import ClickFacts, diagnose
from tracker.domain.rows import ClickRow
from tracker.domain.signals import MAX_PER_CLICK, Signal, admit, tally
from tracker.domain.states import ClickState

from .conftest import load_merchants

MERCHANTS = {m.slug: m for m in load_merchants().merchants}
DETECTOR = Detector(load_catalog())
T0 = 1_795_000_000_000
CID = "FP7L5uD_SgMHS98lWOSSOV"
OURS = "8e2f1d6c7b1a4c0e9f3b2a1d0c9e8f7a"


def ctx(merchant="aliexpress", network="admitad", device="dev-1", converted=False):
    return ClickContext(click_id=CID, created_ms=T0, device=device, merchant=MERCHANTS[merchant],
                        our_network=network, converted=converted)


def at(minutes):
    return datetime.fromtimestamp((T0 + minutes * 60_000) / 1000, tz=timezone.utc).isoformat()


def nav(url, minutes=1):
    return {"type": "navigation", "url": url, "at": at(minutes)}


ALI_CHAIN = [
    nav(f"https://ad.admitad.com/g/1e8d114494/?subid={CID}&ulp=https%3A%2F%2Faliexpress.ru%2F", 0),
    nav("https://s.click.aliexpress.com/e/_DdOurLink", 0),
    nav(f"https://aliexpress.ru/item/1005001.html?aff_fcid=ourfcid-1&aff_platform=portals-tool&sk=_DdOur&admitad_uid={OURS}", 0),
    nav("https://aliexpress.ru/item/1005001.html?spm=a2g0o.detail", 2),
    nav("https://aliexpress.ru/cart", 5),
]


def run(events, context=None, state=None, now_minutes=60):
    state = state or SessionState()
    signals = DETECTOR.observe(context or ctx(), state, events, T0 + now_minutes * 60_000)
    return state, signals


@pytest.mark.parametrize("merchant,network,chain", [
    ("aliexpress", "admitad", ALI_CHAIN),
    ("nike", "impact", [nav(f"https://nike.sjv.io/c/1234/567890/9565?subId1={CID}&u=https%3A%2F%2Fwww.nike.com%2F", 0),
                        nav("https://www.nike.com/?irclickid=OURCLICK123&irgwc=1", 0),
                        nav("https://www.nike.com/t/air-max", 3)]),
    ("asos", "awin", [nav(f"https://www.awin1.com/cread.php?awinmid=5678&awinaffid=123456&clickref={CID}&ued=https%3A%2F%2Fwww.asos.com%2F", 0),
                      nav("https://www.asos.com/?awc=5678_1732_ours&utm_source=aw", 0),
                      nav("https://www.asos.com/women/", 4)]),
])
def test_clean_chains_produce_no_signal(merchant, network, chain):
    state, signals = run(chain, ctx(merchant, network))
    assert signals == [] and state.state == "active" and state.landed


@pytest.mark.parametrize("url,network,kind", [
    ("https://aliexpress.ru/item/1.html?cjevent=abcdef123456", "cj", "foreign_affiliate_param"),
    ("https://aliexpress.ru/?irclickid=Wc8Tqx0a2xyZ", "impact", "foreign_affiliate_param"),
    ("https://www.awin1.com/cread.php?awinmid=1&ued=https%3A%2F%2Faliexpress.ru%2F", "awin", "foreign_redirect_host"),
    ("https://alii.pub/6abcd1", "epn", "foreign_redirect_host"),
    ("https://aliexpress.ru/?utm_source=aw", "awin", "foreign_affiliate_param"),
    ("https://go.skimresources.com/?url=https%3A%2F%2Faliexpress.ru%2F%3Fsscid%3Dxyz", "skimlinks", "foreign_redirect_host"),
])
def test_foreign_networks_after_landing_overwrite(url, network, kind):
    state, signals = run(ALI_CHAIN + [nav(url, 12)])
    assert state.state == "overwritten"
    assert (signals[0].kind, signals[0].network) == (kind, network)
    assert signals[0].at == T0 + 12 * 60_000
    assert signals[0].evidence["host"]


def test_same_network_other_publisher_both_ways():
    # Our admitad_uid came with the chain: the same value later is ours, another value is not.
    state, signals = run(ALI_CHAIN + [nav(f"https://aliexpress.ru/?admitad_uid={OURS}", 8)])
    assert signals == [] and state.state == "active"
    state, signals = run(ALI_CHAIN + [nav("https://aliexpress.ru/?admitad_uid=ffffffffffffffffffffffffffffffff", 9)])
    assert state.state == "overwritten"
    assert signals[0].network == "admitad" and signals[0].evidence["same_network"] is True
    assert signals[0].evidence["value"].endswith("…")                     # others' values shortened
    # A chain that did not carry our uid: the first value seen after landing is bound as ours.
    chain = [nav(f"https://ad.admitad.com/g/1e8d114494/?subid={CID}", 0), nav("https://aliexpress.ru/", 0)]
    state, signals = run(chain + [nav("https://aliexpress.ru/?admitad_uid=first", 3),
                                  nav("https://aliexpress.ru/?admitad_uid=first", 4)])
    assert signals == [] and state.bound["admitad:admitad_uid"] == "first"
    state, signals = run([nav("https://aliexpress.ru/?admitad_uid=second", 6)], state=state)
    assert state.state == "overwritten"
    # Another publisher's admitad link (not our partner URL prefix) is foreign too.
    state, signals = run(ALI_CHAIN + [nav("https://ad.admitad.com/g/otherhash/?ulp=https%3A%2F%2Faliexpress.ru%2F", 7)])
    assert signals[0].kind == "foreign_redirect_host" and signals[0].evidence["same_network"]


def test_aliexpress_portals_value_of_another_publisher():
    state, signals = run(ALI_CHAIN + [nav("https://aliexpress.ru/item/2.html?aff_fcid=theirs-99&aff_platform=portals-tool", 20)])
    assert state.state == "overwritten" and signals[0].network == "aliexpress_portals"


def test_standdown_marker_is_foreign():
    state, signals = run(ALI_CHAIN + [nav("https://aliexpress.ru/?afsrc=1", 3)])
    assert state.state == "overwritten" and signals[0].evidence["standdown"] is True


def test_promo_codes():
    state, signals = run(ALI_CHAIN + [{"type": "promo_code", "code": "  mega5 ", "at": at(10)}])
    assert signals == [] and state.state == "active"
    state, signals = run(ALI_CHAIN + [{"type": "promo_code", "code": "SAVE10", "at": at(10)}])
    assert state.state == "overwritten"
    assert signals == [Signal("foreign_promo_code", None, {"code": "SAVE10"}, T0 + 600_000, False)]


def test_risks_do_not_change_the_state():
    events = ALI_CHAIN + [nav("https://aliexpress.ru/?gclid=Cj0KCQiA0MG5BhD1ARIsAEcZtwS", 3),
                          {"type": "checkout", "device": "phone-2", "basket_items_before_activation": 2, "at": at(30)},
                          nav("https://aliexpress.ru/store/1102345", 31)]
    state, signals = run(events)
    assert state.state == "active"
    assert [s.kind for s in signals] == ["ad_click_id", "cross_device", "prefilled_basket", "excluded_store"]
    assert signals[0].network == "google_ads"


def test_expiry_and_overwritten_for_good():
    state, signals = run(ALI_CHAIN + [nav("https://aliexpress.ru/cart", 121)], now_minutes=200)
    assert state.state == "expired" and [s.kind for s in signals] == ["session_expired"]
    state, signals = run(ALI_CHAIN + [nav("https://aliexpress.ru/?cjevent=x1234567890", 10),
                                      nav("https://aliexpress.ru/cart", 130)], now_minutes=200)
    assert state.state == "overwritten"
    # Client clocks are clamped: an event "in the future" counts as now, one "before" as creation.
    state, _ = run(ALI_CHAIN + [{"type": "navigation", "url": "https://aliexpress.ru/", "at": "2099-01-01T00:00:00Z"}],
                   now_minutes=30)
    assert state.state == "active"


def test_converted_then_late():
    state, signals = run(ALI_CHAIN + [nav("https://aliexpress.ru/?cjevent=abcdef123456", 10)],
                         context=ctx(converted=True), state=SessionState(state=ClickState.CONVERTED))
    assert state.state == "converted"
    assert signals and all(s.late for s in signals)


@pytest.mark.parametrize("event", [
    {"type": "teleport"}, {"type": "promo_code", "code": 5}, {"type": "checkout", "device": ["x"]},
    {"type": "checkout", "basket_items_before_activation": -1}, {"type": "checkout", "basket_items_before_activation": "2"},
    {"type": "navigation", "url": "https://aliexpress.ru/", "at": ["2026-11-26"]},
    {"type": "checkout", "store_id": {"id": 1}}, {"type": "promo_code", "code": "X", "at": True},
    {"type": "promo_code", "code": "X", "basket_items_before_activation": -5},
    {"type": "checkout", "basket_items_before_activation": 100_001},
])
def test_malformed_events(event):
    with pytest.raises(BadEvent):
        run([event])


@pytest.mark.parametrize("url", [None, 5, "", "not a url", "javascript:alert(1)", "http://[::1", "x" * 100000,
                                 "https://aliexpress.ru/?" + "cjevent=1&" * 1000, "https://aliexpress.ru/?" + "a=1&" * 600])
def test_unparseable_navigation_is_ignored(url):
    run([{"type": "navigation", "url": url}])


# -- diagnosis ----------------------------------------------------------------------------------
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
CREATED = NOW - timedelta(days=3)


def facts(signals=(), conversions=(), bot=False, created=CREATED):
    click = cast(ClickRow, {"created_at": created, "bot": bot, "merchant": "aliexpress"})  # the fields read
    return ClickFacts.build(click, MERCHANTS["aliexpress"], None, list(signals), list(conversions), NOW)


def sig(kind, minutes, network=None, **evidence):
    return {"kind": kind, "network": network, "evidence": evidence, "at": CREATED + timedelta(minutes=minutes),
            "late": False}


def conv(status, commission="10", order_minutes=30, word=None):
    return {"order_id": "A-1", "status": status, "status_word": word or status, "commission": Decimal(commission),
            "cashback": Decimal(commission) / 2, "currency": "RUB",
            "order_time": CREATED + timedelta(minutes=order_minutes)}


def codes(f):
    return [d.code for d in diagnose(f)]


def test_every_diagnosis_code():
    found = diagnose(facts([sig("foreign_affiliate_param", 12, "admitad", same_network=True, param="admitad_uid")]))
    assert found[0].code == "overwritten"
    assert found[0].text.startswith("Admitad link of another publisher") and "12 minutes after activation" in found[0].text
    assert "foreign_promo_code" in codes(facts([sig("foreign_promo_code", 5, code="SAVE10")]))
    assert "prefilled_basket" in codes(facts([sig("prefilled_basket", 5, items=2)]))
    assert "cross_device" in codes(facts([sig("cross_device", 5)]))
    assert "excluded_store" in codes(facts([sig("excluded_store", 5)]))
    assert "ad_click" in codes(facts([sig("ad_click_id", 5, "google_ads")]))
    assert "unreadable_url" in codes(facts([sig("unreadable_url", 5, url="https://[x")]))
    assert "order_after_session" in codes(facts(conversions=[conv("pending", order_minutes=180)]))
    assert "order_declined" in codes(facts(conversions=[conv("declined")]))
    assert "order_reversed" in codes(facts(conversions=[conv("reversed")]))
    assert "zero_commission" in codes(facts(conversions=[conv("approved", "0")]))
    assert "order_approved" in codes(facts(conversions=[conv("approved")]))
    assert "order_pending" in codes(facts(conversions=[conv("pending")]))
    assert "bot_click" in codes(facts(bot=True))
    assert codes(facts()) == ["awaiting_postback"]
    assert codes(facts(created=NOW - timedelta(days=91))) == ["no_postback"]
    assert facts(created=NOW - timedelta(days=91)).state == "expired"
    assert facts([sig("foreign_promo_code", 5, code="X")]).state == "overwritten"
    assert facts(conversions=[conv("pending")]).state == "converted"


@pytest.mark.parametrize("raw", [float("inf"), float("-inf"), float("nan"), 10**40, -5, "2026-13-45T99:99", True, None, [1]])
def test_event_times_from_broken_clocks_are_clamped(raw):
    from tracker.domain.detection import parse_at

    assert T0 <= parse_at(raw, T0, T0 + 1000) <= T0 + 1000


def test_a_flood_of_new_signals_past_the_cap_is_left_out_and_repeats_quote_no_url():
    """A click holding its 100 signals gets no new one, however many a request carries, and the
    detector does not quote (shorten) a URL for a signal it will not keep: only a new signal's first
    sighting carries its URL. The work per request is then the search alone."""
    params = ("cjevent", "awc", "irclickid", "ranmid", "sscid", "tduid")
    state = SessionState()
    first = [nav("https://aliexpress.ru/item/1.html?" + "&".join(f"{p}=v{i}x{j}" for j, p in enumerate(params)), 1)
             for i in range(20)]
    found = DETECTOR.observe(ctx(), state, ALI_CHAIN + first, T0 + 60 * 60_000)
    admitted = admit(tally(found), state.seen)
    assert len(admitted.added) == MAX_PER_CLICK and state.over_cap == 20 * len(params) - MAX_PER_CLICK
    assert all("url" in s.signal.evidence for s in admitted.added)
    again = DETECTOR.observe(ctx(), state, first[:2], T0 + 61 * 60_000)  # seen before: repeats
    repeated = admit(tally(again), state.seen)
    assert repeated.added == [] and len(repeated.repeated) == 2 * len(params)
    assert not any("url" in s.signal.evidence for s in repeated.repeated)
