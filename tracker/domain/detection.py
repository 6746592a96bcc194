"""The overwrite detector: from what the shopping tab reports, decide whose link is on the order.

Rules:
- The chain our partner URL starts is ours, up to and including the first page on one of the
  merchant's hosts: every network click value seen there is bound to the session as ours.
- After that, the first value of our own network's click parameter is ours too; a later different value
  of a bound parameter is another publisher of the same network. Any other network's landing parameter
  or redirect host is foreign, and so is the stand-down marker afsrc=1.
- Promo codes other than the merchant's own are foreign. Ad-platform click ids, another device, a
  basket filled before activation and excluded stores are risks: listed, state unchanged.
- `overwritten` is for good; `expired` once the session TTL has passed; after a postback (`converted`)
  signals are kept as late and change nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, TypeAlias
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import orjson

from . import trail
from .catalog import AffiliateCatalog, Hit, host_of, query_fields
from .merchants import Merchant
from .signals import MAX_PER_CLICK, Evidence, Signal, digest
from .states import ClickState, StoredState
from .targets import host_allowed
from .text import has_control, without_control
from .trail import TrailEntry

DEFINITIVE = frozenset(("foreign_affiliate_param", "foreign_redirect_host", "foreign_promo_code"))
_STORE_PATH = re.compile(r"/store/(\d{1,20})")
_STORE_PARAMS = ("storeid", "store_id", "sellerid", "seller_id", "shopid", "shop_id")
# A scheme other than http(s) (about:blank, chrome://newtab, javascript:): not a web page, nothing
# for a network to put there. Any other URL the detector cannot read is an unreadable_url risk.
_OTHER_SCHEME = re.compile(r"(?!https?:)[a-z][a-z0-9+.-]*:", re.IGNORECASE)
# Evidence quotes at most this much of a URL: the query is cut there before it is taken apart.
_EVIDENCE_QUERY = 2048
Found: TypeAlias = tuple[str, str | None, Evidence]  # a signal's kind, network and evidence, before its time
# A navigation's finding, with the URL its evidence quotes still to be made (None: nothing to quote).
# Shortening a URL's values costs more than finding its signals, and only a signal new to the click
# keeps its first URL: a repeat, or one past the click's 100, never needs it.
Quoted: TypeAlias = tuple[str, str | None, Evidence, Callable[[], str] | None]


class BadEvent(ValueError):
    pass


@dataclass(slots=True)
class SessionState:
    """A click's detector state while an observe works on it; stored as its dump (StoredState)."""
    state: ClickState = ClickState.ACTIVE
    landed: bool = False
    bound: dict[str, str] = field(default_factory=dict)  # "network:param" -> value that is ours
    overwritten_at: int | None = None
    expired_signalled: bool = False
    trail: list[TrailEntry] = field(default_factory=list)  # for support: domain/trail.py
    seen: list[str] = field(default_factory=list)  # digests of the click's signals (signals.admit)
    # Not stored: new signals this observe found for a click that holds MAX_PER_CLICK already, left
    # out at once (admit() would drop them) so that a flood of them costs no more than finding them.
    over_cap: int = 0

    def dump(self) -> StoredState:
        return {"state": self.state, "landed": self.landed, "bound": self.bound,
                "overwritten_at": self.overwritten_at, "expired_signalled": self.expired_signalled,
                "trail": list(self.trail), "seen": list(self.seen)}

    @classmethod
    def load(cls, raw: StoredState | None) -> "SessionState":
        raw = raw or {}
        seen = raw.get("seen")
        return cls(state=ClickState(raw.get("state", ClickState.ACTIVE)), landed=bool(raw.get("landed")),
                   bound=dict(raw.get("bound") or {}), overwritten_at=raw.get("overwritten_at"),
                   expired_signalled=bool(raw.get("expired_signalled")), trail=trail.load(raw.get("trail")),
                   seen=[d for d in seen if isinstance(d, str)][:MAX_PER_CLICK] if isinstance(seen, list) else [])


@dataclass(frozen=True)
class ClickContext:
    click_id: str
    created_ms: int
    device: str | None
    merchant: Merchant
    our_network: str | None
    converted: bool


def _shorten(value: str, keep: frozenset[str]) -> str:
    if value in keep or len(value) <= 10:
        return value
    return value[:6] + "…"


def sanitize(url: str, keep: frozenset[str]) -> str:
    """The URL with our own identifiers kept and others' values shortened (evidence, not a copy)."""
    try:
        parts = urlsplit(url)
        pairs = parse_qsl(parts.query[:_EVIDENCE_QUERY], keep_blank_values=True)
    except ValueError:
        return url[:200]
    query = urlencode([(k, _shorten(v, keep)) for k, v in pairs], safe=":/…")
    return urlunsplit((parts.scheme, parts.netloc, parts.path[:200], query, ""))[:512]


# The JSON types each event field may have (absent or null always may): a field of another type is
# a client bug, refused with 400, while a time that does not parse means now. A navigation's `url` is
# not here: a URL that cannot be parsed is an unreadable_url risk, never a 400 (docs/api.md).
MAX_BASKET = 100_000
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "code": (str,), "device": (str,), "at": (str, int, float),
    "basket_items_before_activation": (int,), "store_id": (str, int),
}


def event_type(event: dict[str, Any]) -> str:
    """The event's type, for messages: only ever a short plain string (a client can nest anything
    there, and turning a deeply nested value into text recurses without bound)."""
    kind = event.get("type")
    return kind[:20] if isinstance(kind, str) and not has_control(kind) else "event"


def check_field_types(event: dict[str, Any]) -> None:
    kind = event.get("type")
    if not isinstance(kind, str) or has_control(kind):
        raise BadEvent("type must be text")
    for name, types in _FIELD_TYPES.items():
        value = event.get(name)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise BadEvent(f"{event_type(event)}: {name} has the wrong type")
        # What a shopper typed or a device reported never holds control characters, and PostgreSQL
        # could not store a NUL: refused here rather than stopping the signal writer later.
        if isinstance(value, str) and name != "at" and has_control(value):
            raise BadEvent(f"{event_type(event)}: {name} has control characters")
    items = event.get("basket_items_before_activation")
    if items is not None and not 0 <= items <= MAX_BASKET:
        raise BadEvent(f"{event_type(event)}: basket_items_before_activation must be a count")


def parse_at(raw: Any, created_ms: int, now_ms: int) -> int:
    """An event's time in ms, from the client's clock, clamped to [click creation, server now]."""
    ms = now_ms
    if isinstance(raw, str) and raw:
        try:
            parsed = datetime.fromisoformat(raw.strip())
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            ms = int(parsed.timestamp() * 1000)
        except (ValueError, OverflowError, OSError):
            ms = now_ms
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        try:
            ms = int(raw * 1000 if raw < 1e11 else raw)
        except (OverflowError, ValueError):  # inf or nan from a client's clock: not a time
            ms = now_ms
    return min(max(ms, created_ms), now_ms)


class Detector:
    def __init__(self, catalog: AffiliateCatalog) -> None:
        self.catalog = catalog

    def observe(self, ctx: ClickContext, state: SessionState, events: list[dict[str, Any]],
                now_ms: int) -> list[Signal]:
        """Apply events in time order; return the new signals (state is updated in place)."""
        for event in events:
            check_field_types(event)
        signals: list[Signal] = []
        ttl_ms = ctx.merchant.session_ttl * 1000
        timed = sorted(((parse_at(e.get("at"), ctx.created_ms, now_ms), i, e) for i, e in enumerate(events)),
                       key=lambda t: (t[0], t[1]))
        known = set(state.seen)
        fresh: set[str] = set()  # this request's signals new to the click, up to what it may still hold
        for at, _, event in timed:
            late = ctx.converted or state.state == ClickState.CONVERTED
            if not late and at > ctx.created_ms + ttl_ms and state.state == ClickState.ACTIVE:
                state.state = ClickState.EXPIRED
            if not late and state.state == ClickState.EXPIRED and not state.expired_signalled:
                state.expired_signalled = True
                signals.append(self._signal("session_expired", None, {
                    "session_ttl_s": ctx.merchant.session_ttl}, ctx.created_ms + ttl_ms, False))
            kind = event.get("type")
            found: list[Found] | list[Quoted]
            if kind == "navigation":
                found = self._navigation(ctx, state, event.get("url"), at)
            elif kind == "promo_code":
                found = self._promo(ctx, event.get("code"))
                typed = trail.promo(at, event.get("code"), not found)
                if typed is not None:
                    trail.record(state.trail, typed)
            elif kind == "checkout":
                found = self._checkout(ctx, event)
                trail.record(state.trail, trail.checkout(at, event))
            else:
                raise BadEvent(f"unknown event type {event_type(event)!r}")
            for sig_kind, network, evidence, *quote in found:
                signal = self._signal(sig_kind, network, evidence, at, late)
                if quote and quote[0] is not None:
                    d = digest(signal.identity)
                    if d not in known and d not in fresh:
                        if len(known) + len(fresh) >= MAX_PER_CLICK:
                            state.over_cap += 1
                            continue
                        fresh.add(d)
                        signal.evidence["url"] = without_control(quote[0]())
                signals.append(signal)
                if not late and sig_kind in DEFINITIVE and state.state == ClickState.ACTIVE:
                    state.state = ClickState.OVERWRITTEN
                    state.overwritten_at = at
        if ctx.converted:
            state.state = ClickState.CONVERTED
        return signals

    @staticmethod
    def _signal(kind: str, network: str | None, evidence: Evidence, at: int, late: bool) -> Signal:
        # Evidence quotes decoded URL values (a parameter's value, a nested URL): kept, but with
        # any control character replaced, so that what is stored is what PostgreSQL can store.
        evidence = {k: without_control(v) if isinstance(v, str) else v for k, v in evidence.items()}
        return Signal(kind, network, evidence, at, late)

    def _navigation(self, ctx: ClickContext, state: SessionState, url: Any,
                    at: int = 0) -> list[Quoted]:
        if not isinstance(url, str):
            # No text to search (a number, a list, null, or no url at all): never taken for clean.
            return [("unreadable_url", None, {"url": orjson.dumps(url).decode()[:200]}, None)]
        if _OTHER_SCHEME.match(url):
            return []
        # Browsers report URLs percent-encoded: raw control characters mean a garbled one. Neither it
        # nor one without a host can be searched, and a URL not searched is never taken for clean.
        host = None if has_control(url) else host_of(url)
        if host is None:
            return [("unreadable_url", None, {"url": url[:200]}, None)]
        merchant = ctx.merchant
        hits = self.catalog.scan(url)
        ours_prefix = url.startswith(merchant.partner_url.split("{", 1)[0]) or (
            merchant.app_url is not None and url.startswith(merchant.app_url.split("{", 1)[0]))
        # A network's redirect host on the merchant's domain (s.click.aliexpress.com) is still the chain.
        on_store = host_allowed(host, merchant.allowed_hosts) and self.catalog.host_network(host) is None
        in_chain = not state.landed
        if on_store:
            state.landed = True
        keep = frozenset([ctx.click_id, *state.bound.values()])
        out: list[Quoted] = []
        seen: set[tuple[str, str | None]] = set()
        shown: dict[str, str] = {}  # each URL sanitized once, however many signals quote it

        def quote(where: str) -> Callable[[], str]:
            def made() -> str:
                if where not in shown:
                    shown[where] = sanitize(where, keep)
                return shown[where]
            return made

        def add(kind: str, hit: Hit, **extra: bool) -> None:
            if (kind, hit.network) in seen:
                return
            seen.add((kind, hit.network))
            evidence: Evidence = {"host": hit.host}
            if hit.param:
                evidence["param"] = hit.param
                evidence["value"] = _shorten(hit.value or "", keep)
            evidence.update(extra)
            out.append((kind, hit.network, evidence, quote(hit.url or url)))

        for hit in hits:
            if hit.risk:
                if not in_chain and hit.kind in ("param", "marker"):
                    add("ad_click_id", hit)
                continue
            if hit.kind == "standdown":
                if not in_chain:
                    add("foreign_affiliate_param", hit, standdown=True)
                continue
            if ours_prefix or in_chain:
                if hit.kind == "param":
                    state.bound.setdefault(f"{hit.network}:{hit.param}", without_control(hit.value or ""))
                continue
            if hit.kind == "param":
                key = f"{hit.network}:{hit.param}"
                bound = state.bound.get(key)
                if bound is not None:
                    if bound != without_control(hit.value or ""):
                        add("foreign_affiliate_param", hit, same_network=True)
                elif hit.network == ctx.our_network:
                    state.bound[key] = without_control(hit.value or "")
                else:
                    add("foreign_affiliate_param", hit)
            elif hit.kind == "marker":
                if hit.network != ctx.our_network:
                    add("foreign_affiliate_param", hit)
            elif hit.kind == "host":
                add("foreign_redirect_host", hit, same_network=hit.network == ctx.our_network)
        if on_store and merchant.excluded_stores:
            store = self._store_id(url)
            if store and store in merchant.excluded_stores:
                out.append(("excluded_store", None, {"store_id": store}, quote(url)))
        # The redirect chain and the landing, for support's timeline (while the trail has room for them).
        if in_chain and trail.has_room(state.trail, "landing" if state.landed else "chain"):
            ours = frozenset([ctx.click_id, *state.bound.values()])
            trail.record(state.trail, trail.navigation(at, sanitize(url, ours), state.landed))
        return out

    @staticmethod
    def _store_id(url: str) -> str | None:
        parts = urlsplit(url)
        match = _STORE_PATH.search(parts.path)
        if match:
            return match.group(1)
        for _, value in query_fields(parts.query, _STORE_PARAMS):
            return unquote_plus(value)[:32]
        return None

    @staticmethod
    def _promo(ctx: ClickContext, code: Any) -> list[Found]:
        if not isinstance(code, str):
            raise BadEvent("promo_code: code must be text")
        code = code.strip()
        if not code or ctx.merchant.is_own_code(code):
            return []
        return [("foreign_promo_code", None, {"code": code[:64]})]

    @staticmethod
    def _checkout(ctx: ClickContext, event: dict[str, Any]) -> list[Found]:
        out: list[Found] = []
        device = event.get("device")
        if device is not None and not isinstance(device, str):
            raise BadEvent("checkout: device must be text")
        if device and ctx.device and device[:128] != ctx.device:
            out.append(("cross_device", None, {"activated_on": ctx.device, "ordered_on": device[:128]}))
        items = event.get("basket_items_before_activation")  # type and range: check_field_types
        if items:
            out.append(("prefilled_basket", None, {"items": items}))
        store = event.get("store_id")
        if isinstance(store, str | int) and str(store) in ctx.merchant.excluded_stores:
            out.append(("excluded_store", None, {"store_id": str(store)}))
        return out
