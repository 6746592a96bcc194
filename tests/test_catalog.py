"""The affiliate catalog: every row's real-looking examples are caught as that network."""
from urllib.parse import quote

import pytest

from tracker.domain.catalog import load_catalog

CATALOG = load_catalog()
EXAMPLES = [(slug, url) for slug, net in CATALOG.networks.items() for url in net.get("examples", [])]


def test_every_network_row_has_examples():
    for slug, net in CATALOG.networks.items():
        assert net.get("examples"), slug
    slugs = set(CATALOG.networks)
    for required in ("cj", "impact", "rakuten", "awin", "shareasale", "partnerize", "pepperjam", "admitad",
                     "epn", "aliexpress_portals", "amazon", "ebay", "skimlinks", "sovrn", "tradedoubler",
                     "tradetracker", "webgains", "avantlink", "clickbank", "a8", "gdeslon", "yandex_market",
                     "ozon", "google_ads", "meta_ads", "microsoft_ads", "tiktok_ads", "yandex_direct", "x_ads"):
        assert required in slugs


@pytest.mark.parametrize("slug,url", EXAMPLES)
def test_example_is_caught_as_its_network(slug, url):
    hits = CATALOG.scan(url)
    assert slug in {h.network for h in hits}, (url, hits)


@pytest.mark.parametrize("url", [
    "https://www.store.example/?utm_source=newsletter&utm_medium=email&utm_campaign=bf",
    "https://www.store.example/?erid=LjN8KQbcd",
    "https://www.store.example/?tag=summer&ref=homepage",
    "https://aliexpress.ru/item/1005001.html?spm=a2g0o.home.0.0&sku_id=1",
    "https://www.store.example/?mtm_campaign=x&pk_kwd=y",
    "https://www.store.example/?tt=CPS_NORMAL",          # AliExpress' word, off AliExpress
    "https://www.store.example/?sk=abc",
])
def test_benign_parameters_are_not_hits(url):
    assert CATALOG.scan(url) == []


def test_names_are_case_insensitive_and_hosts_idna():
    assert {h.network for h in CATALOG.scan("https://www.store.example/?CJEVENT=abc123")} == {"cj"}
    assert {h.network for h in CATALOG.scan("https://WWW.AWIN1.COM/cread.php?awinmid=1")} == {"awin"}
    assert {h.network for h in CATALOG.scan("https://sub.brand.SJV.io/c/1/2/3")} == {"impact"}


def test_url_valued_parameters_are_looked_into_two_levels_deep():
    inner = "https://www.store.example/?cjevent=deadbeef"
    middle = "https://www.awin1.com/cread.php?awinmid=1&ued=" + quote(inner, safe="")
    outer = "https://go.skimresources.com/?id=1&url=" + quote(middle, safe="")
    assert {h.network for h in CATALOG.scan(outer)} == {"skimlinks", "awin", "cj"}
    deeper = "https://redirect.viglink.com/?u=" + quote(outer, safe="")
    assert "cj" not in {h.network for h in CATALOG.scan(deeper)}  # three levels: not followed


@pytest.mark.parametrize("url", ["", "not a url", "javascript:alert(1)", "http://[::1", "https://",
                                 "https://x/?" + "a=1&" * 2000, "https://" + "a" * 10000,
                                 "ftp://ad.admitad.com/g/x", "https://%zz/", "https://ex\u0000ample.com/?cjevent=1"])
def test_hostile_urls_do_not_crash(url):
    CATALOG.scan(url)
