"""A click's detector state and what each means for the shopper and for how long it is kept."""
from __future__ import annotations

from enum import StrEnum


class ClickState(StrEnum):
    """What the detector knows of a click (stored as its value in Redis, PostgreSQL and the API)."""
    ACTIVE = "active"  # ours, as far as anyone reported
    OVERWRITTEN = "overwritten"  # another affiliate link replaced ours before the order
    EXPIRED = "expired"  # reported past the merchant's session time
    CONVERTED = "converted"  # a postback reported an order on it: final

# Once converted, the state outlives the session: a late observe must still find the click converted.
CONVERTED_STATE_TTL = 120 * 86400
STATE_TTL_EXTRA = 86400  # any other state is kept a day past the session


def action(state: str) -> str:
    """What the extension should ask of the shopper: activate again once the click no longer counts."""
    return "reactivate" if state in (ClickState.OVERWRITTEN, ClickState.EXPIRED) else "none"


def state_ttl(state: str, session_ttl: int) -> int:
    """How long Redis keeps a click's detector state, in seconds."""
    return CONVERTED_STATE_TTL if state == ClickState.CONVERTED else session_ttl + STATE_TTL_EXTRA
