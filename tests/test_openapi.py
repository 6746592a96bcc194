"""The OpenAPI document: it agrees with the app's routes, it is served, and schemathesis fuzzes every
operation of the running service against it (no 5xx; every response as documented).

Examples per operation: TRACKER_FUZZ_EXAMPLES (default 20 in `make test`; `make fuzz` runs many more).
"""
from __future__ import annotations

import itertools
import os
from importlib import resources
from typing import Any, Iterator

import hypothesis
import pytest
import requests
import schemathesis
import yaml
from requests.structures import CaseInsensitiveDict
from schemathesis.checks import CheckFunction
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tracker.app import create_app
from tracker.domain.tokens import UserTokens
from tracker.settings import Settings

from .conftest import ADMIN_KEY, BROWSER, SECRET, served

SPEC: dict[str, Any] = yaml.safe_load(resources.files("tracker.data").joinpath("openapi.yaml").read_text())
EXAMPLES = int(os.environ.get("TRACKER_FUZZ_EXAMPLES", "20"))
METHODS = {"get", "post", "head", "put", "patch", "delete", "options"}
FUZZ_USER = "fuzz-user"


def test_the_spec_is_a_valid_openapi_3_document():
    from openapi_spec_validator import validate

    validate(SPEC)  # raises with the offending path when it is not


def test_the_spec_and_the_routes_agree(settings):
    app = create_app(settings)
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        routes.add((route.method.lower(), path))
    # The support console (/support/...) is a browser UI, not an API: its pages are HTML behind a
    # session cookie, described in docs/api.md and tested in test_console*.py, with a real browser.
    routes = {(method, path) for method, path in routes if not (path or "").startswith("/support")}
    documented = {(method, path) for path, item in SPEC["paths"].items() for method in item if method in METHODS}
    assert routes == documented


def test_every_operation_documents_its_errors_as_json():
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            for status, response in op["responses"].items():
                if status.startswith("4") and method != "head":
                    ref = response.get("$ref", "")
                    assert ref.startswith("#/components/responses/"), (method, path, status)
                    target = SPEC["components"]["responses"][ref.rsplit("/", 1)[1]]
                    schema = target["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}


def test_every_admin_operation_documents_the_wrong_key_throttle():
    """Every operation behind an admin credential answers 401, 403 and the wrong-key throttle's 429
    (ten wrong keys from one address lock it out of every admin request): an operation added without
    them is found here, not by a client."""
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            if method in METHODS and {"adminKey": []} in op.get("security", []):
                responses = op["responses"]
                assert {"401", "403", "429"} <= set(responses), (method, path)
                assert responses["429"] == {"$ref": "#/components/responses/KeyGuessesThrottled"}, (method, path)


async def test_the_spec_is_served_as_json(client):
    resp = await client.get("/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert await resp.json() == SPEC


# -- schemathesis against the running service -----------------------------------------------------
@pytest.fixture(scope="module")
def live(servers, database, redis_prefix, tmp_path_factory) -> Iterator[dict[str, str]]:
    settings = Settings(database_url=database, redis_url=servers[1], data_dir=tmp_path_factory.mktemp("live"),
                        secret=SECRET, admin_key=ADMIN_KEY, redis_prefix=redis_prefix)
    # Rate limits on, as in production, but high enough that the fuzzer's own traffic stays under.
    # Each example comes from an address of its own (X-Forwarded-For from the loopback proxy), so the
    # fuzzer's wrong keys never add up to the wrong-key throttle, which would then answer every admin
    # request 429 and the fuzzer would never reach past authentication.
    env = {"TRACKER_ADMIN_KEY": ADMIN_KEY, "TRACKER_TRUSTED_PROXIES": "127.0.0.1/32", "TRACKER_RATE_LIMIT_USER": "100000",
           "TRACKER_RATE_LIMIT_IP": "1000000", "TRACKER_RATE_LIMIT_OBSERVE_USER": "100000"}
    with served(settings, env=env) as (_, base):
        token = UserTokens(SECRET).mint(FUZZ_USER)
        resp = requests.get(f"{base}/go/nike", params={"u": token}, headers=BROWSER, allow_redirects=False,
                            timeout=10)
        assert resp.status_code == 302
        yield {"base": base, "token": token, "click_id": resp.headers["X-Click-Id"]}


# Refusing schema-violating input with 413 (a body over 64 KiB) or 408 is as right as a 400.
CONFIG = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {
    "expected-statuses": [400, 401, 403, 404, 405, 406, 408, 409, 413, 415, 422, 428, 429]}}})
SCHEMA = schemathesis.openapi.from_dict(SPEC, config=CONFIG)
OPERATIONS = [(op.method.upper(), op.path) for op in (r.ok() for r in SCHEMA.get_all_operations())]  # type: ignore[union-attr]  # an Err fails here, as it should
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
# "Every schema-valid request is accepted" cannot hold here by design: a `to` off the merchant's
# allowed hosts, a postback without an order id under its profile's name, or an event whose fields
# contradict each other are valid by the schema and refused with a JSON 400. Every other
# check (no 5xx, negative data refused, status codes, content types, headers, bodies) applies.
SEMANTIC: list[CheckFunction] = [positive_data_acceptance]


ADDRESSES = itertools.count(1)  # one client address per fuzzed request


def _credentials(method: str, path: str, live: dict[str, str]) -> dict[str, Any]:
    """Real credentials and real names for an operation, so that the fuzzer reaches past
    authentication into the parameter checks, the postback parser and the overwrite detector."""
    if path == "/go/{merchant}":
        return {"path_parameters": {"merchant": "nike"}, "query": {"u": live["token"]}}
    if path.startswith("/postback/"):
        fixed: dict[str, Any] = {"path_parameters": {"network": "generic"}}
        if method == "GET":
            fixed["query"] = {"token": "test-generic-token"}
        return fixed
    if path in ("/v1/observe", "/v1/clicks/{click_id}/events"):
        return {"headers": {"Authorization": f"Bearer {live['token']}"}}
    if path == "/v1/clicks/{click_id}" or path.startswith(("/v1/users/", "/v1/conversions", "/v1/postbacks/", "/v1/events",
                                                            "/v1/audit")):
        return {"headers": {"Authorization": f"Bearer {ADMIN_KEY}"}}
    return {}


def _takes_input(method: str, path: str) -> bool:
    item = SPEC["paths"][path]
    return bool(item.get("parameters") or item[method.lower()].get("parameters")
                or item[method.lower()].get("requestBody"))


# Negative data (violating the spec) only where an operation takes any input to violate.
CASES = [(method, path, credentials, mode) for method, path in OPERATIONS for credentials in (False, True)
         for mode in MODES if mode == schemathesis.GenerationMode.POSITIVE or _takes_input(method, path)]


@pytest.mark.fault  # fuzzes a `tracker serve` process
@pytest.mark.parametrize(("method", "path", "credentials", "mode"), CASES,
                         ids=[f"{m} {p} {'credentials' if c else 'stranger'} {g.value}" for m, p, c, g in CASES])
def test_fuzz_every_operation(live, method, path, credentials, mode):
    """Whatever a client sends, valid by the spec or not, with or without credentials: never a 5xx,
    and every response (status, content type, headers, body) as the spec documents it."""
    fixed = _credentials(method, path, live) if credentials else {}
    strategy = SCHEMA[path][method].as_strategy(generation_mode=mode, **fixed)

    @hypothesis.given(case=strategy)
    # Derandomized in `make test`, random in `make fuzz` (the profiles are in conftest.py).
    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
    def fuzz(case: schemathesis.Case[Any]) -> None:
        if credentials and path == "/v1/observe" and isinstance(case.body, dict):
            case.body = {**case.body, "click_id": live["click_id"]}  # a click of this user
        n = next(ADDRESSES)
        headers: CaseInsensitiveDict[Any] = CaseInsensitiveDict(case.headers or {})
        headers["X-Forwarded-For"] = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        case.headers = headers
        case.call_and_validate(base_url=live["base"], excluded_checks=SEMANTIC, allow_redirects=False, timeout=10)

    fuzz()


def _param(path: str, method: str, name: str) -> dict[str, Any]:
    item = SPEC["paths"][path]
    params = [SPEC["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p
              for p in item.get("parameters", []) + item[method].get("parameters", [])]
    [found] = [p for p in params if p["name"] == name]
    schema: dict[str, Any] = found["schema"]
    return SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema


def test_the_spec_states_the_limits_the_code_enforces():
    """The limits a client builds against are the code's own constants: a spec that allows what the
    code refuses (once, 256-character order ids against 128) fails here, not at a client."""
    from tracker.domain import clickid, conversions
    from tracker.web import activation, event_feed, lookups, observe

    assert _param("/postback/{network}", "get", "order_id")["maxLength"] == conversions.MAX_ID
    assert _param("/v1/conversions", "get", "order_id")["maxLength"] == lookups.MAX_ORDER_ID == conversions.MAX_ID
    assert _param("/v1/conversions", "get", "network")["maxLength"] == lookups.MAX_NETWORK
    assert _param("/go/{merchant}", "get", "device")["maxLength"] == activation.MAX_DEVICE
    page = _param("/v1/users/{user_id}/clicks", "get", "limit")
    assert (page["maximum"], page["default"]) == (lookups.MAX_PAGE, lookups.DEFAULT_PAGE)
    feed = _param("/v1/events", "get", "limit")
    assert (feed["maximum"], feed["default"]) == (event_feed.MAX_LIMIT, event_feed.DEFAULT_LIMIT)
    assert clickid.LENGTH <= _param("/v1/clicks/{click_id}", "get", "click_id")["maxLength"] == 32
    body = SPEC["paths"]["/v1/observe"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body = SPEC["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]] if "$ref" in body else body
    assert body["properties"]["events"]["maxItems"] == observe.MAX_EVENTS
