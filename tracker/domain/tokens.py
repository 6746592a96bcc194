"""Signed user tokens: `<user id>.<signature>`, HMAC-SHA256 with TRACKER_SECRET, checked in constant time."""
from __future__ import annotations

import base64
import hashlib
import hmac
import re

USER_ID = re.compile(r"[A-Za-z0-9_@:.\-]{1,64}")
_SIG_LEN = 22  # 16 bytes of the MAC, base64url without padding
MAX_TOKEN = 64 + 1 + _SIG_LEN


class InvalidUserId(ValueError):
    pass


class UserTokens:
    __slots__ = ("_key", "_seen")
    CACHE = 50_000

    def __init__(self, secret: str) -> None:
        # A derived key, so the same secret can sign other things without cross-use.
        self._key = hmac.new(secret.encode(), b"tracker/user-token/v1", hashlib.sha256).digest()
        # Tokens already verified (a shopper activates several stores in a row): a dict lookup
        # instead of an HMAC. Only valid tokens are kept, so forgeries cannot fill it.
        self._seen: dict[str, str] = {}

    def _sign(self, user_id: str) -> str:
        mac = hmac.new(self._key, user_id.encode(), hashlib.sha256).digest()[:16]
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
        if not hmac.compare_digest(sig, self._sign(user_id)):
            return None
        if len(self._seen) >= self.CACHE:
            self._seen.clear()
        self._seen[token] = user_id
        return user_id
