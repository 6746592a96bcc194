"""The wrong-key throttle of the admin API and the console's sign-in: ten wrong keys within the
window from one client, then 429 with Retry-After for every admin request and sign-in from it, the
right key included; counted across app instances through Redis, and per instance while Redis is
down. Each test guesses from its own address (X-Forwarded-For from a trusted proxy) or its own Redis."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path

import pytest

from tracker import embedded, keys
from tracker.app import create_app
from tracker.domain.key_guesses import Guesses, guesser
from tracker.settings import SettingsError, load

from .conftest import ADMIN_KEY, free_port, redis_client
from .test_console import CSRF
from .waiting import until

ORPHANS = "/v1/postbacks/orphans"
WRONG = {"Authorization": "Bearer " + "w" * 40}
RIGHT = {"Authorization": f"Bearer {ADMIN_KEY}"}


def behind_proxy(settings):  # noqa: ANN001, ANN201
    return replace(settings, trusted_proxies=(ip_network("127.0.0.0/8"),))


def via(address: str, headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "X-Forwarded-For": address}


async def sign_in(client, key: str, address: str):  # noqa: ANN001, ANN201
    page = await client.get("/support/login", headers={"X-Forwarded-For": address})
    token = CSRF.findall(await page.text())[0]
    return await client.post("/support/login", data={"csrf": token, "key": key, "next": "/support/"},
                             headers={"X-Forwarded-For": address}, allow_redirects=False)


async def assert_throttled(resp, window: float = 60) -> None:  # noqa: ANN001
    assert resp.status == 429, await resp.text()
    assert (await resp.json())["error"] == "rate_limited"
    assert 1 <= int(resp.headers["Retry-After"]) <= window


@pytest.mark.clustered  # the count in one slot of a Redis Cluster too
async def test_ten_wrong_keys_then_even_the_right_key_gets_429_on_the_api(aiohttp_client, settings):
    client = await aiohttp_client(create_app(behind_proxy(settings)))
    guessing, bystander = "198.51.100.10", "198.51.100.11"
    assert (await client.get(ORPHANS, headers=via(guessing, RIGHT))).status == 200
    for _ in range(10):
        resp = await client.get(ORPHANS, headers=via(guessing, WRONG))
        assert resp.status == 401 and (await resp.json())["error"] == "unauthorized"
    for headers in (RIGHT, WRONG, {}):  # whatever key, or none, and on every admin endpoint
        await assert_throttled(await client.get(ORPHANS, headers=via(guessing, headers)))
        await assert_throttled(await client.get("/v1/events", headers=via(guessing, headers)))
        await assert_throttled(await client.post(ORPHANS + "/reconcile", headers=via(guessing, headers)))
    await assert_throttled(await sign_in(client, ADMIN_KEY, guessing))
    # Another address is not held up, and the throttle's key hash-tags the address for a cluster.
    assert (await client.get(ORPHANS, headers=via(bystander, RIGHT))).status == 200
    shared = redis_client(settings)
    try:
        name = f"{settings.redis_prefix}guesses:{{{guessing}}}"
        assert await shared.zcard(name) == 10
        assert 0 < await shared.pttl(name) <= 60_000  # gone with the window
    finally:
        await shared.aclose()


async def test_ten_wrong_sign_ins_then_the_right_key_gets_429_and_the_api_too(aiohttp_client, settings):
    client = await aiohttp_client(create_app(behind_proxy(settings)))
    guessing = "198.51.100.20"
    for _ in range(10):
        resp = await sign_in(client, "guess-" + "x" * 30, guessing)
        assert resp.status == 401, await resp.text()
    await assert_throttled(await sign_in(client, ADMIN_KEY, guessing))
    await assert_throttled(await client.get(ORPHANS, headers=via(guessing, RIGHT)))
    assert (await sign_in(client, ADMIN_KEY, "198.51.100.21")).status == 303


async def test_a_sign_in_without_a_key_is_not_a_guess(aiohttp_client, settings):
    client = await aiohttp_client(create_app(behind_proxy(settings)))
    for _ in range(12):
        assert (await sign_in(client, "", "198.51.100.25")).status == 401
        assert (await client.get(ORPHANS, headers=via("198.51.100.25", {}))).status == 401
    assert (await sign_in(client, ADMIN_KEY, "198.51.100.25")).status == 303


async def test_the_count_is_shared_by_two_instances_through_redis(aiohttp_client, settings):
    one = await aiohttp_client(create_app(behind_proxy(settings)))
    two = await aiohttp_client(create_app(behind_proxy(settings)))
    guessing = "198.51.100.30"
    for client in (one, two) * 5:
        assert (await client.get(ORPHANS, headers=via(guessing, WRONG))).status == 401
    await assert_throttled(await one.get(ORPHANS, headers=via(guessing, RIGHT)))
    await assert_throttled(await two.get(ORPHANS, headers=via(guessing, RIGHT)))


@pytest.mark.clustered  # the count in one slot of a Redis Cluster too
async def test_a_burst_of_concurrent_guesses_gets_ten_answers_across_instances(aiohttp_client, settings):
    one = await aiohttp_client(create_app(behind_proxy(settings)))
    two = await aiohttp_client(create_app(behind_proxy(settings)))
    guessing = "198.51.100.40"
    answers = await asyncio.gather(*(client.get(ORPHANS, headers=via(guessing, WRONG))
                                     for client in (one, two) * 40))
    statuses = sorted(resp.status for resp in answers)
    assert statuses == [401] * 10 + [429] * 70


async def test_the_right_key_passes_again_once_the_window_has_passed(aiohttp_client, settings):
    client = await aiohttp_client(create_app(replace(behind_proxy(settings), key_guess_window=1.0)))
    guessing = "198.51.100.50"
    for _ in range(10):
        assert (await client.get(ORPHANS, headers=via(guessing, WRONG))).status == 401
    await assert_throttled(await client.get(ORPHANS, headers=via(guessing, RIGHT)), window=1)

    async def admitted() -> bool:
        return (await client.get(ORPHANS, headers=via(guessing, RIGHT))).status == 200
    await until(admitted, "the right key admitted after the window")


async def test_forwarded_addresses_count_only_from_a_trusted_proxy(aiohttp_client, settings):
    client = await aiohttp_client(create_app(settings))  # no trusted proxy: the peer is the client
    for i in range(10):
        assert (await client.get(ORPHANS, headers=via(f"203.0.113.{i}", WRONG))).status == 401
    await assert_throttled(await client.get(ORPHANS, headers=via("203.0.113.99", RIGHT)))


@pytest.mark.fault
async def test_with_redis_stopped_each_instance_keeps_counting_on_its_own(aiohttp_client, settings, tmp_path: Path):
    root = tmp_path / "own-redis"
    url = embedded.start_redis(root, free_port())
    try:
        own = replace(behind_proxy(settings), redis_url=url)
        one = await aiohttp_client(create_app(own))
        two = await aiohttp_client(create_app(own))
        guessing = "198.51.100.60"
        for _ in range(4):  # counted in Redis (and by `one` itself) before it stops
            assert (await one.get(ORPHANS, headers=via(guessing, WRONG))).status == 401
        embedded.stop_redis(root)
        for _ in range(6):
            assert (await one.get(ORPHANS, headers=via(guessing, WRONG))).status == 401
        await assert_throttled(await one.get(ORPHANS, headers=via(guessing, RIGHT)))
        assert one.app[keys.KEY_GUARD].local.wait(guesser(guessing), one.app[keys.KEY_GUARD].clock()) > 0
        # `two` saw none of them: while Redis is down each instance counts only its own.
        assert (await two.get(ORPHANS, headers=via(guessing, RIGHT))).status == 200
        for _ in range(10):
            assert (await two.get(ORPHANS, headers=via(guessing, WRONG))).status == 401
        await assert_throttled(await two.get(ORPHANS, headers=via(guessing, RIGHT)))
    finally:
        embedded.stop_redis(root)


def test_the_in_process_count_keeps_the_newest_ten_per_client():
    guesses = Guesses(limit=10, window=60.0)
    assert [guesses.wrong("a", float(t)) for t in range(10)] == [0.0] * 10
    assert guesses.wait("a", 10.0) == 50.0  # until the oldest of the ten is 60 s old
    assert guesses.wrong("a", 10.0) == 50.0  # refused, not counted: the wait does not grow
    assert guesses.wait("a", 60.0) == 0.0 and guesses.wrong("a", 60.0) == 0.0  # one more try
    assert guesses.wait("a", 60.5) == 0.5
    assert guesses.wait("b", 10.0) == 0.0


def test_an_ipv6_client_is_its_64_network():
    assert guesser("2001:db8:1:2:aaaa::1") == guesser("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert guesser("2001:db8:1:3::1") != guesser("2001:db8:1:2::1")
    assert guesser("::ffff:198.51.100.7") == "198.51.100.7"
    assert guesser("198.51.100.7") == "198.51.100.7"


def test_a_short_admin_key_is_refused_at_start(tmp_path: Path):
    base = {"TRACKER_SECRET": "s" * 32, "TRACKER_DATA_DIR": str(tmp_path)}
    with pytest.raises(SettingsError, match="TRACKER_ADMIN_KEY must be at least 32 characters"):
        load({**base, "TRACKER_ADMIN_KEY": "a" * 31})
    assert load({**base, "TRACKER_ADMIN_KEY": "a" * 32}).admin_key == "a" * 32
    generated = load(base).admin_key  # the development key `make run` generates and prints
    assert len(generated) >= 32 and load(base).admin_key == generated


async def test_a_held_client_cannot_start_the_company_sign_in_either(aiohttp_client, settings):
    from tracker.domain.openid import OpenIDSettings

    # A provider where nothing listens: a client that is not held gets as far as it (503).
    oidc = OpenIDSettings(f"http://127.0.0.1:{free_port()}", "tracker-console", "s" * 32)
    client = await aiohttp_client(create_app(replace(behind_proxy(settings), oidc=oidc)))
    guessing, bystander = "198.51.100.70", "198.51.100.71"
    for _ in range(10):
        assert (await client.get(ORPHANS, headers=via(guessing, WRONG))).status == 401
    await assert_throttled(await client.get("/support/auth/start", headers={"X-Forwarded-For": guessing}))
    resp = await client.get("/support/auth/start", headers={"X-Forwarded-For": bystander}, allow_redirects=False)
    assert resp.status == 503 and resp.headers["Retry-After"] and "cannot be reached" in await resp.text()
