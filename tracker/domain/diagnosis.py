"""Why a cashback did or did not come, in plain words, from the recorded evidence."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from .conversions import money
from .detection import DEFINITIVE
from .merchants import CONFIRMATION_WINDOW, SESSION_TTL, Merchant
from .rows import ClickRow, ClickStateRow, ConversionRow, SignalRow
from .states import ClickState

NETWORK_NAMES = {
    "cj": "CJ", "impact": "impact.com", "rakuten": "Rakuten", "awin": "Awin", "shareasale": "ShareASale",
    "partnerize": "Partnerize", "pepperjam": "Pepperjam", "admitad": "Admitad", "epn": "ePN",
    "aliexpress_portals": "AliExpress Portals", "amazon": "Amazon Associates", "ebay": "eBay Partner Network",
    "skimlinks": "Skimlinks", "sovrn": "Sovrn", "tradedoubler": "Tradedoubler", "tradetracker": "TradeTracker",
    "webgains": "Webgains", "avantlink": "AvantLink", "clickbank": "ClickBank", "a8": "A8.net",
    "gdeslon": "Gdeslon", "yandex_market": "Yandex Market", "ozon": "Ozon", "google_ads": "Google Ads",
    "meta_ads": "Meta ads", "microsoft_ads": "Microsoft Ads", "tiktok_ads": "TikTok ads",
    "yandex_direct": "Yandex Direct", "x_ads": "X ads",
}


@dataclass(frozen=True)
class Finding:
    code: str
    text: str


@dataclass
class ClickFacts:
    created_at: datetime
    now: datetime
    bot: bool
    session_ttl: int
    confirmation_window: int
    merchant_name: str
    state: ClickState
    signals: list[SignalRow] = field(default_factory=list)
    conversions: list[ConversionRow] = field(default_factory=list)

    @classmethod
    def build(cls, click: ClickRow, merchant: Merchant | None, stored: ClickStateRow | None,
              signals: list[SignalRow], conversions: list[ConversionRow], now: datetime) -> "ClickFacts":
        ttl = merchant.session_ttl if merchant else SESSION_TTL
        window = merchant.confirmation_window if merchant else CONFIRMATION_WINDOW
        stored_state = stored["state"] if stored else None
        state = click_state(click["created_at"], now, ttl, stored_state, bool(conversions),
                            any(s["kind"] in DEFINITIVE and not s.get("late") for s in signals))
        return cls(created_at=click["created_at"], now=now, bot=bool(click["bot"]), session_ttl=ttl,
                   confirmation_window=window, merchant_name=merchant.name if merchant else click["merchant"],
                   state=state, signals=signals, conversions=conversions)


def click_state(created_at: datetime, now: datetime, session_ttl: int, stored_state: str | None,
                converted: bool, overwritten: bool) -> ClickState:
    """A click's state from what is recorded: a conversion wins, an overwrite is for good, and a
    session past its TTL has expired (the detector writes `expired` only when it hears of it)."""
    if converted or stored_state == ClickState.CONVERTED:
        return ClickState.CONVERTED
    if overwritten or stored_state == ClickState.OVERWRITTEN:
        return ClickState.OVERWRITTEN
    if now - created_at > timedelta(seconds=session_ttl):
        return ClickState.EXPIRED
    return ClickState.ACTIVE


def _after(facts: ClickFacts, at: datetime) -> str:
    minutes = max(0, int((at - facts.created_at).total_seconds() // 60))
    if minutes < 120:
        return f"{minutes} minute{'s' if minutes != 1 else ''} after activation"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} hours after activation"
    return f"{hours // 24} days after activation"


def _duration(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400} days"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} hours"
    return f"{seconds // 60} minutes"


def _network(slug: str | None) -> str:
    return NETWORK_NAMES.get(slug or "", slug or "another network")


def diagnose(facts: ClickFacts) -> list[Finding]:
    found: list[Finding] = []
    if facts.bot:
        found.append(Finding("bot_click", "This click was made by a link-preview bot or an automated "
                                          "request, not by a shopper; it is never attributed."))
    live = [s for s in facts.signals if not s.get("late")]
    first_def = next((s for s in live if s["kind"] in DEFINITIVE), None)
    if first_def is not None:
        when = _after(facts, first_def["at"])
        ev = first_def.get("evidence") or {}
        if first_def["kind"] == "foreign_promo_code":
            found.append(Finding("foreign_promo_code",
                                 f"A promo code that is not ours ({ev.get('code', '?')}) was used, {when}; "
                                 "the code's owner takes the attribution, so no cashback is paid."))
        else:
            same = first_def.get("network") and ev.get("same_network")
            who = (f"{_network(first_def.get('network'))} link of another publisher" if same else
                   f"{_network(first_def.get('network'))} link")
            found.append(Finding("overwritten",
                                 f"{who} replaced our affiliate link, {when} "
                                 f"(seen at {ev.get('host') or ev.get('param') or 'the store page'}); "
                                 "the order is attributed to whoever set the last link."))
    kinds = {s["kind"] for s in live}
    for s in live:
        if s["kind"] == "prefilled_basket":
            n = (s.get("evidence") or {}).get("items", "Some")
            found.append(Finding("prefilled_basket", f"{n} item(s) were already in the basket before "
                                                     "activation; goods carted before the click earn no cashback."))
            break
    if "cross_device" in kinds:
        found.append(Finding("cross_device", "The order was placed on another device than the one that "
                                             "activated cashback; the network cannot link it to our click."))
    if "excluded_store" in kinds:
        found.append(Finding("excluded_store", "The shopper was in a store excluded from cashback."))
    if "ad_click_id" in kinds:
        s = next(s for s in live if s["kind"] == "ad_click_id")
        found.append(Finding("ad_click", f"An advertising click ({_network(s.get('network'))}) was followed "
                                         "after activation; some stores credit the ad instead."))
    if "unreadable_url" in kinds:
        found.append(Finding("unreadable_url", "The extension reported a page address that could not be "
                                               "read; an affiliate link there would not have been seen."))
    session_end = facts.created_at + timedelta(seconds=facts.session_ttl)
    for conv in facts.conversions:
        order = conv["order_id"]
        cur = conv["currency"]
        order_time = conv.get("order_time")
        if order_time and order_time > session_end:
            found.append(Finding("order_after_session",
                                 f"Order {order} was placed {_after(facts, order_time)}, after the "
                                 f"{_duration(facts.session_ttl)} activation session had ended."))
        status = conv["status"]
        if status == "declined":
            found.append(Finding("order_declined", f"Order {order} was declined by the store "
                                                   f"({conv['status_word']}); no cashback is due."))
        elif status == "reversed":
            found.append(Finding("order_reversed", f"Order {order} was approved, then reversed "
                                                   f"({conv['status_word']}: a refund or dispute); no cashback is due."))
        elif Decimal(conv["commission"]) == 0:
            found.append(Finding("zero_commission",
                                 f"Order {order} is {status} with zero commission: the goods are not part "
                                 "of the affiliate programme (non-affiliate goods), so the cashback is 0."))
        elif status == "approved":
            found.append(Finding("order_approved", f"Order {order} was approved: cashback "
                                                   f"{money(conv['cashback'], cur)} {cur} is due."))
        else:
            found.append(Finding("order_pending", f"Order {order} is pending confirmation by the store: "
                                                  f"cashback {money(conv['cashback'], cur)} {cur} once approved."))
    if not facts.conversions and not facts.bot:
        deadline = facts.created_at + timedelta(seconds=facts.confirmation_window)
        if facts.now < deadline:
            found.append(Finding("awaiting_postback",
                                 "No order has been reported for this click yet; the network may report it "
                                 f"until {deadline:%Y-%m-%d} ({_duration(facts.confirmation_window)} after "
                                 "activation)."))
        else:
            found.append(Finding("no_postback",
                                 f"No order was reported within {_duration(facts.confirmation_window)} of "
                                 "activation; if the shopper has an order, it was not attributed to this click."))
    return found
