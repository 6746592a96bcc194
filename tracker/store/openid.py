"""The company's OpenID Connect provider as the console reaches it: its discovery document (fetched
when first needed, its `issuer` checked to be exactly TRACKER_OIDC_ISSUER), its published keys
(cached, fetched again when a token names a key id they lack, at most once a minute), and the code
exchange at its token endpoint (client_secret_basic, with the flow's PKCE verifier).

A provider that cannot be reached, answers garbage or 5xx, or publishes a document for another
issuer raises ProviderUnavailable: the console answers 503 and logs why, never a 500. The client
secret, codes and tokens never reach a log line or an exception's text."""
from __future__ import annotations

import asyncio
import base64
import time
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import structlog
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from ..domain.openid import OpenIDSettings, UnknownKey, provider_url, verify_id_token

log = structlog.get_logger("tracker.openid")

TIMEOUT = 5.0
JWKS_REFRESH = 60.0  # a key id we do not know fetches the key set again at most this often
METADATA_TTL = 24 * 3600.0
MAX_DOCUMENT = 256 * 1024


class ProviderUnavailable(Exception):
    """The provider cannot serve a sign-in now (unreachable, an error, a document that does not fit)."""


class CodeRefused(Exception):
    """The token endpoint refused the code (used already, expired, not this client's): its OAuth
    error code, which the provider chose from a fixed list."""


class Provider:
    def __init__(self, settings: OpenIDSettings, timeout: float = TIMEOUT) -> None:
        self.settings = settings
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: aiohttp.ClientSession | None = None
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: KeySet | None = None
        self._keys_at = float("-inf")
        self._lock = asyncio.Lock()
        self.jwks_fetches = 0  # how often the key set was fetched (tests read it)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=self._timeout, raise_for_status=False)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def _get_json(self, url: str, what: str) -> Any:
        try:
            async with self._session().get(url, headers={"Accept": "application/json"},
                                           allow_redirects=False) as resp:
                body = await resp.content.read(MAX_DOCUMENT + 1)
                if resp.status != 200:
                    raise ProviderUnavailable(f"the provider's {what} answered HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ProviderUnavailable(f"the provider's {what} cannot be reached ({type(exc).__name__})") from None
        if len(body) > MAX_DOCUMENT:
            raise ProviderUnavailable(f"the provider's {what} is larger than {MAX_DOCUMENT} bytes")
        try:
            return orjson.loads(body)
        except ValueError:
            raise ProviderUnavailable(f"the provider's {what} is not JSON") from None

    async def metadata(self) -> dict[str, Any]:
        """The discovery document: fetched once (and again after a day), checked."""
        if self._metadata is not None and time.monotonic() - self._metadata_at < METADATA_TTL:
            return self._metadata
        async with self._lock:
            if self._metadata is not None and time.monotonic() - self._metadata_at < METADATA_TTL:
                return self._metadata
            doc = await self._get_json(self.settings.discovery_url, "discovery document")
            if not isinstance(doc, dict):
                raise ProviderUnavailable("the provider's discovery document is not a JSON object")
            if doc.get("issuer") != self.settings.issuer:
                raise ProviderUnavailable(
                    f"the provider's discovery document names the issuer {str(doc.get('issuer'))[:200]!r}, "
                    f"not TRACKER_OIDC_ISSUER {self.settings.issuer!r}")
            for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                value = doc.get(name)
                if not isinstance(value, str) or not provider_url(value):
                    raise ProviderUnavailable(f"the provider's discovery document has no usable {name}")
            self._metadata, self._metadata_at = doc, time.monotonic()
            return doc

    async def _key_set(self, refresh: bool) -> KeySet:
        """The published keys: cached; `refresh` fetches them again unless that was done within a minute."""
        if self._keys is not None and not (refresh and time.monotonic() - self._keys_at >= JWKS_REFRESH):
            return self._keys
        async with self._lock:
            if self._keys is not None and not (refresh and time.monotonic() - self._keys_at >= JWKS_REFRESH):
                return self._keys
            uri = (await self._metadata_unlocked())["jwks_uri"]
            doc = await self._get_json(uri, "key set (jwks_uri)")
            self._keys_at = time.monotonic()
            self.jwks_fetches += 1
            try:
                keys = KeySet.import_key_set(doc)
            except (JoseError, ValueError, TypeError, KeyError):
                raise ProviderUnavailable("the provider's key set (jwks_uri) holds no usable key") from None
            self._keys = keys
            return keys

    async def _metadata_unlocked(self) -> dict[str, Any]:
        if self._metadata is None:
            raise ProviderUnavailable("the provider's discovery document was not read")
        return self._metadata

    async def exchange(self, code: str, redirect_uri: str, verifier: str) -> str:
        """The ID token the token endpoint gives for the code (CodeRefused when it will not)."""
        endpoint = (await self.metadata())["token_endpoint"]
        s = self.settings
        # RFC 6749 2.3.1: the id and secret are form-encoded before they are joined and base64-encoded.
        basic = base64.b64encode(f"{quote(s.client_id, safe='')}:{quote(s.client_secret, safe='')}".encode()).decode()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": verifier}
        try:
            async with self._session().post(endpoint, data=form, allow_redirects=False,
                                            headers={"Authorization": f"Basic {basic}",
                                                     "Accept": "application/json"}) as resp:
                body = await resp.content.read(MAX_DOCUMENT + 1)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ProviderUnavailable(f"the provider's token endpoint cannot be reached ({type(exc).__name__})") \
                from None
        try:
            doc = orjson.loads(body) if len(body) <= MAX_DOCUMENT else None
        except ValueError:
            doc = None
        if status in (400, 401) and isinstance(doc, dict) and doc.get("error") in ("invalid_client",
                                                                                   "unauthorized_client"):
            # Not this code's fault: the provider does not take tracker's client id and secret.
            raise ProviderUnavailable(f"the provider's token endpoint refused tracker's client credentials "
                                      f"({doc['error']}): check TRACKER_OIDC_CLIENT_ID and TRACKER_OIDC_CLIENT_SECRET")
        if status in (400, 401) and isinstance(doc, dict) and isinstance(doc.get("error"), str):
            error = doc["error"]
            raise CodeRefused(error if error.isascii() and error.replace("_", "").isalpha() else "invalid_grant")
        if status != 200 or not isinstance(doc, dict):
            raise ProviderUnavailable(f"the provider's token endpoint answered HTTP {status}")
        token = doc.get("id_token")
        if not isinstance(token, str):
            raise ProviderUnavailable("the provider's token endpoint answered without an ID token")
        return token

    async def verify(self, token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims (BadIDToken when it does not verify). A key id the cached set lacks
        fetches the set again once (the provider rotated its keys), at most once a minute."""
        await self.metadata()
        s = self.settings
        try:
            return verify_id_token(token, await self._key_set(False), issuer=s.issuer, client_id=s.client_id,
                                   nonce=nonce)
        except UnknownKey:
            return verify_id_token(token, await self._key_set(True), issuer=s.issuer, client_id=s.client_id,
                                   nonce=nonce)

    async def probe(self) -> None:
        """At start: read the discovery document, and say so when the provider cannot be reached
        (the console starts anyway; a sign-in tries again)."""
        try:
            await self.metadata()
        except ProviderUnavailable as exc:
            log.warning("oidc_provider_unreachable_at_start", issuer=self.settings.issuer, reason=str(exc))
        else:
            log.info("oidc_provider_ready", issuer=self.settings.issuer)
