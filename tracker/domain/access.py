"""Who is acting, and what they may do: scopes, the roles of support agents, machine keys' form.

An actor is the admin key (`admin`, every scope), a machine key (its name, the scopes it was created
with) or a person signed in to the console (an agent: the scopes of their roles). Every admin
endpoint and console action names the one scope it needs; the actor's name goes into the audit trail.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

EVENTS_READ = "events:read"
LOOKUPS_READ = "lookups:read"
ORPHANS_WRITE = "orphans:write"
AUDIT_READ = "audit:read"
USERS_ERASE = "users:erase"
SCOPES: tuple[str, ...] = (EVENTS_READ, LOOKUPS_READ, ORPHANS_WRITE, AUDIT_READ, USERS_ERASE)

# A support agent's roles (from the OpenID provider's roles claim), each adding to the one before.
ROLE_SCOPES: dict[str, frozenset[str]] = {
    "support": frozenset({LOOKUPS_READ}),
    "operator": frozenset({LOOKUPS_READ, ORPHANS_WRITE}),
    "admin": frozenset({LOOKUPS_READ, ORPHANS_WRITE, USERS_ERASE, AUDIT_READ}),
}

ADMIN = "admin"  # the actor name of TRACKER_ADMIN_KEY, reserved: no machine key may take it
# Key names: lowercase, no `@` or `:`, so that a key's name never reads as an agent's (an e-mail
# address) or as the command line's actor (`cli:<user>`) in the audit trail.
KEY_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
KEY_PREFIX = "tk_"
# tk_ + 43 characters of base64url: 32 random bytes.
KEY_FORM = re.compile(r"tk_[A-Za-z0-9_-]{43}")


class BadKeyRequest(ValueError):
    """A key's name or scopes that cannot be used."""


@dataclass(frozen=True, slots=True)
class Actor:
    name: str
    kind: str  # "admin" (the admin key), "key" (a machine key), "agent" (a person), "cli"
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope in self.scopes


ADMIN_ACTOR = Actor(ADMIN, "admin", frozenset(SCOPES))


def agent(name: str, roles: list[str] | tuple[str, ...]) -> Actor:
    """A person signed in with roles: the union of their roles' scopes (unknown roles add none)."""
    scopes: frozenset[str] = frozenset()
    for role in roles:
        scopes |= ROLE_SCOPES.get(role, frozenset())
    return Actor(name, "agent", scopes)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def check_key_request(name: str, scopes: list[str]) -> tuple[str, list[str]]:
    """A new key's name and scopes, checked: the scopes deduplicated in the contract's order."""
    if not KEY_NAME.fullmatch(name) or name == ADMIN:
        raise BadKeyRequest(f"{name[:70]!r} is not a usable key name: 1-63 of a-z 0-9 _ . - starting with "
                            f"a letter or digit, and not {ADMIN!r}")
    if not scopes:
        raise BadKeyRequest("a key needs at least one --scope: " + ", ".join(SCOPES))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise BadKeyRequest(f"unknown scope {unknown[0][:70]!r}: use " + ", ".join(SCOPES))
    return name, [s for s in SCOPES if s in scopes]
