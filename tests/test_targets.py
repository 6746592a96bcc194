"""The open-redirect tricks, one by one: every one is refused, and what passes is canonical."""
import pytest

from tracker.domain.targets import BadTarget, check_target, normalize_pattern

ALLOWED = frozenset(normalize_pattern(p) for p in
                    ["aliexpress.ru", "*.aliexpress.ru", "aliexpress.com", "*.aliexpress.com", "пример.рф"])


@pytest.mark.parametrize("url,expected", [
    ("https://aliexpress.ru/", "https://aliexpress.ru/"),
    ("https://aliexpress.ru", "https://aliexpress.ru/"),
    ("HTTPS://AliExpress.RU/item/1.html?x=1#top", "https://aliexpress.ru/item/1.html?x=1#top"),
    ("http://m.aliexpress.com/item", "http://m.aliexpress.com/item"),
    ("https://a.b.aliexpress.ru/x", "https://a.b.aliexpress.ru/x"),
    ("https://aliexpress.ru:443/x", "https://aliexpress.ru/x"),
    ("https://aliexpress.ru./x", "https://aliexpress.ru/x"),
    ("https://пример.рф/товар", "https://xn--e1afmkfd.xn--p1ai/%D1%82%D0%BE%D0%B2%D0%B0%D1%80"),
    ("https://aliexpress.ru/search?q=чай", "https://aliexpress.ru/search?q=%D1%87%D0%B0%D0%B9"),
])
def test_allowed_targets_are_canonicalised(url, expected):
    assert check_target(url, ALLOWED) == expected


@pytest.mark.parametrize("url", [
    "https://evil.com/",                                   # plainly foreign
    "https://aliexpress.ru.evil.com/",                     # allowed name as a prefix
    "https://evilaliexpress.ru/",                          # allowed name as a suffix without a dot
    "https://aliexpress.ru@evil.com/",                     # userinfo
    "https://user:pass@aliexpress.ru/",                    # userinfo even on the right host
    "https://evil.com\\@aliexpress.ru/",                   # backslash: browsers read evil.com
    "https://evil.com\\.aliexpress.ru/",
    "https:\\\\evil.com/",
    "//evil.com/",                                         # scheme-relative
    "///evil.com/",
    "https:/evil.com/",                                    # missing slash
    "https:evil.com",
    "/path/only",
    "javascript:alert(1)//aliexpress.ru",
    "data:text/html,<script>alert(1)</script>",
    "ftp://aliexpress.ru/",
    "https://aliexpress.ru:8443/",                         # non-default port
    "http://aliexpress.ru:443/",
    "https://aliexpress.ru:99999/",
    "https://aliexpress.ru:abc/",
    "https://aliexpress%2eru/",                            # escaped host
    "https://evil.com%2f.aliexpress.ru/",
    "https://evil.com%00.aliexpress.ru/",
    "https://evil.com\x00.aliexpress.ru/",                # control characters
    "https://aliexpress.ru\t/",
    "https://aliexpress.ru /",
    " https://evil.com/",
    "https://evil.com#.aliexpress.ru/",                    # fragment trick: host is evil.com
    "https://evil.com?.aliexpress.ru/",
    "https://127.0.0.1/",                                  # IP literals
    "https://[::1]/",
    "https://2130706433/",
    "https://evil。com/",                                  # ideographic full stop becomes a dot
    "https://aliexpress.ru%E3%80%82evil.com/",
    "https:///aliexpress.ru/",
    "https://",
    "",
    "https://" + "a" * 64 + ".aliexpress.ru/",              # label too long
    "https://aliexpress.ru/" + "x" * 3000,                 # oversized
    "https://-aliexpress.ru/",
    "https://xn--.aliexpress.ru/",
])
def test_open_redirect_tricks_are_refused(url):
    with pytest.raises(BadTarget):
        check_target(url, ALLOWED)


def test_wildcard_matches_subdomains_not_the_apex():
    only_sub = frozenset({normalize_pattern("*.shop.example")})
    assert check_target("https://m.shop.example/", only_sub) == "https://m.shop.example/"
    with pytest.raises(BadTarget):
        check_target("https://shop.example/", only_sub)
