"""An overwrite hidden by padding: a landing URL of hundreds of empty fields, or one junk parameter of
kilobytes, before the foreign parameter. Every navigation URL up to the body's limit is searched in
full; one that cannot be parsed at all is an `unreadable_url` risk, never silently clean."""
from __future__ import annotations

from urllib.parse import quote

import orjson
import pytest

from .test_detection import ALI_CHAIN, nav, run
from .test_observe import activate, observe

FOREIGN = "cjevent=abc1234567890"  # CJ's landing parameter: another network
THEIRS = "admitad_uid=ffffffffffffffffffffffffffffffff"  # another publisher on our own network (Admitad)
PADDINGS = {
    "500 ampersands": "&" * 500,
    "an 8 KB junk parameter": "junk=" + "x" * 8192 + "&",
    "20,000 empty fields": "a=&" * 20_000,
}


@pytest.mark.parametrize("padding", PADDINGS.values(), ids=PADDINGS.keys())
@pytest.mark.parametrize("param,network,same_network", [(FOREIGN, "cj", False), (THEIRS, "admitad", True)],
                         ids=["foreign network", "our network, another publisher"])
def test_a_padded_landing_url_is_searched_in_full(padding, param, network, same_network):
    state, signals = run(ALI_CHAIN + [nav(f"https://aliexpress.ru/item/1.html?{padding}{param}", 12)])
    assert state.state == "overwritten"
    [signal] = signals
    assert (signal.kind, signal.network) == ("foreign_affiliate_param", network)
    assert bool(signal.evidence.get("same_network")) is same_network
    assert len(str(signal.evidence["url"])) <= 512  # the evidence is a summary, not the padding


def test_padding_inside_a_nested_url_and_in_the_fragment():
    nested = quote(f"https://aliexpress.ru/?{'&' * 800}{FOREIGN}", safe="")
    state, signals = run(ALI_CHAIN + [nav(f"https://aliexpress.ru/?ulp={nested}", 12)])
    assert state.state == "overwritten" and signals[0].network == "cj"
    state, signals = run(ALI_CHAIN + [nav(f"https://aliexpress.ru/#{'&' * 800}{FOREIGN}", 12)])
    assert state.state == "overwritten" and signals[0].network == "cj"


@pytest.mark.parametrize("url", ["https://[aliexpress.ru/?" + FOREIGN, "http://[::1", "aliexpress.ru/?" + FOREIGN,
                                 "https:///?" + FOREIGN, "https://aliexpress.ru/?awc=1\u0000", ""])
def test_a_url_that_cannot_be_parsed_is_an_unreadable_url_risk(url):
    state, signals = run(ALI_CHAIN + [nav(url, 12)])
    assert state.state == "active"  # a risk: the state does not change
    [signal] = signals
    assert (signal.kind, signal.network) == ("unreadable_url", None)
    assert len(str(signal.evidence["url"])) <= 200


@pytest.mark.parametrize("url", [12345, None, True, ["https://aliexpress.ru/?" + FOREIGN], {"href": FOREIGN}],
                         ids=["a number", "null", "true", "a list", "an object"])
def test_a_navigation_whose_url_is_not_text_is_an_unreadable_url_risk(url):
    state, signals = run(ALI_CHAIN + [nav(url, 12)])
    assert state.state == "active"
    [signal] = signals
    assert (signal.kind, signal.network) == ("unreadable_url", None)
    assert signal.evidence["url"] == orjson.dumps(url).decode()


def test_a_navigation_without_a_url_is_an_unreadable_url_risk():
    event = nav("x", 12)
    del event["url"]
    state, signals = run(ALI_CHAIN + [event])
    assert state.state == "active" and [s.kind for s in signals] == ["unreadable_url"]


@pytest.mark.parametrize("url", ["about:blank", "chrome://newtab/", "javascript:alert(1)", "data:text/html,hi"])
def test_pages_that_are_not_web_pages_are_not_risks(url):
    state, signals = run(ALI_CHAIN + [nav(url, 12)])
    assert signals == [] and state.state == "active"


@pytest.mark.parametrize("param,network", [(FOREIGN, "cj"), (THEIRS, "admitad")])
async def test_an_overwrite_at_the_end_of_a_url_near_the_body_limit_is_seen(client, tokens, param, network):
    user = f"pad-{network}"
    cid, location = await activate(client, tokens, user)
    chain = [{"type": "navigation", "url": location},
             {"type": "navigation", "url": f"https://aliexpress.ru/item/1.html?admitad_uid=ours{'0' * 28}"}]
    assert (await observe(client, tokens, user, cid, chain)).status == 200
    padded = f"https://aliexpress.ru/item/1.html?junk={'x' * 60_000}&{'&' * 2_000}{param}"
    resp = await observe(client, tokens, user, cid, [{"type": "navigation", "url": padded}])
    assert resp.status == 200
    body = await resp.json()
    assert body["state"] == "overwritten"
    assert [(s["kind"], s["network"]) for s in body["signals"]] == [("foreign_affiliate_param", network)]


def test_a_foreign_parameter_in_a_hash_routes_query_is_seen():
    """A single-page store routes on the fragment (`#/item/1?cjevent=…`) and its scripts read the
    route's query: the fragment was split on `&` only, so the first name there was `/item/1?cjevent`."""
    for url in (f"https://aliexpress.ru/#/item/1?{FOREIGN}", f"https://aliexpress.ru/#/item/1?x=1&{FOREIGN}"):
        state, signals = run(ALI_CHAIN + [nav(url, 12)])
        assert state.state == "overwritten" and [(s.kind, s.network) for s in signals] == [
            ("foreign_affiliate_param", "cj")], url
