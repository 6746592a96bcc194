"""Support console sessions: signed cookies and CSRF tokens (wrong keys: domain/key_guesses.py).

A session cookie is `v2.<session id>.<expiry>.<who>.<roles>.<mac>`: 16 random bytes, a Unix time,
who signed in (base64url of the actor's name: `admin` for the admin key, else an agent's name), their
roles (`*` for the admin key: every scope), and an HMAC over all of them with a key derived from
TRACKER_SECRET *and* the admin key, so that rotating either one ends every session. A form's CSRF token is an HMAC of the session id under another derived key: it
needs no storage, differs per session, and a page of another site can neither read nor forge it.
Before sign-in the same is done with a short-lived sign-in nonce cookie (login CSRF).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .access import ADMIN, ADMIN_ACTOR, ROLE_SCOPES, Actor, agent
from .tokens import same_secret

LOGIN_NONCE_TTL = 3600


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


ADMIN_ROLES = "*"


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    expires: int  # Unix seconds
    who: str = ADMIN  # the actor's name
    roles: str = ADMIN_ROLES  # an agent's roles, comma-separated; `*`: the admin key

    def actor(self) -> Actor:
        if self.roles == ADMIN_ROLES:
            return ADMIN_ACTOR
        return agent(self.who, [r for r in self.roles.split(",") if r])


class ConsoleKeys:
    __slots__ = ("_cookie", "_csrf", "ttl")

    def __init__(self, secret: str, admin_key: str, ttl: int) -> None:
        bound = hashlib.sha256(admin_key.encode("utf-8", "surrogatepass")).digest()
        self._cookie = hmac.new(secret.encode(), b"tracker/console-session/v1" + bound, hashlib.sha256).digest()
        self._csrf = hmac.new(secret.encode(), b"tracker/console-csrf/v1" + bound, hashlib.sha256).digest()
        self.ttl = ttl

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._cookie, payload.encode(), hashlib.sha256).digest()[:18])

    def _sign(self, kind: str, ttl: int, now: float, who: str = ADMIN,
              roles: str = ADMIN_ROLES) -> tuple[str, Session]:
        ident, expires = _b64(secrets.token_bytes(16)), int(now) + ttl
        payload = f"{kind}.{ident}.{expires}" + (f".{_b64(who.encode())}.{roles}" if kind == "v2" else "")
        return f"{payload}.{self._mac(payload)}", Session(ident, expires, who, roles)

    def _read(self, kind: str, value: str | None, now: float) -> Session | None:
        if not value or len(value) > 800:
            return None
        payload, _, mac = value.rpartition(".")
        parts = payload.split(".")
        if (len(parts) != (5 if kind == "v2" else 3) or parts[0] != kind or not parts[2].isascii()
                or not parts[2].isdigit() or len(parts[2]) > 12):
            return None
        if not same_secret(mac, self._mac(payload)) or int(parts[2]) <= now:
            return None
        if kind != "v2":
            return Session(parts[1], int(parts[2]))
        who = base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4)).decode()  # ours: it is signed
        return Session(parts[1], int(parts[2]), who, parts[4])

    def issue(self, now: float, who: str = ADMIN, roles: tuple[str, ...] | None = None) -> tuple[str, Session]:
        """A new session: (cookie value, session). Without roles: the admin key's (every scope)."""
        known = ADMIN_ROLES if roles is None else ",".join(r for r in roles if r in ROLE_SCOPES)
        return self._sign("v2", self.ttl, now, who, known)

    def read(self, cookie: str | None, now: float) -> Session | None:
        """The session a cookie carries, if it is ours, unaltered and not expired."""
        return self._read("v2", cookie, now)

    def issue_nonce(self, now: float) -> tuple[str, Session]:
        return self._sign("n1", LOGIN_NONCE_TTL, now)

    def read_nonce(self, cookie: str | None, now: float) -> Session | None:
        return self._read("n1", cookie, now)

    def csrf(self, ident: str) -> str:
        return _b64(hmac.new(self._csrf, ident.encode(), hashlib.sha256).digest()[:18])

    def csrf_ok(self, ident: str, token: str | None) -> bool:
        return bool(token) and same_secret(token or "", self.csrf(ident))
