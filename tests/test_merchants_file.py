import asyncio
import copy

import pytest
import yaml

from tracker.domain.merchants import MerchantsFileError, parse_duration, parse_merchants_file
from tracker.domain.profiles import profile_names
from tracker.store.merchants import load, sync

from .conftest import BROWSER, HERE, cli, load_merchants
from .waiting import until

# Also behind PgBouncer in transaction mode (conftest.py)
pytestmark = [pytest.mark.pooled, pytest.mark.clustered]

GOOD = yaml.safe_load((HERE / "merchants.yaml").read_text())


def parse(doc):
    return parse_merchants_file(doc, profile_names())


def test_the_test_and_demo_files_validate():
    assert {m.slug for m in parse(GOOD).merchants} == {"aliexpress", "nike", "asos", "shop", "aliexpress-epn"}
    demo = yaml.safe_load((HERE.parent / "deploy/merchants.example.yaml").read_text())
    assert parse(demo).merchants


@pytest.mark.parametrize("value,seconds", [("5s", 5), ("90m", 5400), ("2h", 7200), ("90d", 7776000)])
def test_durations(value, seconds):
    parsed = parse_duration(value)
    assert parsed == seconds


@pytest.mark.parametrize("value", ["", "2", "2w", "-1h", "0s", "1.5h", "h", None, True, 2.5])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_every_problem_is_named_with_merchant_and_field():
    doc = copy.deepcopy(GOOD)
    ali = doc["merchants"][0]
    ali["partner_url"] = "https://ad.admitad.com/g/x/?ulp={target}"        # no {click_id}
    ali["user_share"] = "1.5"
    ali["session_ttl"] = "2 hours"
    ali["allowed_hosts"] = ["aliexpress.ru", "bad host"]
    nike = doc["merchants"][1]
    nike["network"] = "nosuchnetwork"
    nike["default_target"] = "https://evil.com/"
    nike["user_share"] = "0.7.1"
    doc["merchants"][2]["slug"] = "Bad Slug"
    doc["merchants"].append(copy.deepcopy(doc["merchants"][3]))               # duplicate slug "shop"
    doc["networks"][0]["profile"] = "unknown-profile"
    with pytest.raises(MerchantsFileError) as err:
        parse(doc)
    text = "\n".join(err.value.problems)
    for expected in ("merchant 'aliexpress': partner_url", "merchant 'aliexpress': user_share",
                     "merchant 'aliexpress': session_ttl", "merchant 'aliexpress': allowed_hosts",
                     "merchant 'nike': network", "merchant 'nike': default_target",
                     "merchant 'nike': user_share", "merchant 'Bad Slug': slug",
                     "merchant 'shop': slug: appears more than once", "network 'admitad': profile"):
        assert expected in text, expected


@pytest.mark.parametrize("field,value", [
    ("partner_url", "javascript:alert(1)?{click_id}"),
    ("partner_url", "https://x.example/{click_id}/{unknown}"),
    ("app_url", "javascript:go({click_id})"),
    ("user_share", 1.5),
    ("default_target", "ftp://aliexpress.ru/"),
    ("own_promo_codes", "MEGA5"),
    ("name", ""),
    ("surprise", 1),
])
def test_single_field_problems(field, value):
    doc = copy.deepcopy(GOOD)
    doc["merchants"][0][field] = value
    with pytest.raises(MerchantsFileError) as err:
        parse(doc)
    assert any(f"'aliexpress': {field}" in p for p in err.value.problems)


def test_a_file_with_every_optional_field_validates_with_warnings():
    doc = yaml.safe_load('''
merchants:
  - slug: aliexpress
    name: AliExpress
    network: admitad
    partner_url: "https://ad.admitad.com/g/1e8d114494/?subid={click_id}&ulp={target}"
    default_target: "https://aliexpress.ru/"
    allowed_hosts: ["aliexpress.ru", "*.aliexpress.ru", "aliexpress.com", "*.aliexpress.com"]
    user_share: 0.5
    session_ttl: 2h
    confirmation_window: 90d
    own_promo_codes: ["MEGA5"]
    app_url: "aliexpress://..."
    excluded_stores: ["1102345"]
    network_offer_ids: ["6115", 6116]
''')
    parsed = parse(doc)
    [merchant] = parsed.merchants
    assert str(merchant.user_share) == "0.5" and merchant.network == "admitad"
    assert merchant.network_offer_ids == {"6115", "6116"}
    assert any("user_share" in w for w in parsed.warnings)
    assert any("app_url" in w for w in parsed.warnings)
    assert any("no entry under networks" in w for w in parsed.warnings)


@pytest.mark.parametrize("value", ["6115", ["6115", ""], ["61 15"], ["x" * 129], [["6115"]], [True], ["\u200b"]])
def test_bad_network_offer_ids_are_named(value):
    doc = copy.deepcopy(GOOD)
    doc["merchants"][0]["network_offer_ids"] = value
    with pytest.raises(MerchantsFileError) as err:
        parse(doc)
    assert any(p.startswith("merchant 'aliexpress': network_offer_ids") for p in err.value.problems), err.value.problems


def test_an_offer_id_belongs_to_one_merchant_of_a_network():
    """Two merchants of one network listing the same offer would let either's click id take the
    other's orders: refused. The same id at two networks is two offers."""
    doc = copy.deepcopy(GOOD)
    ali, nike, _, _, epn = doc["merchants"]
    twin = {**ali, "slug": "aliexpress-2", "network_offer_ids": ["6115"]}
    ali["network_offer_ids"] = ["6115", "6116"]
    epn["network_offer_ids"] = ["6115"]
    nike["network_offer_ids"] = ["6115"]
    doc["merchants"].append(twin)
    with pytest.raises(MerchantsFileError) as err:
        parse(doc)
    assert err.value.problems == [
        "merchant 'aliexpress-2': network_offer_ids: '6115' is also listed by 'aliexpress' of network 'admitad'"]
    twin["network_offer_ids"] = ["6117"]
    parsed = parse(doc)
    # ePN's profile reads no offer id: listing them there is allowed, and said to do nothing.
    assert [w for w in parsed.warnings if "network_offer_ids" in w] == [
        "merchant 'nike': network_offer_ids: the impact profile reads no offer id, so its orders are not "
        "checked against them",
        "merchant 'aliexpress-epn': network_offer_ids: the epn profile reads no offer id, so its orders are not "
        "checked against them"]


async def test_offer_ids_are_synced_and_loaded(db):
    doc = copy.deepcopy(GOOD)
    doc["merchants"][0]["network_offer_ids"] = ["6115"]
    report = await sync(db, parse(doc))
    assert report["changed"] == ["aliexpress"]
    merchants, _ = await load(db)
    assert merchants["aliexpress"].network_offer_ids == {"6115"}
    assert (await sync(db, parse(doc)))["changed"] == []
    assert (await sync(db, load_merchants()))["changed"] == ["aliexpress"]
    merchants, _ = await load(db)
    assert merchants["aliexpress"].network_offer_ids == frozenset()


def test_network_needs_credentials():
    doc = copy.deepcopy(GOOD)
    del doc["networks"][0]["token"]
    doc["networks"][1]["allow_ips"] = ["not-a-cidr"]
    with pytest.raises(MerchantsFileError) as err:
        parse(doc)
    assert any("network 'admitad': needs a token" in p for p in err.value.problems)
    assert any("network 'impact': allow_ips" in p for p in err.value.problems)


async def test_sync_reports_changes_and_is_idempotent(db):
    parsed = load_merchants()
    report = await sync(db, parsed)
    assert report["added"] == [] and report["changed"] == []
    assert sorted(report["unchanged"]) == ["aliexpress", "aliexpress-epn", "asos", "nike", "shop"]
    merchants, networks = await load(db)
    assert merchants["aliexpress"].user_share == parsed.merchants[0].user_share
    assert set(networks) == {"admitad", "impact", "epn", "awin", "generic"}


async def _go_status_becomes(client, token: str, status: int) -> None:  # noqa: ANN001
    """Running workers learn of a sync through NOTIFY: poll /go/newshop until it answers `status`."""
    async def answers() -> bool:
        resp = await client.get("/go/newshop", params={"u": token}, allow_redirects=False, headers=BROWSER)
        return resp.status == status
    await until(answers, f"/go/newshop answering {status} after the sync")


async def test_bad_file_changes_nothing_and_names_problems(settings, db, tmp_path):
    before = await db.fetch("SELECT * FROM merchants ORDER BY slug")
    doc = copy.deepcopy(GOOD)
    doc["merchants"][0]["name"] = "AliExpress renamed"       # a valid change ...
    doc["merchants"][1]["user_share"] = "-1"                   # ... next to an invalid one
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc, allow_unicode=True))
    result = await asyncio.to_thread(cli, settings, "merchants", "sync", str(bad))
    assert result.returncode == 1
    assert "merchant 'nike': user_share" in result.stderr
    assert await db.fetch("SELECT * FROM merchants ORDER BY slug") == before
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("merchants: [unclosed")
    result = await asyncio.to_thread(cli, settings, "merchants", "sync", str(garbage))
    assert result.returncode == 1 and "not valid YAML" in result.stderr
    assert await db.fetch("SELECT * FROM merchants ORDER BY slug") == before


async def test_running_workers_see_a_sync_without_restart(client, settings, tokens, db, tmp_path):
    token = tokens.mint("u1")
    resp = await client.get("/go/newshop", params={"u": token}, allow_redirects=False, headers=BROWSER)
    assert resp.status == 404
    doc = copy.deepcopy(GOOD)
    doc["merchants"].append({**doc["merchants"][3], "slug": "newshop", "name": "New Shop"})
    doc["merchants"][0]["partner_url"] = "https://ad.admitad.com/g/changed/?subid={click_id}&ulp={target}"
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    result = await asyncio.to_thread(cli, settings, "merchants", "sync", str(path))
    assert result.returncode == 0, result.stderr
    assert "newshop" in result.stdout
    await _go_status_becomes(client, token, 302)
    resp = await client.get("/go/aliexpress", params={"u": token}, allow_redirects=False, headers=BROWSER)
    assert "/g/changed/" in resp.headers["Location"]
    # A merchant dropped from the file is deactivated: its links answer 404.
    doc["merchants"] = [m for m in doc["merchants"] if m["slug"] != "newshop"]
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    result = await asyncio.to_thread(cli, settings, "merchants", "sync", str(path))
    assert "newshop" in result.stdout
    await _go_status_becomes(client, token, 404)
    await sync(db, load_merchants())  # leave the module's database as it was
