"""What support reads back from PostgreSQL (a click, a user's clicks, an order, orphans), keyed as
the queries name the columns.

TypedDicts rather than classes: each is the row as asyncpg returns it (`dict(record)`), handed on
as is to the diagnosis, the timeline, the console's templates and the JSON views. tests/test_rows.py
holds each query's columns to its type's keys.
"""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, TypedDict

from .signals import Evidence


class ClickRow(TypedDict):
    """A click (store/support.get_click)."""
    click_id: str
    created_at: datetime
    user_id: str
    merchant: str
    source: str  # web | app
    target: str
    device: str | None
    client_ip: str | None
    user_agent: str | None
    bot: bool
    method: str
    # When `client_ip` was truncated to its network (address retention), or None while it is whole.
    client_ip_truncated_at: datetime | None


class ClickStateRow(TypedDict):
    """A click's stored state (click_states), a ClickState's value."""
    state: str
    overwritten_at: datetime | None
    converted_at: datetime | None


class SignalRow(TypedDict):
    """A stored signal (the signals table); `at` is when the tab saw it."""
    kind: str
    network: str | None
    evidence: Evidence
    at: datetime
    late: bool
    count: int  # sightings of this signal (one click, kind, network and evidence key)
    last_at: datetime  # the latest


class PostbackRow(TypedDict):
    """One postback of a conversion's history, with the conversion's terms it met (previous_*)."""
    conversion_id: int
    outcome: str  # accepted | duplicate | adjustment_refused
    status: str | None
    status_word: str | None
    amount: Decimal | None
    commission: Decimal | None
    currency: str | None
    order_time: datetime | None
    raw: dict[str, Any]  # jsonb: the parameters as sent, secrets left out
    received_at: datetime
    previous_status: str | None
    previous_amount: Decimal | None
    previous_commission: Decimal | None
    previous_currency: str | None


class ConversionRow(TypedDict):
    """A conversion of a click with its postback history, oldest first."""
    id: int
    network: str
    order_id: str
    status: str  # pending | approved | declined | reversed
    status_word: str
    amount: Decimal | None
    commission: Decimal
    currency: str  # char(3)
    user_share: Decimal
    cashback: Decimal
    order_time: datetime | None
    created_at: datetime
    updated_at: datetime
    history: list[PostbackRow]


class OrphanRow(TypedDict):
    """A postback whose click could not be attributed (orphan_postbacks)."""
    id: int
    network: str
    order_id: str
    click_id: str | None
    reason: str
    raw: dict[str, Any]  # jsonb, as the postback was read
    received_at: datetime
    reconciled_at: datetime | None
    conversion_id: int | None


class OrderRow(TypedDict):
    """A conversion as an order lookup lists it (store/lookups.CONVERSION_COLUMNS)."""
    id: int
    network: str
    order_id: str
    click_id: str
    user_id: str
    merchant: str
    status: str
    status_word: str
    amount: Decimal | None
    commission: Decimal
    currency: str  # char(3)
    user_share: Decimal
    cashback: Decimal
    order_time: datetime | None
    created_at: datetime
    updated_at: datetime


class StoredStateRow(TypedDict):
    """The stored state of a user's click, as the list of a user's clicks carries it."""
    state: str
    overwritten_at: datetime | None


class ClickConversionRow(TypedDict):
    """A conversion of a user's click, as the list carries it (money read as text: no float)."""
    network: str
    order_id: str
    status: str
    cashback: Decimal
    currency: str  # char(3)


class UserClickRow(TypedDict):
    """One of a user's clicks (store/lookups.user_clicks), with its stored state and conversions."""
    click_id: str
    created_at: datetime
    merchant: str
    source: str
    bot: bool
    stored: StoredStateRow | None
    conversions: list[ClickConversionRow]
