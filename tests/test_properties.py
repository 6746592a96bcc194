"""Property-based tests (hypothesis) of the pure parts: the target-URL check, the click-id codec, the
token signer, the catalog matcher, the postback parser and the money arithmetic.

Examples per property: TRACKER_FUZZ_EXAMPLES (default 200 here; `make fuzz` runs many more)."""
from __future__ import annotations

import os
from decimal import Decimal
from urllib.parse import quote, unquote, urlsplit

import yarl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracker.domain.catalog import load_catalog
from tracker.domain.clickid import InvalidClickId, click_time_ms, is_click_id, new_click_id
from tracker.domain.conversions import MalformedPostback, cashback, money, parse_money, read_postback
from tracker.domain.currencies import MINOR_UNITS, minor_unit
from tracker.domain.merchants import quote_all
from tracker.domain.profiles import profiles
from tracker.domain.targets import BadTarget, check_target, check_target_general, host_allowed, normalize_pattern
from tracker.domain.tokens import UserTokens
from tracker.web.activation import _unquote, parse_query

EXAMPLES = max(int(os.environ.get("TRACKER_FUZZ_EXAMPLES", "20")) * 10, 50)
# Derandomized in `make test`, random in `make fuzz` (the profiles are in conftest.py).
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the target check: never a redirect outside allowed_hosts ------------------------------------------
ALLOWED = frozenset(normalize_pattern(p) for p in ("shop.example", "*.shop.example", "магазин.рф"))
SCHEMES = st.sampled_from(["http", "https", "HTTPS", "hTTp", "javascript", "data", "ftp", "file", "http:http",
                           "https+x", ""])
SEPARATORS = st.sampled_from(["://", ":/", ":", ":\\\\", ":/\\", "://\\", ":////", "%3A%2F%2F", ":\t//"])
HOSTS = st.sampled_from([
    "shop.example", "www.shop.example", "SHOP.example", "shop.example.", "a.b.shop.example", "xn--80aaxitdbjk.xn--p1ai",
    "магазин.рф", "evil.example", "shop.example.evil.example", "evilshop.example", "shop.example%2eevil.example",
    "shop%2eexample", "127.0.0.1", "[::1]", "0x7f.1", "shop.example\u3002evil.example", "ѕhop.example",
    "shop.examp\u200ble", "", "shop..example", "-shop.example", "shop.example:443", "shop.example:8443",
    "shop.example:0", "shop.example:", "shop.example:https",
])
USERINFO = st.sampled_from(["", "user@", "user:pw@", "shop.example@", "evil.example@", "@", "a%40b@", "shop.example:@"])
TAILS = st.lists(st.sampled_from([
    "/", "/p/1", "?q=1", "#frag", "/..", "/%2e%2e/", "\\evil.example", "/\\evil.example", "//evil.example",
    "?next=https://evil.example", "@evil.example", "/path with space", "/ü", "%00", "\n", "?a=%zz", "#@evil.example",
    ";evil.example", "/http://evil.example",
]), max_size=3).map("".join)


@st.composite
def composed_urls(draw: st.DrawFn) -> str:
    return draw(SCHEMES) + draw(SEPARATORS) + draw(USERINFO) + draw(HOSTS) + draw(TAILS)


def _redirect_lands_on_allowed_host(url: str) -> None:
    """What a client does with the Location we send: two independent parsers agree on the host."""
    assert url.startswith(("http://", "https://")), url
    assert "\\" not in url and not any(c in url for c in "\x00\t\n\r ")
    split = urlsplit(url)
    assert split.username is None and split.password is None and "@" not in split.netloc
    assert split.port is None
    assert split.hostname is not None and host_allowed(split.hostname, ALLOWED), url
    parsed = yarl.URL(url)
    assert parsed.raw_host is not None and host_allowed(parsed.raw_host.rstrip("."), ALLOWED), url
    assert parsed.raw_host == split.hostname


@PROPERTY
@given(st.one_of(composed_urls(), st.text(max_size=300)))
def test_a_checked_target_never_leaves_the_allowed_hosts(raw: str) -> None:
    try:
        url = check_target(raw, ALLOWED)
    except BadTarget:
        return
    _redirect_lands_on_allowed_host(url)
    assert check_target(url, ALLOWED) == url  # canonical: checking it again changes nothing


PLAIN_LABELS = st.one_of(st.sampled_from(["www", "m", "a-1", "B2"]), st.text(alphabet="abzAZ09-", max_size=6))
PLAIN_TAIL_CHARS = "/?#:@!$&'()*+,;=-._~%aZ09"
PLAIN_TAILS = st.tuples(st.sampled_from(["", "/", "?", "#", "/p?"]),
                        st.one_of(st.text(alphabet=PLAIN_TAIL_CHARS, max_size=12),
                                  st.text(alphabet=PLAIN_TAIL_CHARS + " \\\x00ü[", max_size=12))).map("".join)


@st.composite
def plain_urls(draw: st.DrawFn) -> str:
    """Deep links near the fast path's edges: its schemes and host characters, any tail."""
    labels = draw(st.lists(PLAIN_LABELS, max_size=2))
    host = ".".join([*labels, draw(st.sampled_from(["shop", "SHOP", "shop", "evil", "", "1"])),
                     draw(st.sampled_from(["example", "EXAMPLE", "example", "example.", "1", "example:443", ""]))])
    return draw(st.sampled_from(["http", "https", "HTTP", "HTTPS", "Https", "ftp"])) + "://" + host + draw(PLAIN_TAILS)


def _checked(raw: str) -> tuple[str, str]:
    try:
        fast = "ok", check_target(raw, ALLOWED)
    except BadTarget:
        fast = "refused", ""
    try:
        general = "ok", check_target_general(raw, ALLOWED)
    except BadTarget:
        general = "refused", ""
    assert fast == general, (raw, fast, general)
    return fast


@PROPERTY
@given(st.one_of(plain_urls(), composed_urls(), st.text(max_size=300)))
def test_the_fast_target_check_answers_as_the_general_one(raw: str) -> None:
    """check_target answers the common deep link without urlsplit; on any input it must answer
    exactly as the general path (urlsplit and every check) does: the same URL or a refusal."""
    _checked(raw)


def test_the_fast_target_check_takes_the_common_deep_links() -> None:
    assert _checked("https://shop.example/item/1.html?sku=2#top") == ("ok", "https://shop.example/item/1.html?sku=2#top")
    assert _checked("HTTPS://WWW.Shop.Example?q=1") == ("ok", "https://www.shop.example/?q=1")
    assert _checked("https://shop.example/p?#") == ("ok", "https://shop.example/p")
    assert _checked("https://a-1.shop.example") == ("ok", "https://a-1.shop.example/")
    for refused in ("https://shop.example.evil.example/", "https://1.2.3.4/", "https://-a.shop.example/",
                    "https://shop.example:8443/", "https://x" + "y" * 63 + ".shop.example/"):
        assert _checked(refused) == ("refused", ""), refused


@PROPERTY
@given(st.sampled_from(["shop.example", "www.shop.example", "магазин.рф"]),
       st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40))
def test_allowed_targets_with_any_path_pass_and_stay_allowed(host: str, path: str) -> None:
    raw = f"https://{host}/{path}"
    try:
        url = check_target(raw, ALLOWED)
    except BadTarget:
        # Only what a browser might read differently is refused: spaces, controls, backslashes.
        assert any(c in path for c in "\\ \x7f") or any(ord(c) < 0x20 for c in path)
        return
    _redirect_lands_on_allowed_host(url)


# -- click ids ---------------------------------------------------------------------------------------
MS = st.integers(min_value=0, max_value=(1 << 46) - 1)


@PROPERTY
@given(st.one_of(st.text(max_size=300), st.text(st.characters(max_codepoint=127), max_size=300), composed_urls(),
                 st.text(st.sampled_from("%:/?=&aZ09-._~+ #é"), max_size=40)))
def test_the_partner_link_quoting_is_urllib_quote_with_nothing_safe(value: str) -> None:
    """partner_link puts the target into the network's URL with quote_all, a table-driven
    quote(value, safe=""): the two agree on any text, ASCII or not."""
    assert quote_all(value) == quote(value, safe="")


QUERY_TEXT = st.text(st.sampled_from("uto=&+%2Fzz41FFC3A9D6a é\x00;?"), max_size=40)
ESCAPED_TEXT = st.lists(st.sampled_from(["%3A", "%2F", "%3F", "%3D", "%26", "%25", "%3a", "%2", "%", "%%", "%C3", "%A9",
                                        "a", "/", "é", "3A", "2F", "+"]), max_size=20).map("".join)


@PROPERTY
@given(st.one_of(ESCAPED_TEXT, st.text(max_size=60)))
def test_the_go_unescaping_is_urllib_unquote(value: str) -> None:
    """/go unescapes a field by str.replace of a URL's delimiters when that decodes it all, else by
    a table of ASCII escapes, else by urllib: the same as unquote on any text."""
    assert _unquote(value) == unquote(value)


@PROPERTY
@given(st.one_of(QUERY_TEXT, st.text(max_size=60).filter(lambda q: "#" not in q)))
def test_the_go_query_parser_reads_what_aiohttp_reads(query_string: str) -> None:
    """/go parses its query string itself: the same first values and the same repeated names as
    aiohttp's request.query (a yarl MultiDict) on any query string."""
    expected = yarl.URL.build(path="/go/x", query_string=query_string, encoded=True).query
    values, repeated = parse_query(query_string)
    assert values == {name: expected[name] for name in expected}
    assert (repeated or set()) == {name for name in expected if len(expected.getall(name)) > 1}


@given(MS)
def test_click_id_time_round_trips(ms: int) -> None:
    click_id, created = new_click_id(ms)
    assert created == ms and click_time_ms(click_id) == ms and is_click_id(click_id)
    assert len(click_id) == 22 and click_id[0].isalpha()
    assert set(click_id) <= set("-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz")


@PROPERTY
@given(MS, MS)
def test_click_ids_sort_by_time(a: int, b: int) -> None:
    first, second = new_click_id(a)[0], new_click_id(b)[0]
    if a < b:
        assert first < second
    elif a > b:
        assert first > second


@PROPERTY
@given(st.text(max_size=40))
def test_any_text_is_a_click_id_or_refused_cleanly(text: str) -> None:
    try:
        ms = click_time_ms(text)
    except InvalidClickId:
        assert not is_click_id(text)
        return
    assert is_click_id(text) and 0 <= ms < (1 << 46)
    assert new_click_id(ms)[0][:8] == text[:8]  # the time part is the canonical encoding of ms


# -- tokens -----------------------------------------------------------------------------------------
USER_IDS = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@:.-",
                   min_size=1, max_size=64)
SIGNER = UserTokens("property-secret-0123456789")


@PROPERTY
@given(USER_IDS, st.data())
def test_tokens_verify_only_unaltered(user_id: str, data: st.DataObject) -> None:
    token = SIGNER.mint(user_id)
    assert SIGNER.verify(token) == user_id
    assert UserTokens("another-secret-0123456789").verify(token) is None
    i = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    replacement = data.draw(st.characters(codec="ascii").filter(lambda c: c != token[i]))
    forged = token[:i] + replacement + token[i + 1:]
    verified = SIGNER.verify(forged)
    # Changing the user id part yields another (unsigned) user; changing the signature, nothing.
    assert verified is None


@PROPERTY
@given(st.text(max_size=120))
def test_any_text_is_not_a_token(text: str) -> None:
    assert SIGNER.verify(text) is None


# -- the affiliate catalog matcher ---------------------------------------------------------------------
CATALOG = load_catalog()
EXAMPLE_URLS = [(slug, url) for slug, net in CATALOG.networks.items() for url in net.get("examples", [])]


@PROPERTY
@given(st.text(max_size=400))
def test_the_catalog_scans_any_text_without_error(text: str) -> None:
    for hit in CATALOG.scan(text):
        assert hit.kind in ("param", "marker", "host", "standdown")


@PROPERTY
@given(st.sampled_from(EXAMPLE_URLS), st.sampled_from(["", "&utm_source=x", "#top", "&a=%zz&b"]))
def test_catalog_examples_are_caught_whatever_follows(example: tuple[str, str], tail: str) -> None:
    slug, url = example
    glue = "&" if "?" in url and tail.startswith("&") else ("?" + tail[1:] if tail.startswith("&") else tail)
    found = {hit.network for hit in CATALOG.scan(url + (glue if tail else ""))}
    assert slug in found, (slug, url, tail)


@PROPERTY
@given(st.sampled_from(EXAMPLE_URLS))
def test_a_catalog_example_nested_as_a_redirect_parameter_is_caught(example: tuple[str, str]) -> None:
    from urllib.parse import quote

    slug, url = example
    wrapper = "https://redirect.example/out?url=" + quote(url, safe="")
    assert slug in {hit.network for hit in CATALOG.scan(wrapper)}


# -- postbacks and money ----------------------------------------------------------------------------
PROFILES = profiles()
NAMES = sorted({n for p in PROFILES.values() for names in p.params.values() for n in names} | {"token", "x"})
VALUES = st.one_of(st.text(max_size=30), st.decimals(allow_nan=True, allow_infinity=True).map(str),
                   st.sampled_from(["pending", "approved", "declined", "reversed", "1", "0", "-1", "1e9",
                                    "NaN", "Infinity", "1,5", " 12.50 ", "2026-11-26T10:00:00Z", "1795660800",
                                    "99999999999999999999", "USD", "usd", "XXXX", ""]))


@PROPERTY
@given(st.sampled_from(sorted(PROFILES)), st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=10))
def test_any_postback_parameters_read_or_are_refused_cleanly(profile: str, params: dict[str, str]) -> None:
    try:
        pb = read_postback(params, PROFILES[profile])
    except MalformedPostback:
        return
    assert pb.status in ("pending", "approved", "declined", "reversed")
    assert pb.order_id and pb.order_id.isprintable()
    for amount in (pb.commission, pb.amount):
        assert amount is None or (isinstance(amount, Decimal) and amount.is_finite() and amount >= 0)
    # A postback that names no currency leaves it to the order (or the default for a new one).
    assert pb.currency is None or pb.currency in MINOR_UNITS  # ISO 4217 only, upper case
    terms = pb.terms(None)
    assert len(terms.currency) == 3 and terms.currency.isupper() and terms.commission >= 0


AMOUNTS = st.decimals(min_value=0, max_value=10**9, allow_nan=False, allow_infinity=False, places=4)
SHARES = st.decimals(min_value=0, max_value=1, allow_nan=False, allow_infinity=False, places=4)
CURRENCIES = st.sampled_from(["USD", "EUR", "RUB", "JPY", "KWD", "BHD", "GBP"])


@PROPERTY
@given(AMOUNTS, SHARES, CURRENCIES)
def test_cashback_is_exact_bounded_and_rounded_to_the_minor_unit(commission: Decimal, share: Decimal,
                                                                 currency: str) -> None:
    owed = cashback(commission, share, currency, "approved")
    exact = commission * share
    quantum = Decimal(1).scaleb(-minor_unit(currency))
    assert abs(owed - exact) <= quantum / 2  # half-up to the minor unit, never more than half off
    assert owed.as_tuple().exponent == -minor_unit(currency)
    assert 0 <= owed <= commission.quantize(quantum) + quantum
    assert cashback(commission, share, currency, "declined") == 0
    assert cashback(commission, share, currency, "reversed") == 0
    shown = money(owed, currency)
    assert shown is not None and Decimal(shown) == owed  # the JSON string is the same number


@PROPERTY
@given(st.text(max_size=40))
def test_money_parsing_accepts_only_plain_non_negative_decimals(raw: str) -> None:
    try:
        value = parse_money(raw, "amount")
    except MalformedPostback:
        return
    assert value.is_finite() and value >= 0
    assert value == Decimal(raw.strip())
