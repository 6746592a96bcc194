import re
import time

import pytest

from tracker.domain.bots import is_bot
from tracker.domain.clickid import InvalidClickId, click_time_ms, is_click_id, new_click_id
from tracker.domain.tokens import InvalidUserId, UserTokens


def test_click_ids_are_unique_url_safe_and_start_with_a_letter():
    ids = {new_click_id()[0] for _ in range(20_000)}
    assert len(ids) == 20_000
    for cid in list(ids)[:500]:
        assert re.fullmatch(r"[0-9A-Za-z_-]{1,32}", cid)
        assert cid[0].isalpha()


def test_click_id_carries_its_time_and_sorts_by_it():
    now = time.time_ns() // 1_000_000
    earlier, _ = new_click_id(now - 5)
    later, ms = new_click_id(now)
    assert click_time_ms(later) == ms == now
    assert click_time_ms(earlier) == now - 5
    assert earlier < later
    far = [new_click_id(now + d)[0] for d in (0, 1, 1000, 86_400_000, 10 * 365 * 86_400_000)]
    assert far == sorted(far)


@pytest.mark.parametrize("bad", ["", "short", "x" * 22, "FP7L5uD_SgMHS98lWOSSO!", "-" * 22,
                                 "FP7L5uD_SgMHS98lWOSSOW" + "x"])
def test_malformed_click_ids_are_refused(bad):
    assert not is_click_id(bad)
    with pytest.raises((InvalidClickId, ValueError)):
        click_time_ms(bad)


def test_non_canonical_last_character_is_not_an_id():
    cid, _ = new_click_id()
    alphabet = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
    variants = [cid[:-1] + c for c in alphabet if c != cid[-1]]
    assert sum(is_click_id(v) for v in variants) == 3  # 2 padding bits: 4 canonical endings


def test_tokens_round_trip_and_refuse_forgeries():
    tokens = UserTokens("a-secret-of-enough-length")
    token = tokens.mint("user-42")
    assert tokens.verify(token) == "user-42"
    assert tokens.verify("user-43" + token[len("user-42"):]) is None
    assert tokens.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert UserTokens("another-secret-entirely").verify(token) is None
    for bad in (None, "", ".", "user-42.", token + "x", "a" * 500, "user 42." + token.split(".")[-1]):
        assert tokens.verify(bad) is None
    dotted = tokens.mint("a.b@c")
    assert tokens.verify(dotted) == "a.b@c"
    with pytest.raises(InvalidUserId):
        tokens.mint("bad user")


@pytest.mark.parametrize("ua", [
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "Twitterbot/1.0", "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "TelegramBot (like TwitterBot)", "WhatsApp/2.23.20.0", "Mozilla/5.0 (compatible; Discordbot/2.0)",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mastodon/4.2.0 (http.rb/5.1.1; +https://mastodon.social/)", "curl/8.5.0", "",
    "Mozilla/5.0 (compatible; YandexBot/3.0)", "Mozilla/5.0 (compatible; bingbot/2.0)",
])
def test_link_preview_bots_are_recognised(ua):
    assert is_bot(ua)


@pytest.mark.parametrize("ua", [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Version/17.0 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B; wv) AppleWebKit/537.36 Chrome/130.0 Mobile Safari/537.36",
])
def test_browsers_are_not_bots(ua):
    assert not is_bot(ua)


def test_forked_workers_do_not_repeat_ids():
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, "\n".join(new_click_id()[0] for _ in range(200)).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    child = set(b"".join(chunks).decode().split("\n"))
    parent = {new_click_id()[0] for _ in range(200)}
    assert len(child) == 200 and not child & parent
    assert {c[8:] for c in child}.isdisjoint({c[8:] for c in parent})  # random parts differ too


def test_token_cache_keeps_only_valid_tokens():
    tokens = UserTokens("a-secret-of-enough-length")
    good = tokens.mint("cached")
    assert tokens.verify(good) == tokens.verify(good) == "cached"
    assert tokens.verify("cached.AAAAAAAAAAAAAAAAAAAAAA") is None
    assert list(tokens._seen) == [good]
