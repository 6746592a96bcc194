"""Every query parameter of the console's pages and of the admin API's GET endpoints, fuzzed against
`tracker serve` with a signed-in session: each answer is a page, a redirect or the contract's JSON
4xx, never a 500. Names the pages read and names they do not, values of any text, escapes that are
not UTF-8, numbers of any size; hypothesis derandomized, so a run is repeatable."""
from __future__ import annotations

import http.client
import json
from typing import Iterator
from urllib.parse import quote, urlsplit

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tracker.domain.tokens import UserTokens
from tracker.settings import Settings

from .conftest import ADMIN_KEY, BROWSER, SECRET, served
from .test_console import CSRF
from .test_properties import EXAMPLES

pytestmark = pytest.mark.fault  # fuzzes a `tracker serve` process
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
USER = "console-fuzz"


@pytest.fixture(scope="module")
def console(servers, database, redis_prefix, tmp_path_factory) -> Iterator[dict[str, str]]:  # noqa: ANN001
    run = Settings(database_url=database, redis_url=servers[1], data_dir=tmp_path_factory.mktemp("fuzz"),
                   secret=SECRET, admin_key=ADMIN_KEY, redis_prefix=redis_prefix)
    with served(run, env={"TRACKER_ADMIN_KEY": ADMIN_KEY}) as (_, base):
        click = requests.get(f"{base}/go/nike", params={"u": UserTokens(SECRET).mint(USER)}, headers=BROWSER,
                             allow_redirects=False, timeout=10)
        assert click.status_code == 302
        session = requests.Session()
        token = CSRF.findall(session.get(f"{base}/support/login", timeout=10).text)[0]
        signed = session.post(f"{base}/support/login", data={"csrf": token, "key": ADMIN_KEY, "next": "/support/"},
                              allow_redirects=False, timeout=10)
        assert signed.status_code == 303
        cookie = "; ".join(f"{c.name}={c.value}" for c in session.cookies)
        yield {"base": base, "cookie": cookie, "click_id": click.headers["X-Click-Id"]}


PAGES = ["/support/", "/support/users/" + USER, "/support/clicks/{click_id}", "/support/orders", "/support/orphans",
         "/support/overview", "/support/login", "/v1/users/" + USER + "/clicks", "/v1/conversions",
         "/v1/postbacks/orphans", "/v1/clicks/{click_id}", "/v1/events", "/v1/audit"]
NAMES = st.one_of(st.sampled_from(["q", "before", "order_id", "network", "attached", "still", "next", "limit",
                                   "after", "types", "u", "user_id", "actor"]),
                  st.text(max_size=8))
VALUES = st.one_of(st.text(max_size=200),
                   st.sampled_from(["", "0", "1", "3", "-1", "٣", "²", "1e3", " 7", "9" * 30, "%zz", "%ff%fe",
                                    "%00", "/support/x", "//evil.example", "conversion.created,nope"]),
                   st.integers().map(str))


def get(console: dict[str, str], path: str, pairs: list[tuple[str, str]]) -> tuple[int, str, bytes]:
    """One GET with the query exactly as built (an existing `%` is sent as it is: escapes that do not
    decode are part of the fuzz), the session cookie and the admin key."""
    query = "&".join(f"{quote(n, safe='%')}={quote(v, safe='%')}" for n, v in pairs)
    target = path.replace("{click_id}", console["click_id"]) + ("?" + query if query else "")
    conn = http.client.HTTPConnection(urlsplit(console["base"]).netloc, timeout=10)
    try:
        conn.request("GET", target, headers={"Cookie": console["cookie"], "Authorization": f"Bearer {ADMIN_KEY}"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


@FUZZ
@given(path=st.sampled_from(PAGES), pairs=st.lists(st.tuples(NAMES, VALUES), max_size=4))
@example(path="/support/orphans", pairs=[("attached", "1")])
@example(path="/support/orphans", pairs=[("still", "3")])
@example(path="/support/orphans", pairs=[("attached", "²"), ("still", "1")])
def test_no_query_parameter_is_a_500(console, path, pairs):  # noqa: ANN001
    status, kind, body = get(console, path, pairs)
    assert status < 500, (path, pairs, status, body[:300])
    if status >= 400:  # the contract's error, never a bare page or a traceback
        assert kind.startswith("application/json") and "error" in json.loads(body), (path, pairs, body[:300])
