"""A click's case: everything support reads about one click, for the JSON support view and the
console alike."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import asyncpg

from ..domain.diagnosis import ClickFacts
from ..domain.merchants import Merchant
from ..domain.rows import ClickRow, ConversionRow, SignalRow
from .conversions import conversions_for_click
from .support import get_click, get_signals, get_state


@dataclass(frozen=True, slots=True)
class ClickCase:
    """The click's row, its merchant, its conversions (with their postback history), its signals,
    and the facts its diagnosis is made from."""
    click: ClickRow
    merchant: Merchant | None
    conversions: list[ConversionRow]
    signals: list[SignalRow]
    facts: ClickFacts


async def click_case(pool: asyncpg.Pool, merchants: Callable[[str], Merchant | None],
                     click_id: str) -> ClickCase | None:
    """The case of a click, or None for a click that does not exist."""
    click = await get_click(pool, click_id)
    if click is None:
        return None
    merchant = merchants(click["merchant"])
    conversions = await conversions_for_click(pool, click_id)
    signals = await get_signals(pool, click_id)
    facts = ClickFacts.build(click, merchant, await get_state(pool, click_id), signals, conversions,
                             datetime.now(timezone.utc))
    return ClickCase(click, merchant, conversions, signals, facts)
