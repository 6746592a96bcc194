"""A click's detector state and what each means for the shopper and for how long it is kept."""
from __future__ import annotations

from enum import StrEnum
from typing import Required, TypedDict

from .trail import TrailEntry


class ClickState(StrEnum):
    """What the detector knows of a click (stored as its value in Redis, PostgreSQL and the API)."""
    ACTIVE = "active"  # ours, as far as anyone reported
    OVERWRITTEN = "overwritten"  # another affiliate link replaced ours before the order
    EXPIRED = "expired"  # reported past the merchant's session time
    CONVERTED = "converted"  # a postback reported an order on it: final


# How far along a click is. A stored state is only ever replaced by one at least as far along:
# active -> overwritten | expired -> converted, overwritten and expired for good (either may follow
# the other), converted final. A state that would move a click back is older news: an observe that
# began before another's overwrite or before the postback, saved or flushed after it. click_states'
# upsert (store/signals.py) and the Redis state's script (store/sessions.py) are generated from this
# table; tests/test_click_state_order.py holds both to moves_forward.
PROGRESS: dict[str, int] = {ClickState.ACTIVE: 0, ClickState.OVERWRITTEN: 1, ClickState.EXPIRED: 1,
                            ClickState.CONVERTED: 2}


def moves_forward(stored: str | None, new: str) -> bool:
    """Whether a click whose stored state is `stored` (None: none yet) may take `new`."""
    return stored is None or PROGRESS[new] >= PROGRESS[stored]


class StoredState(TypedDict, total=False):
    """A click's detector state as JSON, in Redis and in click_states.detector: what the detector
    dumps (every key but `status`), or what a postback leaves there (`state` and `status`).
    Read back, any key may be missing (SessionState.load fills in the defaults)."""
    state: str  # a ClickState's value
    landed: bool  # the tab reached one of the merchant's hosts
    bound: dict[str, str]  # "network:param" -> the value that is ours
    overwritten_at: int | None  # ms since the epoch
    expired_signalled: bool
    trail: list[TrailEntry]
    seen: list[str]  # digests of the click's stored signals, at most 100 (domain/signals.py)
    status: str | None  # the conversion's status, when a postback wrote the state


class ActivationSession(TypedDict, total=False):
    """What a redirect leaves in Redis for its click's observes (JSON with short keys: one per click),
    or the same rebuilt from the click's row when Redis has none (then with `bot`, without `src`)."""
    u: Required[str]  # the user id
    m: Required[str]  # the merchant's slug
    t: Required[int]  # created, ms since the epoch (the click id's time)
    src: str  # web, app or ext
    dev: str | None  # the device id the client sent, if any
    bot: bool


# Once converted, the state outlives the session: a late observe must still find the click converted.
CONVERTED_STATE_TTL = 120 * 86400
STATE_TTL_EXTRA = 86400  # any other state is kept a day past the session


def action(state: str) -> str:
    """What the extension should ask of the shopper: activate again once the click no longer counts."""
    return "reactivate" if state in (ClickState.OVERWRITTEN, ClickState.EXPIRED) else "none"


def state_ttl(state: str, session_ttl: int) -> int:
    """How long Redis keeps a click's detector state, in seconds."""
    return CONVERTED_STATE_TTL if state == ClickState.CONVERTED else session_ttl + STATE_TTL_EXTRA
