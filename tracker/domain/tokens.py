"""Signed user tokens: `<user id>.<signature>`, HMAC-SHA256 with TRACKER_SECRET, checked in constant time."""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time

USER_ID = re.compile(r"[A-Za-z0-9_@:.\-]{1,64}")
_SIG_LEN = 22  # 16 bytes of the MAC, base64url without padding
MAX_TOKEN = 64 + 1 + _SIG_LEN


class InvalidUserId(ValueError):
    pass


def same_secret(given: str, expected: str) -> bool:
    """Constant-time equality of a secret sent to us and ours, for any text a client can send: a
    header's bytes that are not UTF-8 arrive as lone surrogates, and non-ASCII `str`s are refused by
    compare_digest itself, so both sides are compared as bytes."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def _derive(secret: str) -> bytes:
    # A derived key, so the same secret can sign other things without cross-use.
    return hmac.new(secret.encode(), b"tracker/user-token/v1", hashlib.sha256).digest()


class UserTokens:
    """Mints with the current secret; verifies with it and, during a rotation's grace period, with
    the previous one (`previous_until`: a UNIX time after which the previous secret is refused)."""
    __slots__ = ("_key", "_seen", "_previous", "_previous_until")
    CACHE = 50_000

    def __init__(self, secret: str, previous: str = "", previous_until: float | None = None) -> None:
        self._key = _derive(secret)
        self._previous = _derive(previous) if previous else None
        self._previous_until = previous_until
        # Tokens already verified (a shopper activates several stores in a row): a dict lookup
        # instead of an HMAC. Only valid tokens are kept, so forgeries cannot fill it.
        self._seen: dict[str, str] = {}

    def _sign(self, user_id: str, key: bytes | None = None) -> str:
        mac = hmac.new(key or self._key, user_id.encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def mint(self, user_id: str) -> str:
        if not USER_ID.fullmatch(user_id):
            raise InvalidUserId("a user id is 1-64 characters of A-Z a-z 0-9 _ @ : . -")
        return f"{user_id}.{self._sign(user_id)}"

    def verify(self, token: str | None) -> str | None:
        """The user id a token was minted for, or None for anything else."""
        if not token or len(token) > MAX_TOKEN:
            return None
        known = self._seen.get(token)
        if known is not None:
            return known
        user_id, dot, sig = token.rpartition(".")
        if not dot or len(sig) != _SIG_LEN or not USER_ID.fullmatch(user_id):
            return None
        if not same_secret(sig, self._sign(user_id)):
            # Not the current secret's. Within the grace period the previous secret's tokens still
            # pass; they are not cached, so that they stop passing the moment the period ends.
            if self._previous is not None and (self._previous_until is None
                                               or time.time() < self._previous_until):
                if same_secret(sig, self._sign(user_id, self._previous)):
                    return user_id
            return None
        if len(self._seen) >= self.CACHE:
            self._seen.clear()
        self._seen[token] = user_id
        return user_id
