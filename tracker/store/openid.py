"""The company's OpenID Connect provider as the console reaches it: its discovery document (fetched
when first needed, its `issuer` checked to be exactly TRACKER_OIDC_ISSUER), its published keys
(cached, fetched again when a token names a key id they lack, at most once a minute), and the code
exchange at its token endpoint (client_secret_basic, with the flow's PKCE verifier).

A document is fetched by one request at a time, whose outcome every sign-in that asked meanwhile
shares; a failure is remembered for FAILURE_PAUSE seconds and answered at once to the sign-ins in
that time. So a provider that does not answer costs each sign-in at most one timeout, however many
arrive, and never more than one request per document per pause (not one each, queued one after
another, the last waiting as many timeouts as there were sign-ins before it).

A provider that cannot be reached, answers garbage or 5xx, or publishes a document for another
issuer raises ProviderUnavailable: the console answers 503 and logs why, never a 500. The client
secret, codes and tokens never reach a log line or an exception's text."""
from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, Awaitable, Callable, TypeVar
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
FAILURE_PAUSE = 5.0  # after a failed fetch, sign-ins are told at once for this long (no new request)
T = TypeVar("T")


class ProviderUnavailable(Exception):
    """The provider cannot serve a sign-in now (unreachable, an error, a document that does not fit)."""


class CodeRefused(Exception):
    """The token endpoint refused the code (used already, expired, not this client's): its OAuth
    error code, which the provider chose from a fixed list."""


class Provider:
    def __init__(self, settings: OpenIDSettings, timeout: float = TIMEOUT,
                 failure_pause: float = FAILURE_PAUSE) -> None:
        self.settings = settings
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._failure_pause = failure_pause
        self._http: aiohttp.ClientSession | None = None
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: KeySet | None = None
        self._keys_at = float("-inf")
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self.jwks_fetches = 0  # how often the key set was fetched (tests read it)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=self._timeout, raise_for_status=False)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def _once(self, what: str, fetch: Callable[[], Awaitable[T]]) -> T:
        """`fetch()`, one at a time: a caller that comes while it runs shares its outcome; a failure
        (ProviderUnavailable) is answered again at once for failure_pause seconds."""
        failed = self._failed.get(what)
        if failed is not None and time.monotonic() - failed[0] < self._failure_pause:
            raise ProviderUnavailable(failed[1])
        task = self._inflight.get(what)
        if task is None:
            task = self._inflight[what] = asyncio.ensure_future(fetch())
            task.add_done_callback(lambda done: self._settle(what, done))
        # shield: a sign-in whose client went away does not cancel the fetch the others wait for
        result: T = await asyncio.shield(task)
        return result

    def _settle(self, what: str, task: asyncio.Future[Any]) -> None:
        self._inflight.pop(what, None)
        exc = None if task.cancelled() else task.exception()  # retrieved here, whoever else awaited it
        if isinstance(exc, ProviderUnavailable):
            self._failed[what] = (time.monotonic(), str(exc))
        else:
            self._failed.pop(what, None)

    async def _get_json(self, url: str, what: str) -> Any:
        try:
            async with self._session().get(url, headers={"Accept": "application/json"},
                                           allow_redirects=False) as resp:
                body = await _read_body(resp)
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
        return await self._once("metadata", self._fetch_metadata)

    async def _fetch_metadata(self) -> dict[str, Any]:
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
        return await self._once("keys", self._fetch_keys)

    async def _fetch_keys(self) -> KeySet:
        uri = (await self.metadata())["jwks_uri"]
        doc = await self._get_json(uri, "key set (jwks_uri)")
        self._keys_at = time.monotonic()
        self.jwks_fetches += 1
        try:
            keys = KeySet.import_key_set(doc)
        except (JoseError, ValueError, TypeError, KeyError):
            raise ProviderUnavailable("the provider's key set (jwks_uri) holds no usable key") from None
        self._keys = keys
        return keys

    async def names_itself(self) -> bool:
        """Whether the provider puts `iss` in every authorization answer (RFC 9207): then an answer
        without it did not come from it."""
        return (await self.metadata()).get("authorization_response_iss_parameter_supported") is True

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
                body = await _read_body(resp)
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


async def _read_body(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body, up to MAX_DOCUMENT + 1 bytes (one read() returns only what has arrived yet:
    a document sent in several chunks would be cut)."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_DOCUMENT:
        chunk = await resp.content.read(MAX_DOCUMENT + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
