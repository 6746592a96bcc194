"""A click's story for the support console, in time order: activation, the redirect to the partner
link, what the shopping tab saw (signals with their evidence), the end of the session window, the
order and every postback. Pure: the console draws it (timeline_svg.py) and lists it.

Everything here that came from outside (URLs, codes, devices, postback parameters) stays plain
text; the template escapes it. A URL is split into parts so that the part that matters (the
foreign affiliate parameter, a redirect host, our click id) can be highlighted, never parsed into
markup."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote, urlsplit

from .conversions import money
from .diagnosis import NETWORK_NAMES
from .merchants import Merchant
from .rows import ClickRow, ConversionRow, PostbackRow, SignalRow
from .text import has_control
from .trail import TrailEntry

UrlParts = list[tuple[str, bool]]  # (text, highlighted)


@dataclass
class Moment:
    at: datetime
    kind: str  # ours | tab | overwrite | risk | session | order | postback
    title: str
    details: list[tuple[str, str]] = field(default_factory=list)
    url: UrlParts | None = None
    late: bool = False
    offset: str = ""


def network_name(slug: str | None) -> str:
    return NETWORK_NAMES.get(slug or "", slug or "another network")


def readable(url: str) -> str:
    """The URL with its escapes decoded, for reading (it is shown as text, never followed); as it
    came when decoding would bring out control characters or invalid UTF-8."""
    decoded = unquote(url, errors="strict") if "%" in url else url
    return url if has_control(decoded) else decoded


def url_parts(url: str, needle: str | None) -> UrlParts:
    """The URL cut around the first occurrence of `needle` (case-insensitive), highlighted."""
    if not needle:
        return [(url, False)]
    at = url.lower().find(needle.lower())
    if at < 0:
        return [(url, False)]
    return [(url[:at], False), (url[at:at + len(needle)], True), (url[at + len(needle):], False)]


def _param_needle(url: str, param: str | None) -> str | None:
    """`param=value` as it appears in the URL's query (the part a support agent must see)."""
    if not param:
        return None
    for pair in urlsplit(url).query.split("&"):
        if pair.split("=", 1)[0].lower() == param.lower():
            return pair
    return param


def offset_text(seconds: float) -> str:
    """+0:42, +12 min, +2 h 05 min, +3 d 4 h: how long after the activation."""
    s = max(0, int(seconds))
    if s < 60:
        return f"+{s} s"
    if s < 3600:
        return f"+{s // 60} min"
    if s < 86400:
        return f"+{s // 3600} h {s % 3600 // 60:02d} min"
    return f"+{s // 86400} d {s % 86400 // 3600} h"


def _readable_or_none(url: Any) -> str | None:
    if not isinstance(url, str):
        return None
    try:
        return readable(url)
    except UnicodeDecodeError:
        return url


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _word(value: object) -> str | None:
    """An evidence value that is text (evidence holds text, counts and flags)."""
    return value if isinstance(value, str) else None


def _signal(sig: SignalRow) -> Moment:
    kind, ev = sig["kind"], sig.get("evidence") or {}
    net = network_name(sig.get("network"))
    url = _readable_or_none(ev.get("url"))
    needle: str | None = None
    if kind == "foreign_affiliate_param":
        title = (f"Overwritten: another {net} publisher's parameter" if ev.get("same_network")
                 else f"Overwritten: {net} affiliate parameter")
        title += f" {ev['param']}" if ev.get("param") else " (stand-down marker)" if ev.get("standdown") else ""
        needle, tone = _param_needle(url or "", _word(ev.get("param"))), "overwrite"
    elif kind == "foreign_redirect_host":
        title, needle, tone = f"Overwritten: redirect through {net} ({_text(ev.get('host', '?'))})", _word(ev.get("host")), "overwrite"
    elif kind == "foreign_promo_code":
        title, tone = f"Promo code that is not ours: {_text(ev.get('code', '?'))}", "overwrite"
    elif kind == "ad_click_id":
        title, needle, tone = f"Advertising click ({net})", _param_needle(url or "", _word(ev.get("param"))), "risk"
    elif kind == "cross_device":
        title, tone = "Checkout on another device than the activation's", "risk"
    elif kind == "prefilled_basket":
        title, tone = f"Checkout: {_text(ev.get('items', '?'))} item(s) in the basket before activation", "risk"
    elif kind == "excluded_store":
        title, tone = f"Store excluded from cashback ({_text(ev.get('store_id', '?'))})", "risk"
    elif kind == "unreadable_url":
        title, tone = "A page address that could not be read (an overwrite there would go unseen)", "risk"
    elif kind == "session_expired":
        title, tone = "The tab was still shopping after the session window", "session"
    else:
        title, tone = kind, "risk"
    details = [(k.replace("_", " "), _text(v)) for k, v in ev.items() if k != "url"]
    count, last = sig.get("count") or 1, sig.get("last_at")
    if count > 1:
        details.append(("seen", f"{count} times" + (f", last at {last:%Y-%m-%d %H:%M:%S} UTC"
                                                    if isinstance(last, datetime) else "")))
    late = bool(sig.get("late"))
    if late:
        title += " (late: after the first postback, changes nothing)"
    return Moment(sig["at"], tone, title, details, url_parts(url, needle) if url else None, late)


def _postback(conv: ConversionRow, h: PostbackRow) -> Moment:
    cur = h.get("currency") or conv["currency"]
    moved = h.get("previous_status") and h["previous_status"] != h.get("status")
    title = f"Postback from {network_name(conv['network'])}: {h.get('status_word') or h.get('status')}"
    if h["outcome"] == "accepted" and moved:
        title += f" (status {h['previous_status']} → {h['status']})"
    elif h["outcome"] == "accepted":
        title += f" (order {h.get('status')})"
    else:
        title += f" ({h['outcome'].replace('_', ' ')})"
    details = [("order", conv["order_id"])]
    for name in ("amount", "commission"):
        if h.get(name) is not None:
            details.append((name, f"{money(h[name], cur)} {cur}"))
    # The parameters as sent are under Orders, in the postback's history.
    return Moment(h["received_at"], "postback", title, details)


def _tab(entry: TrailEntry) -> Moment | None:
    """A step of the shopping tab (domain/trail.py) that no signal tells."""
    at = datetime.fromtimestamp(entry["t"] / 1000, timezone.utc)
    kind = entry["e"]
    if kind in ("chain", "landing"):
        url = _readable_or_none(entry.get("url")) or ""
        host = urlsplit(url).hostname or "?"
        title = f"Landed on the store ({host})" if kind == "landing" else f"Redirect through {host}"
        return Moment(at, "tab", title, [], url_parts(url, None))
    if kind == "promo":
        if not entry.get("own"):
            return None  # a foreign code is a signal, listed as such
        return Moment(at, "tab", f"Our promo code {_text(entry.get('code', '?'))} entered")
    details = [(name, _text(value)) for name, value in (("device", entry.get("device")),
                                                         ("items carted before", entry.get("items")),
                                                         ("store id", entry.get("store"))) if value is not None]
    return Moment(at, "tab", "Checkout", details)


def moments(click: ClickRow, merchant: Merchant | None, signals: list[SignalRow],
            conversions: list[ConversionRow], session_ttl: int,
            tab: list[TrailEntry] | None = None) -> list[Moment]:
    start = click["created_at"]
    name = merchant.name if merchant else click["merchant"]
    found = [Moment(start, "ours", f"Activation: {name}, from {click['source']}",
                    [("device", click.get("device") or "not given"), ("client address", click.get("client_ip") or "?"),
                     ("user agent", click.get("user_agent") or "?"), ("bot", "yes" if click.get("bot") else "no")],
                    [("deep link ", False), *url_parts(click["target"], None)])]
    if merchant is not None:
        link = merchant.partner_link(click["click_id"], click["target"], click["source"] == "app")
        found.append(Moment(start, "ours", f"Redirected to the partner link of {network_name(merchant.network)}",
                            [("our click id", click["click_id"])],
                            url_parts(_readable_or_none(link) or link, click["click_id"])))
    found += [m for m in map(_tab, tab or []) if m is not None]
    found += [_signal(s) for s in signals]
    found.append(Moment(start + timedelta(seconds=session_ttl), "session",
                        f"End of the {offset_text(session_ttl)[1:]} session window: orders after this earn nothing"))
    for conv in conversions:
        order_time = conv.get("order_time")
        if order_time:
            found.append(Moment(order_time, "order", f"Order {conv['order_id']} placed (network's time)",
                                [("amount", f"{money(conv['amount'], conv['currency'])} {conv['currency']}")]))
        found += [_postback(conv, h) for h in conv["history"]]
    found.sort(key=lambda m: m.at)
    for m in found:
        m.offset = offset_text((m.at - start).total_seconds())
    return found
