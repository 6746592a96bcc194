"""Support agents signing in through the company's OpenID Connect provider: the settings, the
sign-in flow's cookie, the authorization request and the ID token's checks. No I/O here: the
provider's documents and its token endpoint are reached in store/openid.py.

The flow is the authorization code flow with PKCE (S256). Starting it sets a short-lived cookie
`f1.<state>.<expiry>.<next>.<mac>`, HMAC-signed under a key derived from TRACKER_SECRET; the nonce
and the PKCE code verifier are derived from the state under that key, so they are the flow's own,
never leave the server except as the provider must see them (the nonce in the request, the
verifier at the code exchange), and the cookie holds no secret. The callback is accepted only with
that cookie and the same `state` (a callback that this browser did not start is refused).

The ID token is verified with joserfc against the issuer's published keys, with asymmetric
algorithms only (an HMAC- or `none`-signed token is refused whatever its header says), then its
`iss`, `aud`, `azp`, `exp`, `iat` and `nonce` are checked."""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeGuard
from urllib.parse import urlencode, urlsplit

from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

from .access import ROLE_SCOPES
from .tokens import same_secret

DEFAULT_ROLES_CLAIM = "roles"
SCOPE = "openid email profile"
CALLBACK_PATH = "/support/auth/callback"
FLOW_TTL = 600  # a sign-in at the provider has ten minutes to come back
# Asymmetric signatures only: the client secret is never a key an ID token may be signed with here.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "Ed25519", "Ed448")
LEEWAY = 60  # seconds of clock difference allowed with the provider
MAX_TOKEN = 16_384
MAX_NAME = 200  # an agent's name, as GET /v1/audit?actor= can ask for it
_CLAIM = re.compile(r"[^\s\x00-\x1f\x7f]{1,200}")


class BadOpenIDSetting(ValueError):
    """A TRACKER_OIDC_* variable that cannot be used (settings.load() names it at start)."""


class BadIDToken(ValueError):
    """An ID token that does not verify: the reason is safe to log (it holds no token)."""


class UnknownKey(BadIDToken):
    """Signed with a key id the published key set did not have (the provider may have rotated)."""


@dataclass(frozen=True, slots=True)
class OpenIDSettings:
    issuer: str
    client_id: str
    client_secret: str = field(repr=False)  # never in a repr, a log line or an error
    roles_claim: str = DEFAULT_ROLES_CLAIM

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def provider_url(url: str) -> bool:
    """An https URL, or plain http on this machine's loopback (a provider run for tests)."""
    parts = urlsplit(url)
    if not parts.hostname or parts.username or parts.password or parts.fragment:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname))


def load_openid(env: Mapping[str, str]) -> OpenIDSettings | None:
    """The provider's settings from TRACKER_OIDC_*, None without an issuer (the console then signs in
    with the admin key alone). Every variable is read, so that one set by mistake is named."""
    issuer = (env.get("TRACKER_OIDC_ISSUER") or "").strip()
    client_id = (env.get("TRACKER_OIDC_CLIENT_ID") or "").strip()
    client_secret = env.get("TRACKER_OIDC_CLIENT_SECRET") or ""
    claim = (env.get("TRACKER_OIDC_ROLES_CLAIM") or "").strip() or DEFAULT_ROLES_CLAIM
    if not _CLAIM.fullmatch(claim) or claim.startswith(".") or claim.endswith(".") or ".." in claim:
        raise BadOpenIDSetting(f"TRACKER_OIDC_ROLES_CLAIM={claim[:70]!r}: a claim name or a dotted path to one "
                               "(`roles`, `realm_access.roles`), at most 200 characters, no spaces")
    if not issuer:
        for name, value in (("TRACKER_OIDC_CLIENT_ID", client_id), ("TRACKER_OIDC_CLIENT_SECRET", client_secret)):
            if value:
                raise BadOpenIDSetting(f"{name} is set but TRACKER_OIDC_ISSUER is not: set the issuer too, or "
                                       "unset it to sign in to the console with the admin key alone")
        return None
    if not provider_url(issuer) or urlsplit(issuer).query:
        raise BadOpenIDSetting(f"TRACKER_OIDC_ISSUER={issuer[:200]!r}: the provider's issuer URL exactly as it "
                               "publishes it (https, no query; plain http only on a loopback address)")
    if not client_id:
        raise BadOpenIDSetting("TRACKER_OIDC_ISSUER is set but TRACKER_OIDC_CLIENT_ID is not: the client id the "
                               "provider gave tracker's console")
    if not client_secret:
        raise BadOpenIDSetting("TRACKER_OIDC_ISSUER is set but TRACKER_OIDC_CLIENT_SECRET is not: the console "
                               "is a confidential client (client_secret_basic at the token endpoint)")
    return OpenIDSettings(issuer, client_id, client_secret, claim)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Flow:
    """One sign-in under way: its state, the nonce and PKCE verifier derived from it, where to go next."""
    state: str
    nonce: str
    verifier: str
    next: str
    expires: int

    @property
    def challenge(self) -> str:
        return _b64(hashlib.sha256(self.verifier.encode()).digest())


class FlowKeys:
    """Signs and reads the flow cookie; derives each flow's nonce and verifier."""
    __slots__ = ("_mac", "_derive")

    def __init__(self, secret: str) -> None:
        self._mac = hmac.new(secret.encode(), b"tracker/oidc-flow-cookie/v1", hashlib.sha256).digest()
        self._derive = hmac.new(secret.encode(), b"tracker/oidc-flow-derive/v1", hashlib.sha256).digest()

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._mac, payload.encode(), hashlib.sha256).digest()[:18])

    def _flow(self, state: str, next_path: str, expires: int) -> Flow:
        nonce = _b64(hmac.new(self._derive, b"nonce:" + state.encode(), hashlib.sha256).digest())
        verifier = _b64(hmac.new(self._derive, b"pkce:" + state.encode(), hashlib.sha256).digest())  # 43 chars
        return Flow(state, nonce, verifier, next_path, expires)

    def start(self, now: float, next_path: str) -> tuple[str, Flow]:
        """A new flow: (cookie value, flow)."""
        state, expires = _b64(secrets.token_bytes(24)), int(now) + FLOW_TTL
        payload = f"f1.{state}.{expires}.{_b64(next_path.encode())}"
        return f"{payload}.{self._sign(payload)}", self._flow(state, next_path, expires)

    def read(self, value: str | None, now: float) -> Flow | None:
        """The flow a cookie carries, if it is ours, unaltered and not expired."""
        if not value or len(value) > 3000:
            return None
        payload, _, mac = value.rpartition(".")
        parts = payload.split(".")
        if len(parts) != 4 or parts[0] != "f1" or not parts[2].isascii() or not parts[2].isdigit() \
                or len(parts[2]) > 12:
            return None
        if not same_secret(mac, self._sign(payload)) or int(parts[2]) <= now:
            return None
        return self._flow(parts[1], _unb64(parts[3]).decode(), int(parts[2]))  # ours: it is signed


def authorization_url(endpoint: str, settings: OpenIDSettings, redirect_uri: str, flow: Flow) -> str:
    params = {"response_type": "code", "client_id": settings.client_id, "redirect_uri": redirect_uri,
              "scope": SCOPE, "state": flow.state, "nonce": flow.nonce, "code_challenge": flow.challenge,
              "code_challenge_method": "S256"}
    return endpoint + ("&" if urlsplit(endpoint).query else "?") + urlencode(params)


def verify_id_token(token: str, key_set: KeySet, *, issuer: str, client_id: str, nonce: str,
                    now: float | None = None) -> dict[str, Any]:
    """The ID token's claims once its signature (by a key of `key_set`, an asymmetric algorithm) and
    its claims check out; else BadIDToken (UnknownKey for a key id the set does not have)."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN or token.count(".") != 2:
        raise BadIDToken("the ID token is not a signed JWT")
    try:
        claims = jwt.decode(token, key_set, algorithms=list(ALGORITHMS)).claims
    except InvalidKeyIdError:
        raise UnknownKey("the ID token is signed with a key the issuer does not publish") from None
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise BadIDToken(f"the ID token's signature does not verify ({type(exc).__name__})") from None
    if not isinstance(claims, dict):
        raise BadIDToken("the ID token's payload is not a JSON object")
    now = time.time() if now is None else now
    if claims.get("iss") != issuer:
        raise BadIDToken("the ID token was issued by another issuer")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if client_id not in audiences:
        raise BadIDToken("the ID token is not meant for this client (aud)")
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != client_id:
        raise BadIDToken("the ID token was issued to another party (azp)")
    exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
    if not _number(exp) or exp + LEEWAY <= now:
        raise BadIDToken("the ID token has expired")
    if not _number(iat) or iat - LEEWAY > now:
        raise BadIDToken("the ID token's issue time is missing or in the future")
    if nbf is not None and (not _number(nbf) or nbf - LEEWAY > now):
        raise BadIDToken("the ID token is not valid yet (nbf)")
    got = claims.get("nonce")
    if not isinstance(got, str) or not same_secret(got, nonce):
        raise BadIDToken("the ID token's nonce is not this sign-in's")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 0 < len(sub) <= 255 or not sub.isprintable():
        raise BadIDToken("the ID token has no usable subject (sub)")
    return claims


def _number(value: Any) -> TypeGuard[int | float]:
    """A finite JSON number (an `exp` of 1e999 reads as infinity: a token that would never expire)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim `path` names: the claim of that exact name if there is one (names such as
    `https://example.com/roles` hold dots), else the dotted path through nested objects."""
    if path in claims:
        return claims[path]
    found: Any = claims
    for part in path.split("."):
        if not isinstance(found, Mapping) or part not in found:
            return None
        found = found[part]
    return found


def roles_of(claims: Mapping[str, Any], path: str) -> tuple[str, ...]:
    """The agent's console roles from the roles claim (a list, or one space- or comma-separated
    string), in ROLE_SCOPES' order; anything else in the claim is not a console role and is ignored."""
    value = claim_at(claims, path)
    if isinstance(value, str):
        named = set(value.replace(",", " ").split())
    elif isinstance(value, list):
        named = {v for v in value if isinstance(v, str)}
    else:
        named = set()
    return tuple(role for role in ROLE_SCOPES if role in named)


def agent_name(claims: Mapping[str, Any]) -> str:
    """How the agent is named in the header and the audit trail: their e-mail address when the
    provider says it is verified (`email_verified` true: an address anyone may type into their
    profile would let one agent act under another's name), else `agent:<sub>`. Both fit the audit
    trail's actor filter (200 characters): a longer subject keeps its head and a hash of the whole,
    so that two subjects never share a name."""
    email = claims.get("email")
    if (isinstance(email, str) and "@" in email and len(email) <= MAX_NAME and email.isprintable()
            and " " not in email and claims.get("email_verified") in (True, "true")):
        return email
    name = f"agent:{claims['sub']}"
    if len(name) <= MAX_NAME:
        return name
    return f"{name[:MAX_NAME - 33]}~{hashlib.sha256(name.encode()).hexdigest()[:32]}"
