"""Webhook subscribers as the merchants file names them, Standard Webhooks signing, and the retry
schedule. Pure code.

Signing follows https://www.standardwebhooks.com: the key is the base64 after `whsec_`; the
signature is `v1,` + base64(HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import random
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from .backoff import jittered
from .events import TYPES
from .networks import Entry, slug

SECRET_PREFIX = "whsec_"
# The specification's secrets are 24 to 64 random bytes.
MIN_KEY, MAX_KEY = 24, 64
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
RETRY_FOR = 24 * 3600  # a delivery is retried at least this long before it counts as failed
RETRY_CAP = 3600  # the longest wait between two attempts


@dataclass(frozen=True, slots=True)
class Webhook:
    name: str
    url: str
    secret: str
    types: tuple[str, ...] | None = None  # None: every type

    def __repr__(self) -> str:  # never the secret, whatever prints it
        return f"Webhook(name={self.name!r}, url={public_url(self.url)!r}, types={self.types!r})"


def signing_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret; ValueError when it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with {SECRET_PREFIX}")
    encoded = secret[len(SECRET_PREFIX):]
    if not _BASE64.fullmatch(encoded):
        raise ValueError(f"the part after {SECRET_PREFIX} must be standard base64")
    try:  # unpadded base64 is accepted too, as the reference libraries do
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SECRET_PREFIX} must be standard base64") from None
    if not MIN_KEY <= len(key) <= MAX_KEY:
        raise ValueError(f"the key must be {MIN_KEY} to {MAX_KEY} bytes (it is {len(key)})")
    return key


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    message = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def public_url(url: str) -> str:
    """The URL as logs and `webhooks status` show it: scheme, host, port and path, no query (a
    subscriber may have put a token there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable>"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def check_url(url: Any) -> str:
    """A subscriber URL: absolute http(s), a host, no credentials, nothing a client might read two
    ways. ValueError names what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("required: an http(s) URL")
    if not url.isascii() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 or c == "\\" for c in url):
        raise ValueError("must be ASCII without spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http or https URL")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@); sign with the secret instead")
    if not parts.hostname:
        raise ValueError("must name a host")
    if port == 0:
        raise ValueError("port 0 is not a port")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    return url


def _secret(value: str) -> str:
    signing_key(value)  # its ValueError never quotes the secret
    return value


def _types(value: list[str]) -> list[str]:
    unknown = sorted(set(value) - set(TYPES))
    if unknown:
        raise ValueError("; ".join(f"{t!r} is not one of {list(TYPES)}" for t in unknown))
    return value


class WebhookEntry(Entry):
    """A `webhooks:` entry: a subscriber."""
    HINTS: ClassVar[dict[str, str]] = {
        "name": "1-63 characters of a-z 0-9 _ -, starting with a letter or digit",
        "url": "required: an http(s) URL",
        "secret": f"required, {SECRET_PREFIX} + base64 of {MIN_KEY} to {MAX_KEY} random bytes",
        "types": "a non-empty list of event types, or leave it out for every type"}
    name: Annotated[str, AfterValidator(slug)]
    url: Annotated[str, AfterValidator(check_url)]
    secret: Annotated[str, AfterValidator(_secret)]
    types: Annotated[list[str], Field(min_length=1), AfterValidator(_types)] | None = None

    def webhook(self) -> Webhook:
        return Webhook(name=self.name, url=self.url, secret=self.secret,
                       types=tuple(sorted(set(self.types))) if self.types is not None else None)


def warnings_for(webhooks: tuple[Webhook, ...]) -> list[str]:
    return [f"webhook {w.name!r}: url: plain http: events (user ids, money) cross the network unencrypted"
            for w in webhooks if w.url.startswith("http://")]


def retry_delay(attempts: int, base: float, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after `attempts` failed ones: base x 2^(attempts-1), at most
    RETRY_CAP, with "equal jitter" (uniform in [d/2, d]) so that a subscriber coming back is not hit
    by every worker's retries in the same second."""
    return jittered(attempts, base, RETRY_CAP, rng)
