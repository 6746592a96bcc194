"""Support agents signing in to the console through the company's OpenID Connect provider
(TRACKER_OIDC_ISSUER; the flow and its checks: domain/openid.py, the provider: store/openid.py).

`/support/auth/start` sets the flow cookie (SameSite=Lax, path /support/auth/: it has to come back
with the provider's cross-site redirect) and sends the browser to the provider; a start that another
site sent the browser to (Sec-Fetch-Site) goes to the console's home afterwards, not to its `next`.
`/support/auth/callback` takes the answer: the flow cookie and the same `state`, no provider error,
the code exchanged (with the PKCE verifier), the ID token verified, a role. It then sets the session
cookie and answers a small page that moves on to the console by itself: the session cookie is
SameSite=Strict, and a browser would not send it on a redirect that the provider's page started,
so a plain redirect would land on the sign-in page again.

Refusals are the API's JSON errors (429 while the address is held for wrong admin keys, which a
refused code or ID token counts as, 403 `state`
for a callback this browser did not start, 401 for a provider's refusal, an answer from another
issuer or without the `iss` its provider promises (RFC 9207), a refused code or an ID token that
does not verify), a page saying why for an
agent without a role (403), and a page with 503 when the provider cannot be reached. The flow cookie
is spent by any answer to it. Codes, tokens and the client secret are never logged."""
from __future__ import annotations

import time

import structlog
from aiohttp import web

from .. import keys, metrics
from ..domain.key_guesses import guesser
from ..domain.openid import CALLBACK_PATH, FLOW_TTL, BadIDToken, agent_name, authorization_url, roles_of
from ..domain.text import has_control
from ..domain.tokens import same_secret
from ..store.openid import CodeRefused, Provider, ProviderUnavailable
from .access import refuse_if_held
from .common import client_ip, error_response, one
from .console_guard import COOKIE, PATH, local_next, over_tls, render, set_cookie

log = structlog.get_logger("tracker.console")

FLOW_COOKIE = "tracker_console_oidc"
FLOW_PATH = "/support/auth/"
MAX_CODE = 2048


def _provider(request: web.Request) -> Provider:
    provider = request.app.get(keys.OPENID)
    if provider is None:  # TRACKER_OIDC_ISSUER is not set: there is no such sign-in
        raise web.HTTPNotFound()
    return provider


def redirect_uri(app: web.Application) -> str:
    return app[keys.SETTINGS].public_url + CALLBACK_PATH


def _spend_flow(response: web.StreamResponse) -> web.StreamResponse:
    response.del_cookie(FLOW_COOKIE, path=FLOW_PATH)
    return response


def _refuse(request: web.Request, code: str, message: str, status: int) -> web.StreamResponse:
    metrics.REFUSALS.labels(request.match_info.route.name or "unmatched", code).inc()
    return _spend_flow(error_response(code, message, status))


def _unavailable(request: web.Request, provider: Provider, exc: ProviderUnavailable) -> web.StreamResponse:
    log.warning("oidc_provider_unavailable", issuer=provider.settings.issuer, reason=str(exc),
                route=request.match_info.route.name)
    metrics.REFUSALS.labels(request.match_info.route.name or "unmatched", "unavailable").inc()
    response = render(request, None, "sign_in_unavailable.html", status=503, issuer=provider.settings.issuer)
    response.headers["Retry-After"] = "30"
    return _spend_flow(response)


async def start(request: web.Request) -> web.StreamResponse:
    provider = _provider(request)
    next_path = local_next(one(request, "next"))
    if request.headers.get("Sec-Fetch-Site", "none").strip().lower() not in ("same-origin", "none"):
        # Another site sent the browser here: the provider, where the agent is signed in already, may
        # send it straight back, and `next` would open a page that site chose (a user's page: a read
        # in the audit trail under the agent's name). Such a sign-in lands on the console's home.
        next_path = PATH
    # A client held by the wrong-key throttle gets 429 for every console sign-in, this one too.
    address = client_ip(request, request.app[keys.SETTINGS].trusted_proxies)
    refuse_if_held(await request.app[keys.KEY_GUARD].wait(guesser(address)))
    try:
        endpoint = (await provider.metadata())["authorization_endpoint"]
    except ProviderUnavailable as exc:
        return _unavailable(request, provider, exc)
    cookie, flow = request.app[keys.OPENID_FLOWS].start(time.time(), next_path)
    response = web.Response(status=302, headers={
        "Location": authorization_url(endpoint, provider.settings, redirect_uri(request.app), flow)})
    response.set_cookie(FLOW_COOKIE, cookie, max_age=FLOW_TTL, path=FLOW_PATH, httponly=True, samesite="Lax",
                        secure=over_tls(request))
    return response


async def callback(request: web.Request) -> web.StreamResponse:
    app = request.app
    provider = _provider(request)
    # Held by the wrong-key throttle: no console sign-in from this address, one started before included.
    address = client_ip(request, app[keys.SETTINGS].trusted_proxies)
    refuse_if_held(await app[keys.KEY_GUARD].wait(guesser(address)))
    state, error, code = one(request, "state"), one(request, "error"), one(request, "code")
    flow = app[keys.OPENID_FLOWS].read(request.cookies.get(FLOW_COOKIE), time.time())
    if flow is None:
        return _refuse(request, "state", "no sign-in was started in this browser, or it took longer than "
                       f"{FLOW_TTL // 60} minutes: start again from the sign-in page", 403)
    if state is None or not same_secret(state, flow.state):
        return _refuse(request, "state", "this answer's state is not the sign-in this browser started: start "
                       "again from the sign-in page", 403)
    if error is not None:
        shown = error if len(error) <= 64 and error.isascii() and error.replace("_", "").isalpha() else "error"
        log.info("oidc_sign_in_denied", error=shown)
        return _refuse(request, "unauthorized", f"the sign-in provider did not sign you in ({shown})", 401)
    issuer = one(request, "iss")  # RFC 9207: a provider that names itself must be ours (mix-up attacks)
    if issuer is not None and issuer != provider.settings.issuer:
        log.warning("oidc_wrong_issuer", issuer=issuer[:200])
        return _refuse(request, "unauthorized", "the answer came from another sign-in provider than this "
                       "console's", 401)
    if not code or len(code) > MAX_CODE or has_control(code):
        return _refuse(request, "malformed", "the provider's answer has no usable code", 400)
    try:
        if issuer is None and await provider.names_itself():
            log.warning("oidc_no_issuer", issuer=provider.settings.issuer)
            return _refuse(request, "unauthorized", "the answer does not name the sign-in provider that sent it, "
                           "as this console's always does: start again from the sign-in page", 401)
        token = await provider.exchange(code, redirect_uri(app), flow.verifier)
        claims = await provider.verify(token, flow.nonce)
    except ProviderUnavailable as exc:
        return _unavailable(request, provider, exc)
    except CodeRefused as exc:
        # Counted as a wrong key: each made-up code costs a request to the provider's token endpoint
        # with tracker's client credentials, whose rate limit there every agent's sign-in shares.
        await app[keys.KEY_GUARD].wrong(guesser(address))
        log.warning("oidc_code_refused", error=str(exc), client_ip=address)
        return _refuse(request, "unauthorized", "the sign-in provider did not accept this sign-in's code (it "
                       "was used already or has expired): start again from the sign-in page", 401)
    except BadIDToken as exc:
        await app[keys.KEY_GUARD].wrong(guesser(address))
        log.warning("oidc_id_token_refused", reason=str(exc), client_ip=address)
        return _refuse(request, "unauthorized", f"the sign-in provider's answer does not check out: {exc}", 401)
    name = agent_name(claims)
    roles = roles_of(claims, provider.settings.roles_claim)
    if not roles:
        log.info("console_sign_in_refused", agent=name, reason="no_role", client_ip=address)
        metrics.REFUSALS.labels(request.match_info.route.name or "unmatched", "no_role").inc()
        return _spend_flow(render(request, None, "no_role.html", status=403, agent=name,
                                  claim=provider.settings.roles_claim))
    console = app[keys.CONSOLE]
    cookie, session = console.issue(time.time(), who=name, roles=roles)
    log.info("console_signed_in", agent=name, roles=list(roles), client_ip=address, session=session.session_id[:8])
    response = render(request, None, "signed_in.html", agent=name, next=flow.next)
    set_cookie(request, response, COOKIE, cookie, console.ttl)
    return _spend_flow(response)
