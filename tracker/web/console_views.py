"""The console's click page (diagnosis first, then the timeline to scale) and 24-hour overview."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

import asyncpg
from aiohttp import web

from .. import keys
from ..domain.charts import bars, columns
from ..domain.clickid import is_click_id
from ..domain.console_session import Session
from ..domain.conversions import money
from ..domain.detection import DEFINITIVE
from ..domain.diagnosis import ClickFacts, Finding, diagnose
from ..domain.timeline import moments, network_name
from ..domain.timeline_svg import layout
from ..domain.trail import TrailEntry
from ..errors import NotFound
from ..store.cases import ClickCase, click_case
from ..store.lookups import tab_trail
from ..store.overview import Overview, overview
from .audit import audited
from .console_guard import render

GOOD, BAD, WAIT = "good", "bad", "wait"


def when(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def safe_href(url: Any) -> str | None:
    """A URL fit for an href: http(s) with a host, nothing else (never javascript: or data:)."""
    if not isinstance(url, str) or len(url) > 4096 or any(ord(c) < 0x21 for c in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme in ("http", "https") and parts.hostname else None


def filters() -> dict[str, Callable[..., Any]]:
    return {"when": when, "safe_href": safe_href, "money": money}


def verdict(facts: ClickFacts, findings: list[Finding]) -> tuple[str, str]:
    """One line for the top of the page: what the shopper gets, from the diagnosis."""
    codes = [f.code for f in findings]
    due = [c for c in facts.conversions if c["status"] == "approved" and c["cashback"] > 0]
    if facts.bot:
        return BAD, "No cashback: a bot's click, not a shopper's"
    if due:
        return GOOD, "Cashback due: " + ", ".join(f"{money(c['cashback'], c['currency'])} {c['currency']}"
                                                  for c in due)
    # An order our network reported settles attribution, whatever the tab saw; then the signals.
    for code, text in (("order_declined", "the order was declined"), ("order_reversed", "the order was reversed"),
                       ("zero_commission", "the goods earn no commission")):
        if code in codes:
            return BAD, f"No cashback: {text}"
    if "order_pending" in codes:
        return WAIT, "Order pending: cashback once the store approves it"
    for code, text in (("overwritten", "the link was overwritten"), ("foreign_promo_code", "a promo code that is not ours"),
                       ("order_after_session", "the order came after the session")):
        if code in codes:
            return BAD, f"No cashback: {text}"
    if "awaiting_postback" in codes:
        return WAIT, "No order reported yet"
    return BAD, "No cashback: no order was reported for this click"


async def click_page(request: web.Request, session: Session) -> web.StreamResponse:
    app, click_id = request.app, request.match_info["click_id"]
    if not is_click_id(click_id):
        raise NotFound("no such click")
    async def read(pool: asyncpg.Pool) -> tuple[ClickCase | None, list[TrailEntry]]:
        case = await click_case(pool, app[keys.MERCHANTS].merchants.get, click_id)
        return case, (await tab_trail(pool, click_id) if case is not None else [])

    (case, trail), origin = await app[keys.READS].read(
        read, lag=True, users=lambda found: [found[0].click["user_id"]] if found[0] else [])
    if case is None:
        raise NotFound("no such click")
    click, merchant, conversions, signals, facts = (case.click, case.merchant, case.conversions, case.signals,
                                                    case.facts)
    await audited(request, session.actor(), "click.read", [(click["user_id"], click_id, None)])
    findings = diagnose(facts)
    story = moments(click, merchant, signals, conversions, facts.session_ttl, trail)
    lost = next((s["at"] for s in signals if s["kind"] in DEFINITIVE and not s.get("late")), None)
    tone, headline = verdict(facts, findings)
    return render(request, session, "click.html", click=click, merchant=merchant, facts=facts, findings=findings,
                  tone=tone, headline=headline, story=story, drawing=layout(story, click["created_at"],
                                                                            facts.session_ttl, lost),
                  conversions=conversions, target_href=safe_href(click["target"]), origin=origin)


def _charts(data: Overview, since: datetime, names: dict[str, str]) -> dict[str, Any]:
    shoppers = {r["merchant"]: r["shoppers"] for r in data["activations"]}
    overwritten = {r["merchant"]: r["n"] for r in data["overwritten"]}
    start = since.replace(minute=0, second=0, microsecond=0)
    per_hour = {r["hour"]: r["n"] for r in data["hourly"]}
    hours = [(f"{(start + timedelta(hours=i)):%H}h", per_hour.get(start + timedelta(hours=i), 0)) for i in range(25)]
    merchants = sorted(shoppers, key=lambda m: -shoppers[m])
    activation_rows = []
    for m in merchants:
        total, lost = shoppers[m], min(overwritten.get(m, 0), shoppers[m])
        share = f"{lost / total:.0%}" if total else "0%"
        activation_rows.append((names.get(m, m), [(lost, "bar-bad"), (total - lost, "bar-ok")],
                                f"{total:,} · {share} overwritten"))
    networks: dict[str, int] = {}
    for r in data["by_network"]:
        networks[r["network"]] = networks.get(r["network"], 0) + r["n"]
    network_rows = [(network_name(n) if n != "promo code" else "promo codes (no network)", [(v, "bar-bad")],
                     f"{v:,} click{'s' if v != 1 else ''}") for n, v in sorted(networks.items(), key=lambda kv: -kv[1])]
    statuses: dict[str, dict[str, int]] = {}
    for c in data["conversions"]:
        statuses.setdefault(c["merchant"], {})[c["status"]] = c["n"]
    order = ("approved", "pending", "declined", "reversed")
    conversion_rows = [(names.get(m, m), [(s.get(k, 0), f"bar-{k}") for k in order],
                        " · ".join(f"{s[k]} {k}" for k in order if s.get(k)))
                       for m, s in sorted(statuses.items(), key=lambda kv: -sum(kv[1].values()))]
    return {"hours": columns(hours), "activations": bars(activation_rows), "networks": bars(network_rows),
            "conversions": bars(conversion_rows), "total": sum(shoppers.values()),
            "total_overwritten": sum(min(overwritten.get(m, 0), shoppers[m]) for m in shoppers),
            "total_conversions": sum(sum(s.values()) for s in statuses.values())}


async def overview_page(request: web.Request, session: Session) -> web.StreamResponse:
    now = datetime.now(timezone.utc)
    since = now - timedelta(hours=24)
    data, origin = await request.app[keys.READS].read(lambda pool: overview(pool, since), lag=True)
    names = {slug: m.name for slug, m in request.app[keys.MERCHANTS].merchants.items()}
    return render(request, session, "overview.html", since=since, now=now, charts=_charts(data, since, names),
                  origin=origin)
