"""Support agents signing in to the console through a real OpenID Connect provider: the certified
`oidc-provider` package (tests/oidc/, pinned in its package-lock.json) run with Debian's node, its
development login form driven by Playwright in Debian's chromium, against `tracker serve`.

Each role signs in and sees what its scopes allow and its name in the header; an agent without a
role gets the refusal page; sign-out ends the session; a callback this browser did not start, a
wrong state, a replayed code, a tampered or foreign ID token and a wrong issuer are each refused."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit, urlunsplit

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey

from tracker.domain.openid import (
    BadIDToken,
    FlowKeys,
    OpenIDSettings,
    UnknownKey,
    agent_name,
    authorization_url,
    load_openid,
    roles_of,
    verify_id_token,
)
from tracker.settings import Settings
from tracker.store.openid import JWKS_REFRESH, CodeRefused, Provider, ProviderUnavailable

from .conftest import ADMIN_KEY, SECRET, free_port, served
from .test_console_browser import ARGS, CHROMIUM, _insert_click, _run, shot
from .waiting import until_blocking

pytestmark = [pytest.mark.fault, pytest.mark.browser]
HERE = Path(__file__).parent / "oidc"
CLIENT_ID = "tracker-console"
CLIENT_SECRET = "console-secret-ABCDEF-0123456789"
USER = "shopper-oidc-1"


def _npm_ci() -> None:
    """tests/oidc/node_modules as package-lock.json pins it (`make test` does this; here for a bare pytest)."""
    if not (HERE / "node_modules" / "oidc-provider").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE, check=True,
                       timeout=300)


class OIDCProvider:
    """`node provider.mjs` running, with its port and the issuer it publishes."""

    def __init__(self, redirect_uris: list[str], issuer_host: str = "127.0.0.1") -> None:
        uris = [arg for uri in redirect_uris for arg in ("--redirect-uri", uri)]
        self.proc = subprocess.Popen(
            ["node", "provider.mjs", *uris, "--client-id", CLIENT_ID,
             "--client-secret", CLIENT_SECRET, "--issuer-host", issuer_host],
            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # one line once it listens, or EOF if it died
        assert line, f"the OpenID provider did not start (exit {self.proc.wait(10)})"
        info = json.loads(line)
        self.port: int = info["port"]
        self.issuer: str = info["issuer"]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _oidc_env(issuer: str) -> dict[str, str]:
    return {"TRACKER_OIDC_ISSUER": issuer, "TRACKER_OIDC_CLIENT_ID": CLIENT_ID,
            "TRACKER_OIDC_CLIENT_SECRET": CLIENT_SECRET}


@pytest.fixture(scope="module")
def stack(servers, database, redis_prefix, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The provider and a `tracker serve` that signs agents in through it, with one user's click."""
    assert CHROMIUM.exists() and shutil.which("node"), "make test installs Debian's chromium and node"
    _npm_ci()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sink = f"http://127.0.0.1:{free_port()}/sink"  # nothing listens there: a code sent to it stays unused
    provider = OIDCProvider([base + "/support/auth/callback", sink])
    data = tmp_path_factory.mktemp("openid")
    settings = Settings(database_url=database, redis_url=servers[1], data_dir=data, secret=SECRET,
                        admin_key=ADMIN_KEY, redis_prefix=redis_prefix)
    log = data / "serve.log"
    try:
        with served(settings, port=port, output=log, env={
                "TRACKER_ADMIN_KEY": ADMIN_KEY, "TRACKER_PUBLIC_URL": base, **_oidc_env(provider.issuer),
                "TRACKER_TRUSTED_PROXIES": "127.0.0.1/32"}):  # a test's X-Forwarded-For: an address of its own
            _run(_insert_click(database, USER, datetime.now(timezone.utc) - timedelta(hours=1)))
            yield {"base": base, "provider": provider, "settings": settings, "log": log, "sink": sink}
    finally:
        provider.stop()


@pytest.fixture(scope="module")
def browser(stack: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        launched.new_context = _patient(launched.new_context)  # type: ignore[method-assign]
        yield launched
        launched.close()


def _patient(new_context: Any) -> Any:
    """Browser contexts that wait up to 90 s for a page (a loaded machine; nothing here waits on time)."""
    def make(**options: Any) -> Any:
        context = new_context(**options)
        context.set_default_timeout(90_000)
        return context
    return make


def _to_provider(page: Any, base: str, next_path: str = "/support/") -> None:
    page.goto(f"{base}/support/login?next={next_path}")
    link = page.locator("a.button", has_text="company account")
    assert link.count() == 1 and page.locator("details.break-glass input[name=key]").count() == 1
    shot(page, "openid-sign-in")
    link.click()
    page.wait_for_selector("input[name=login]")


def _log_in_at_provider(page: Any, login: str) -> None:
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", "any password: the development form takes any")
    page.click("button[type=submit]")


def sign_in(browser: Any, base: str, login: str, next_path: str = "/support/") -> Any:
    """A new browser context signed in as `login`: the page once it is at `next_path`."""
    context = browser.new_context()
    page = context.new_page()
    _to_provider(page, base, next_path)
    _log_in_at_provider(page, login)
    page.wait_for_url(base + next_path)
    return page


def _callback_url(browser: Any, base: str, login: str) -> tuple[Any, str, dict[str, Any]]:
    """A sign-in through to the console, noting on the way the flow cookie and the callback URL the
    provider sent the browser to: (the page, that URL, that cookie), to be replayed or altered."""
    page = browser.new_context().new_page()
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url) if "/support/auth/callback" in r.url else None)
    _to_provider(page, base)
    flow = next(c for c in page.context.cookies() if c["name"] == "tracker_console_oidc")
    _log_in_at_provider(page, login)
    page.wait_for_url(base + "/support/")
    assert len(seen) == 1
    return page, seen[0], flow


def _with_flow(browser: Any, flow: dict[str, Any]) -> Any:
    """A new browser context holding only the flow cookie."""
    context = browser.new_context()
    context.add_cookies([flow])
    return context.new_page()


def _with(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return urlunsplit(parts._replace(query=urlencode({**query, **params})))


def _callback_by_http(base: str, login: str, address: str, next_path: str = "/support/",
                      fetch_site: str = "same-origin") -> tuple[requests.Session, str]:
    """A sign-in started from `address` (X-Forwarded-For) and taken through the provider's development
    form without a browser: (the session holding the flow cookie, the callback URL, not yet visited).
    `fetch_site`: the Sec-Fetch-Site a browser would send with the start (same-origin: our own link)."""
    ours = requests.Session()
    ours.headers["X-Forwarded-For"] = address
    url = ours.get(f"{base}/support/auth/start", params={"next": next_path}, allow_redirects=False, timeout=30,
                   headers={"Sec-Fetch-Site": fetch_site}).headers["Location"]
    at_provider = requests.Session()
    for _ in range(10):
        resp = at_provider.get(url, allow_redirects=False, timeout=30)
        if resp.is_redirect:
            url = urljoin(url, resp.headers["Location"])
        else:  # the development login form: any password
            action = urljoin(url, re.search(r'action="([^"]+)"', resp.text).group(1))  # type: ignore[union-attr]
            resp = at_provider.post(action, data={"login": login, "password": "any", "prompt": "login"},
                                    allow_redirects=False, timeout=30)
            url = urljoin(action, resp.headers["Location"])
        if url.startswith(base):
            return ours, url
    raise AssertionError("the provider never sent the browser back")


def _csrf(page: Any) -> str:
    return page.locator("form[action='/support/logout'] input[name=csrf]").get_attribute("value")


def _reconcile(page: Any, base: str) -> int:
    resp = page.context.request.post(f"{base}/support/orphans/reconcile", form={"csrf": _csrf(page)},
                                     max_redirects=0)
    return resp.status


def test_each_role_signs_in_and_sees_what_its_scopes_allow(browser, stack):
    base = stack["base"]
    support = sign_in(browser, base, "sofia.support", f"/support/users/{USER}")
    assert support.locator("header .who").inner_text() == "sofia@example.com"
    assert support.locator("h2", has_text="Who looked at this user").count() == 0  # audit:read is admin's
    support.goto(f"{base}/support/orphans")
    assert support.locator("button", has_text="Reconcile now").count() == 0
    assert _reconcile(support, base) == 403

    operator = sign_in(browser, base, "oleg.operator", "/support/orphans")
    assert operator.locator("header .who").inner_text() == "agent:oleg.operator"  # no e-mail: its subject
    assert operator.locator("button", has_text="Reconcile now").count() == 1
    assert _reconcile(operator, base) == 303

    admin = sign_in(browser, base, "ada.admin", f"/support/users/{USER}")
    assert admin.locator("header .who").inner_text() == "ada@example.com"
    shot(admin, "openid-admin-user-page")
    looked = admin.locator("#looked")  # who looked at this user: the support agent, by name
    assert "sofia@example.com" in looked.inner_text()
    for page in (support, operator, admin):
        page.context.close()


def test_an_agent_without_a_role_is_refused_and_told_why(browser, stack):
    base = stack["base"]
    context = browser.new_context()
    page = context.new_page()
    _to_provider(page, base)
    with page.expect_response(lambda r: "/support/auth/callback" in r.url) as answered:
        _log_in_at_provider(page, "nina.norole")
    assert answered.value.status == 403
    assert "No access to the support console" in page.content()
    assert "nina@example.com" in page.inner_text("main")
    shot(page, "openid-no-role")
    assert not [c for c in context.cookies() if c["name"] == "tracker_console"]
    page.goto(f"{base}/support/")
    assert page.url.startswith(f"{base}/support/login")
    context.close()


def test_sign_out_ends_the_session(browser, stack):
    base = stack["base"]
    page = sign_in(browser, base, "sofia.support")
    kept = [c for c in page.context.cookies() if c["name"] == "tracker_console"]
    assert kept and kept[0]["sameSite"] == "Strict" and kept[0]["httpOnly"]
    page.click("form[action='/support/logout'] button")
    page.wait_for_url(f"{base}/support/login")
    page.goto(f"{base}/support/")
    assert page.url.startswith(f"{base}/support/login")
    # A copy of the cookie kept from before the sign-out opens nothing either.
    other = browser.new_context()
    other.add_cookies(kept)
    again = other.new_page()
    again.goto(f"{base}/support/")
    assert again.url.startswith(f"{base}/support/login")
    page.context.close()
    other.close()


def test_a_callback_not_started_here_or_with_a_wrong_state_is_refused(browser, stack):
    base = stack["base"]
    # No flow cookie at all: someone's callback link opened in another browser (login CSRF).
    resp = requests.get(f"{base}/support/auth/callback", params={"state": "x", "code": "y"}, timeout=10)
    assert resp.status_code == 403 and resp.json()["error"] == "state"
    signed, url, flow = _callback_url(browser, base, "sofia.support")
    assert flow["sameSite"] == "Lax" and flow["path"] == "/support/auth/" and flow["httpOnly"]
    page = _with_flow(browser, flow)
    answer = page.goto(_with(url, state="another-state"))
    assert answer.status == 403 and json.loads(answer.text())["error"] == "state"
    # The flow is spent by that answer: the right state now finds no flow either.
    answer = page.goto(url)
    assert answer.status == 403 and json.loads(answer.text())["error"] == "state"
    assert not [c for c in page.context.cookies() if c["name"] == "tracker_console"]
    # An answer that names another issuer than ours (RFC 9207's iss): refused before its code is used.
    other = _with_flow(browser, flow)
    answer = other.goto(_with(url, iss="http://evil.example"))
    assert answer.status == 401 and "another sign-in provider" in json.loads(answer.text())["message"]
    for p in (signed, page, other):
        p.context.close()


def test_a_replayed_code_is_refused(browser, stack):
    base = stack["base"]
    signed, url, flow = _callback_url(browser, base, "ada.admin")
    # The same answer again, with the flow cookie it came with: the provider will not take the code twice.
    page = _with_flow(browser, flow)
    answer = page.goto(url)
    assert answer.status == 401 and "used already" in json.loads(answer.text())["message"]
    assert not [c for c in page.context.cookies() if c["name"] == "tracker_console"]
    assert "oidc_code_refused" in stack["log"].read_text()
    signed.context.close()
    page.context.close()


def test_a_callback_without_the_iss_its_provider_always_sends_is_refused(stack):
    """The provider says it names itself in every answer (RFC 9207): an answer without `iss` is not
    its own (a mix-up), refused before its code is used; the same answer with it signs in."""
    base = stack["base"]
    ours, callback = _callback_by_http(base, "sofia.support", "198.51.100.40")
    assert parse_qs(urlsplit(callback).query)["iss"] == [stack["provider"].issuer]
    flow = ours.cookies.get("tracker_console_oidc")
    assert flow
    without = urlunsplit(urlsplit(callback)._replace(
        query=urlencode({k: v for k, v in parse_qs(urlsplit(callback).query).items() if k != "iss"}, doseq=True)))
    resp = ours.get(without, allow_redirects=False, timeout=30)
    assert resp.status_code == 401 and resp.json()["error"] == "unauthorized"
    resp = requests.get(callback, cookies={"tracker_console_oidc": flow}, allow_redirects=False, timeout=30,
                        headers={"X-Forwarded-For": "198.51.100.40"})
    assert resp.status_code == 200 and "tracker_console=" in resp.headers["Set-Cookie"]


def test_a_sign_in_from_an_address_held_for_wrong_keys_is_refused_at_the_callback_too(stack):
    """Ten wrong admin keys from an address hold every console sign-in from it: a sign-in it started
    before (its callback) as well as a new one. Another address signs in meanwhile."""
    base, held = stack["base"], "198.51.100.41"
    ours, callback = _callback_by_http(base, "ada.admin", held)
    guesser = requests.Session()
    guesser.headers["X-Forwarded-For"] = held
    page = guesser.get(f"{base}/support/login", timeout=30).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    statuses = [guesser.post(f"{base}/support/login", data={"csrf": csrf, "key": f"wrong-{i}"},
                             allow_redirects=False, timeout=30).status_code for i in range(10)]
    assert statuses == [401] * 10  # each a wrong key; the tenth holds the address
    resp = ours.get(callback, allow_redirects=False, timeout=30)
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) > 0
    assert "tracker_console=" not in resp.headers.get("Set-Cookie", "")
    assert requests.get(f"{base}/support/auth/start", headers={"X-Forwarded-For": held},
                        allow_redirects=False, timeout=30).status_code == 429
    other, elsewhere = _callback_by_http(base, "ada.admin", "198.51.100.42")
    assert other.get(elsewhere, allow_redirects=False, timeout=30).status_code == 200


def test_a_sign_in_another_site_starts_does_not_open_the_page_it_chose(stack):
    """Another site can send an agent's browser to /support/auth/start: the provider, where the agent
    is signed in already, sends it straight back, and the sign-in would open whatever `next` that
    site chose (a user's page: a read in the audit trail under the agent's name that they never
    made). Started from another site, the sign-in lands on the console's home; started from our own
    page, or typed or bookmarked, it goes where it was asked."""
    base, wanted = stack["base"], f"/support/users/{USER}"
    for fetch_site, lands in (("cross-site", "/support/"), ("same-site", "/support/"), ("same-origin", wanted),
                              ("none", wanted)):
        ours, callback = _callback_by_http(base, "sofia.support", "198.51.100.44", wanted, fetch_site)
        page = ours.get(callback, allow_redirects=False, timeout=30)
        assert page.status_code == 200
        assert f'content="0;url={lands}"' in page.text, (fetch_site, page.text)


def test_codes_the_provider_refuses_count_as_wrong_keys(stack):
    """Anyone can start a sign-in and send its callback any code, and each costs a request to the
    provider's token endpoint with tracker's own client credentials (whose rate limit there the
    agents share): ten refused codes from one address hold it like ten wrong admin keys."""
    base, address = stack["base"], "198.51.100.43"
    ours = requests.Session()
    ours.headers["X-Forwarded-For"] = address
    for i in range(10):
        start = ours.get(f"{base}/support/auth/start", allow_redirects=False, timeout=30)
        assert start.status_code == 302
        state = parse_qs(urlsplit(start.headers["Location"]).query)["state"][0]
        resp = ours.get(f"{base}/support/auth/callback", allow_redirects=False, timeout=30, params={
            "state": state, "code": f"made-up-{i}", "iss": stack["provider"].issuer})
        assert resp.status_code == 401 and "did not accept this sign-in's code" in resp.json()["message"]
    resp = ours.get(f"{base}/support/auth/start", allow_redirects=False, timeout=30)
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) > 0


def test_a_tampered_or_foreign_id_token_is_refused(browser, stack):
    """The ID token the real provider issues verifies against its published keys; changed in any
    way, or signed by any other key or with the client secret, it does not."""
    provider_url, sink = stack["provider"].issuer, stack["sink"]
    settings = OpenIDSettings(provider_url, CLIENT_ID, CLIENT_SECRET)
    # A sign-in of the test's own, sent back to an address where nothing listens: its code unused.
    _, flow = FlowKeys(SECRET).start(datetime.now().timestamp(), "/support/")
    metadata = requests.get(settings.discovery_url, timeout=10).json()
    page = browser.new_context().new_page()
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url) if r.url.startswith(sink) else None)
    page.goto(authorization_url(metadata["authorization_endpoint"], settings, sink, flow))
    _log_in_at_provider(page, "ada.admin")
    until_blocking(lambda: seen, "the provider redirected to the sink", pause=page.wait_for_timeout)
    code = parse_qs(urlsplit(seen[0]).query)["code"][0]
    page.context.close()
    settings = OpenIDSettings(provider_url, CLIENT_ID, CLIENT_SECRET)

    async def check() -> None:
        provider = Provider(settings)
        try:
            token = await provider.exchange(code, sink, flow.verifier)
            claims = await provider.verify(token, flow.nonce)
            assert claims["sub"] == "ada.admin" and roles_of(claims, "roles") == ("admin",)
            assert agent_name(claims) == "ada@example.com"
            keys = await provider._key_set(False)
            head, payload, signature = token.split(".")
            fields = json.loads(_unb64(payload))

            def refused(bad: str, **kw: Any) -> None:
                with pytest.raises(BadIDToken):
                    verify_id_token(bad, kw.pop("keys", keys), issuer=provider_url, client_id=CLIENT_ID,
                                    nonce=kw.pop("nonce", flow.nonce))

            # The payload changed (another agent, more roles), the signature kept.
            refused(f"{head}.{_b64(json.dumps({**fields, 'sub': 'mallory'}).encode())}.{signature}")
            refused(f"{head}.{_b64(json.dumps({**fields, 'roles': ['admin', 'x']}).encode())}.{signature}")
            refused(f"{head}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}")
            # Re-signed by another key under the provider's key id; signed with the client secret (HS256).
            kid = json.loads(_unb64(head))["kid"]
            other = RSAKey.generate_key(2048, parameters={"kid": kid})
            refused(jwt.encode({"alg": "RS256", "kid": kid}, fields, other))
            refused(jwt.encode({"alg": "HS256", "kid": kid}, fields, OctKey.import_key(CLIENT_SECRET * 2)))
            refused(token, nonce="another-sign-in")  # replayed into another sign-in
            # Another issuer's token, verified against its own keys: still not ours.
            foreign = RSAKey.generate_key(2048, parameters={"kid": "foreign"})
            foreign_keys = KeySet.import_key_set({"keys": [foreign.as_dict(private=False)]})
            refused(jwt.encode({"alg": "RS256", "kid": "foreign"}, {**fields, "iss": "http://evil.example"},
                               foreign), keys=foreign_keys)
            # An unknown key id fetches the key set again, at most once a minute: not within a minute
            # of the last fetch, once when a minute has passed (the key set's clock set back by one).
            fetched = provider.jwks_fetches
            stranger = jwt.encode({"alg": "RS256", "kid": "rotated"}, fields,
                                  RSAKey.generate_key(2048, parameters={"kid": "rotated"}))
            with pytest.raises(UnknownKey):
                await provider.verify(stranger, flow.nonce)
            assert provider.jwks_fetches == fetched
            provider._keys_at -= JWKS_REFRESH
            for _ in range(3):
                with pytest.raises(UnknownKey):
                    await provider.verify(stranger, flow.nonce)
            assert provider.jwks_fetches == fetched + 1
            with pytest.raises(CodeRefused):  # and the code, once exchanged, is spent
                await provider.exchange(code, sink, flow.verifier)
        finally:
            await provider.close()

    _run(check())
    assert CLIENT_SECRET not in stack["log"].read_text()


def test_a_wrong_issuer_or_an_unreachable_one_is_a_503_page_never_a_500(stack, servers, database, redis_prefix,
                                                                          tmp_path):
    """A provider whose discovery document names another issuer than TRACKER_OIDC_ISSUER is not
    believed; one that cannot be reached is said so. The admin key still signs in (break-glass)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    impostor = OIDCProvider([base + "/support/auth/callback"], issuer_host="localhost")
    settings = Settings(database_url=database, redis_url=servers[1], data_dir=tmp_path, secret=SECRET,
                        admin_key=ADMIN_KEY, redis_prefix=redis_prefix)
    log = tmp_path / "serve.log"
    try:
        with served(settings, port=port, output=log, env={
                "TRACKER_ADMIN_KEY": ADMIN_KEY, "TRACKER_PUBLIC_URL": base, **_oidc_env(impostor.url)}):
            # It started anyway, and said so (the discovery document is read in the background at start).
            until_blocking(lambda: "oidc_provider_unreachable_at_start" in log.read_text(), "the start-up warning")
            resp = requests.get(f"{base}/support/auth/start", allow_redirects=False, timeout=10)
            assert resp.status_code == 503 and "cannot be reached" in resp.text and resp.headers["Retry-After"]
            assert "localhost" in log.read_text() and "oidc_provider_unavailable" in log.read_text()
            impostor.stop()
            resp = requests.get(f"{base}/support/auth/start", allow_redirects=False, timeout=10)
            assert resp.status_code == 503
            login = requests.get(f"{base}/support/login", timeout=10)
            assert login.status_code == 200 and 'name="key"' in login.text and "company account" in login.text
    finally:
        impostor.stop()
    assert CLIENT_SECRET not in log.read_text()

    async def direct() -> None:
        provider = Provider(OpenIDSettings(impostor.url, CLIENT_ID, CLIENT_SECRET))
        with pytest.raises(ProviderUnavailable):
            await provider.metadata()
        await provider.close()

    _run(direct())


@pytest.mark.parametrize("env,named", [
    ({"TRACKER_OIDC_CLIENT_ID": "x"}, "TRACKER_OIDC_CLIENT_ID"),
    ({"TRACKER_OIDC_ISSUER": "https://id.example.com"}, "TRACKER_OIDC_CLIENT_ID"),
    ({"TRACKER_OIDC_ISSUER": "https://id.example.com", "TRACKER_OIDC_CLIENT_ID": "c"}, "TRACKER_OIDC_CLIENT_SECRET"),
    ({"TRACKER_OIDC_ISSUER": "http://id.example.com", "TRACKER_OIDC_CLIENT_ID": "c",
      "TRACKER_OIDC_CLIENT_SECRET": "s"}, "TRACKER_OIDC_ISSUER"),
    ({"TRACKER_OIDC_ROLES_CLAIM": "a..b"}, "TRACKER_OIDC_ROLES_CLAIM"),
])
def test_a_bad_openid_setting_is_named_at_start(env, named, tmp_path, monkeypatch):
    from tracker import settings as settings_module

    monkeypatch.chdir(tmp_path)
    with pytest.raises(settings_module.SettingsError, match=named):
        settings_module.load({"TRACKER_SECRET": "s" * 32, "TRACKER_ADMIN_KEY": "a" * 32, **env})


def test_the_settings_never_show_the_client_secret():
    settings = load_openid({**_oidc_env("https://id.example.com"), "TRACKER_OIDC_ROLES_CLAIM": "realm_access.roles"})
    assert settings is not None and CLIENT_SECRET not in repr(settings) and settings.roles_claim == "realm_access.roles"


def test_roles_from_a_claim_or_a_dotted_path():
    claims = {"sub": "s", "roles": "support operator", "realm_access": {"roles": ["admin", "other"]},
              "https://example.com/roles": ["support"]}
    assert roles_of(claims, "roles") == ("support", "operator")
    assert roles_of(claims, "realm_access.roles") == ("admin",)
    assert roles_of(claims, "https://example.com/roles") == ("support",)
    assert roles_of(claims, "missing.path") == ()
    assert agent_name({"sub": "x", "email": "a@b.c", "email_verified": False}) == "agent:x"
    assert len(agent_name({"sub": "s" * 255})) == 200  # as long as the audit trail's actor filter takes


def test_an_agent_is_named_by_an_address_the_provider_verified_and_long_subjects_stay_apart():
    """An e-mail address the provider does not say it verified (no `email_verified`, or the string
    "false") is not a name: a profile field anyone may type another agent's address into. Two long
    subjects that share their first 200 characters are two agents in the audit trail."""
    assert agent_name({"sub": "x", "email": "ada@example.com", "email_verified": True}) == "ada@example.com"
    assert agent_name({"sub": "x", "email": "ada@example.com", "email_verified": "true"}) == "ada@example.com"
    assert agent_name({"sub": "x", "email": "ada@example.com"}) == "agent:x"
    assert agent_name({"sub": "x", "email": "ada@example.com", "email_verified": "false"}) == "agent:x"
    first, second = agent_name({"sub": "a" * 250 + "1"}), agent_name({"sub": "a" * 250 + "2"})
    assert first != second and len(first) == len(second) == 200 and first.startswith("agent:aaaa")


def test_an_id_token_that_never_expires_or_is_not_valid_yet_is_refused():
    key = RSAKey.generate_key(2048, parameters={"kid": "k"})
    keys = KeySet.import_key_set({"keys": [key.as_dict(private=False)]})
    now = int(datetime.now(timezone.utc).timestamp())
    claims = {"iss": "https://id.example.com", "aud": CLIENT_ID, "sub": "s", "iat": now, "exp": now + 300,
              "nonce": "n"}

    def check(**changed: Any) -> dict[str, Any]:
        token = jwt.encode({"alg": "RS256", "kid": "k"}, {**claims, **changed}, key)
        return verify_id_token(token, keys, issuer="https://id.example.com", client_id=CLIENT_ID, nonce="n")

    assert check()["sub"] == "s" and check(nbf=now)["sub"] == "s"
    for changed in ({"exp": float("inf")}, {"nbf": now + 3600}, {"nbf": "soon"}, {"iat": float("nan")}):
        with pytest.raises(BadIDToken):
            check(**changed)


def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_after_sign_in_only_a_console_path_is_opened():
    """`next` (the sign-in form's, the flow cookie's) is a path under /support/ and stays there: no
    other host, no dot segments that a browser resolves out of /support/ (to /go/… or /v1/…),
    plainly or percent-encoded; nor one too long for the flow cookie (a browser drops a cookie past
    4 KiB, and the sign-in would come back as one this browser never started)."""
    from tracker.web.console_guard import local_next

    for kept in ("/support/", f"/support/users/{USER}", "/support/?q=abc", "/support/clicks/a.b..c"):
        assert local_next(kept) == kept
    for refused in ("//evil.example", "https://evil.example/support/", "/support/../go/shop?u=x",
                    "/support/..//evil.example", "/support/%2e%2e/v1/audit", "/support/.%2E/x", "/support/./x",
                    "/support/x/..", "/support\\..\\go", "/support/%2E%2e%2Fgo", "/support/" + "é" * 1000):
        assert local_next(refused) == "/support/", refused
