"""Conversions, postback history and orphans in PostgreSQL.

Concurrent postbacks for one order (networks retry in parallel) meet at the unique key: the first
INSERT wins, the others wait for its commit, find the row and take a row lock before deciding the
status move, so the end state is the same whatever the interleaving.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Mapping, TypedDict, cast

import asyncpg

from ..domain import events
from ..domain.addresses import with_truncated_addresses, without_addresses
from ..domain.clickid import click_time, is_click_id
from ..domain.conversions import NEVER_ATTACHED, Conversion, Postback, Terms, cashback, orphan_reason, settle
from ..domain.merchants import Merchant
from ..domain.rows import ClickRow, ConversionRow, OrphanRow, PostbackRow
from .db import Connection
from .erasure import is_pseudonym
from .events import emit
from .support import get_click

# Currencies are char(3): read through rtrim, every code comes out as stored, never padded (the one
# place that trims them: nothing downstream strips a currency).
CURRENCY = "rtrim(currency) AS currency"


@dataclass(frozen=True, slots=True)
class Recorded:
    outcome: str  # accepted | duplicate | orphan | adjustment_refused
    conversion_id: int | None = None
    merchant: str | None = None
    status: str | None = None  # the conversion's status after this postback
    status_changed: bool = False
    click_id: str | None = None
    user_id: str | None = None
    reason: str | None = None
    previous: Terms | None = None  # the conversion as this postback found it
    event: str | None = None  # the type of the event written for it, if any


class Attached(TypedDict):
    """An orphan postback that reconcile recorded (answered as JSON by the CLI and the console)."""
    orphan_id: int
    network: str
    order_id: str
    click_id: str | None
    outcome: str
    conversion_id: int | None


async def find_click(conn: Connection, click_id: str | None) -> ClickRow | None:
    """The click a postback names, if that is a click id at all, share-locked for the transaction:
    an erasure under way renames its user first (the postback then reads the pseudonym), or waits
    for the postback's conversion and renames it with the user's others."""
    if not click_id or not is_click_id(click_id):
        return None
    return await get_click(conn, click_id, lock=True)


def _orphan_reason(network: str, pb: Postback, click: ClickRow | None, merchant: Merchant | None) -> str | None:
    return orphan_reason(pb.click_id, click is not None, bool(click and click["bot"]),
                         merchant.network if merchant else None, network, pb.offer_id,
                         merchant.network_offer_ids if merchant else frozenset())


async def record_postback(conn: Connection, network: str, pb: Postback, raw: Mapping[str, Any],
                          merchants: Callable[[str], Merchant | None]) -> Recorded:
    async with conn.transaction():
        click = await find_click(conn, pb.click_id)
        merchant = merchants(click["merchant"]) if click is not None else None
        reason = _orphan_reason(network, pb, click, merchant)
        # The click's user is erased already: what the network passed on of the shopper's address
        # is not kept (the erasure took it from the postbacks before this one).
        kept = without_addresses(raw) if click is not None and is_pseudonym(click["user_id"]) else raw
        if reason is not None or click is None:
            event = await _orphan(conn, network, pb, reason or "unknown_click", kept)
            return Recorded("orphan", click_id=pb.click_id, reason=reason, event=event)
        share = merchant.user_share if merchant else Decimal(0)
        terms = pb.terms(None)
        owed = cashback(terms.commission, share, terms.currency, terms.status)
        conversion_id = await conn.fetchval(
            "INSERT INTO conversions (network, order_id, click_id, click_created_at, user_id, merchant, "
            "status, status_word, amount, commission, currency, user_share, cashback, order_time) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) "
            "ON CONFLICT (network, order_id) DO NOTHING RETURNING id",
            network, pb.order_id, click["click_id"], click["created_at"], click["user_id"],
            click["merchant"], terms.status, pb.status_word, terms.amount, terms.commission, terms.currency,
            share, owed, pb.order_time)
        if conversion_id is not None:
            result = Recorded("accepted", conversion_id, click["merchant"], pb.status, True,
                              click["click_id"], click["user_id"], event=events.CONVERSION_CREATED)
            await emit(conn, events.CONVERSION_CREATED, {"conversion": events.conversion_payload(Conversion(
                network, pb.order_id, click["click_id"], click["user_id"], click["merchant"], terms.status,
                terms.amount, terms.commission, terms.currency, owed, pb.order_time))},
                events.conversion_key(conversion_id))
        else:
            result = await _update(conn, network, pb, raw)
        before = result.previous
        if is_pseudonym(result.user_id):  # an order of an erased user's, named by another click
            kept = without_addresses(raw)
        await conn.execute(
            "INSERT INTO postback_history (conversion_id, network, order_id, click_id, outcome, status, "
            "status_word, amount, commission, currency, order_time, raw, previous_status, previous_amount, "
            "previous_commission, previous_currency) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            result.conversion_id, network, pb.order_id, pb.click_id, result.outcome, pb.status,
            pb.status_word, pb.amount, pb.commission, pb.currency, pb.order_time, kept,
            before.status if before else None, before.amount if before else None,
            before.commission if before else None, before.currency if before else None)
        if result.conversion_id is not None:
            conv_click = result.click_id or click["click_id"]
            await conn.execute(
                "INSERT INTO click_states (click_id, created_at, state, converted_at) "
                "VALUES ($1, $2, 'converted', now()) ON CONFLICT (click_id) DO UPDATE SET "
                "state = 'converted', converted_at = COALESCE(click_states.converted_at, now()), "
                "updated_at = now()", conv_click, click_time(conv_click))
    return result


async def _update(conn: Connection, network: str, pb: Postback, raw: Mapping[str, Any]) -> Recorded:
    row = await conn.fetchrow(
        f"SELECT id, status, amount, commission, {CURRENCY}, user_share, merchant, click_id, user_id, cashback "
        "FROM conversions WHERE network = $1 AND order_id = $2 FOR UPDATE", network, pb.order_id)
    assert row is not None  # the INSERT's conflict was with this row, and conversions are never deleted
    current = Terms(row["status"], row["amount"], row["commission"], row["currency"])
    base = dict(conversion_id=row["id"], merchant=row["merchant"], click_id=row["click_id"],
                user_id=row["user_id"], previous=current)
    effect = settle(current, pb)
    # Signed postbacks carry no time of sending (no network's profile signs one), so a captured one
    # authenticates forever: an older pending replayed after a correction would bring its values
    # back, an early reversal replayed after approval would reverse the order. A postback that would
    # change the order but whose parameters the order has met before is a replay or a resend: a
    # duplicate, whatever it says. Under the row lock every earlier postback of the order is in the
    # history: kept as sent, or as an erasure or address retention left it since, so `raw` (as
    # sent, or as an orphan kept it for reconcile) is compared in each of those forms.
    if effect in ("moved", "corrected", "adjusted") and await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM postback_history WHERE network = $1 AND order_id = $2 "
            "AND raw IN ($3, $4, $5))",
            network, pb.order_id, raw, without_addresses(raw), with_truncated_addresses(raw)):
        effect = "duplicate"
    if effect in ("ignored", "duplicate"):
        return Recorded("duplicate", status=row["status"], **base)
    if effect == "refused":
        return Recorded("adjustment_refused", status=row["status"], **base)
    new = pb.terms(current)
    owed = cashback(new.commission, row["user_share"], new.currency, new.status)
    order_time = await conn.fetchval(
        "UPDATE conversions SET status = $2, status_word = $3, amount = $4, commission = $5, currency = $6, "
        "cashback = $7, order_time = COALESCE($8, order_time), updated_at = now() WHERE id = $1 "
        "RETURNING order_time",
        row["id"], new.status, pb.status_word, new.amount, new.commission, new.currency, owed, pb.order_time)
    data: dict[str, Any] = {"conversion": events.conversion_payload(Conversion(
        network, pb.order_id, row["click_id"], row["user_id"], row["merchant"], new.status, new.amount,
        new.commission, new.currency, owed, order_time))}
    if effect == "moved":
        event = events.CONVERSION_STATUS_CHANGED
        data["previous_status"] = current.status
    else:  # corrected (pending) or adjusted (lowered after approval): the money moved, the status did not
        event = events.CONVERSION_AMOUNT_CHANGED
        data["previous"] = events.money_payload(current.amount, current.commission, current.currency,
                                                row["cashback"])
    await emit(conn, event, data, events.conversion_key(row["id"]))
    return Recorded("accepted", status=pb.status, status_changed=effect == "moved", event=event, **base)


async def _orphan(conn: Connection, network: str, pb: Postback, reason: str, raw: Mapping[str, Any]) -> str | None:
    """Keep an orphan postback; write postback.orphaned unless the same order, click and reason was
    orphaned before (a network retrying). The advisory lock makes two identical orphans arriving at
    once agree on which one is first (taken before the check, whose snapshot then sees the other)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7403911003))",
                       f"orphan {network} {pb.order_id}")
    seen = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM orphan_postbacks WHERE order_id = $2 AND network = $1 "
        "AND click_id IS NOT DISTINCT FROM $3 AND reason = $4)", network, pb.order_id, pb.click_id, reason)
    await conn.execute(
        "INSERT INTO orphan_postbacks (network, order_id, click_id, reason, raw) "
        "VALUES ($1, $2, $3, $4, $5)", network, pb.order_id, pb.click_id, reason, raw)
    if seen:
        return None
    await emit(conn, events.POSTBACK_ORPHANED, {"network": network, "order_id": pb.order_id,
                                                "click_id": pb.click_id, "reason": reason})
    return events.POSTBACK_ORPHANED


async def conversions_for_click(conn: asyncpg.Pool | asyncpg.Connection, click_id: str) -> list[ConversionRow]:
    rows = await conn.fetch(
        f"SELECT id, network, order_id, status, status_word, amount, commission, {CURRENCY}, user_share, "
        "cashback, order_time, created_at, updated_at FROM conversions WHERE click_id = $1 ORDER BY id",
        click_id)
    history = await conn.fetch(
        f"SELECT conversion_id, outcome, status, status_word, amount, commission, {CURRENCY}, order_time, "
        "raw, received_at, previous_status, previous_amount, previous_commission, "
        "rtrim(previous_currency) AS previous_currency "
        "FROM postback_history WHERE conversion_id = ANY($1::bigint[]) ORDER BY id",
        [r["id"] for r in rows])
    # A record's values are untyped (Any): each row is cast to the shape its SELECT list gives it.
    out = []
    for r in rows:
        item = cast(ConversionRow, dict(r))
        item["history"] = [cast(PostbackRow, dict(h)) for h in history if h["conversion_id"] == r["id"]]
        out.append(item)
    return out


async def list_orphans(conn: Connection, limit: int, include_reconciled: bool = False) -> list[OrphanRow]:
    rows = await conn.fetch(
        "SELECT id, network, order_id, click_id, reason, raw, received_at, reconciled_at, conversion_id "
        "FROM orphan_postbacks WHERE ($2 OR reconciled_at IS NULL) ORDER BY id LIMIT $1",
        limit, include_reconciled)
    return [cast(OrphanRow, dict(r)) for r in rows]


async def reconcile(conn: Connection, read: Callable[[str, Mapping[str, Any]], Postback | None],
                    merchants: Callable[[str], Merchant | None], limit: int = 10_000) -> list[Attached]:
    """Attach open orphans whose click exists now (a spool replay, a late partition): each is
    recorded as the postback it was, and the orphan marked reconciled."""
    attached: list[Attached] = []
    for orphan in await list_orphans(conn, limit):
        if orphan["reason"] in NEVER_ATTACHED:
            continue
        raw = orphan["raw"]
        pb = read(orphan["network"], raw)
        if pb is None:
            continue
        click = await find_click(conn, pb.click_id)
        merchant = merchants(click["merchant"]) if click is not None else None
        if _orphan_reason(orphan["network"], pb, click, merchant) is not None:
            continue  # still not attributable: left open, not recorded again
        async with conn.transaction():
            locked = await conn.fetchval(
                "SELECT id FROM orphan_postbacks WHERE id = $1 AND reconciled_at IS NULL FOR UPDATE SKIP LOCKED",
                orphan["id"])
            if locked is None:
                continue
            result = await record_postback(conn, orphan["network"], pb, raw, merchants)
            await conn.execute(
                "UPDATE orphan_postbacks SET reconciled_at = now(), conversion_id = $2 WHERE id = $1",
                orphan["id"], result.conversion_id)
        attached.append({"orphan_id": orphan["id"], "network": orphan["network"],
                         "order_id": orphan["order_id"], "click_id": pb.click_id,
                         "outcome": result.outcome, "conversion_id": result.conversion_id})
    return attached
