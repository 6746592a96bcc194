"""What the shopping tab did that support needs to see and no signal records: the redirect chain up
to the landing on the store, the promo codes typed (ours too) and the checkouts. Kept in the
detector's state (Redis, then click_states.detector in PostgreSQL), so it is bounded: ordinary
browsing after the landing is not recorded (its signals are) and each kind keeps its first few.

An entry (`TrailEntry`) is {"t": ms, "e": "chain" | "landing" | "promo" | "checkout", ...}: a sanitized URL (the
evidence form: others' identifiers shortened), a code and whether it is ours, a device and a basket.
"""
from __future__ import annotations

from typing import Any, Mapping, NotRequired, TypedDict, TypeGuard

from .text import has_control

LIMITS = {"chain": 8, "landing": 1, "promo": 8, "checkout": 4}
MAX_URL = 512


class TrailEntry(TypedDict):
    """One step, as stored in the detector's state (JSON); the fields beside t and e are its kind's."""
    t: int  # ms since the epoch
    e: str  # chain | landing | promo | checkout
    url: NotRequired[str]  # chain, landing
    code: NotRequired[str]  # promo
    own: NotRequired[bool]  # promo
    device: NotRequired[str | None]  # checkout
    items: NotRequired[int | None]  # checkout
    store: NotRequired[str | None]  # checkout


def has_room(trail: list[TrailEntry], kind: str) -> bool:
    """Whether an entry of this kind would still be kept (record's rule), before making one."""
    return sum(1 for e in trail if e.get("e") == kind) < LIMITS[kind]


def record(trail: list[TrailEntry], entry: TrailEntry) -> None:
    """Append an entry unless its kind already has its share (the first ones tell the story)."""
    kind = entry["e"]
    if sum(1 for e in trail if e.get("e") == kind) < LIMITS[kind]:
        trail.append(entry)


def navigation(at: int, sanitized: str, landed_now: bool) -> TrailEntry:
    return {"t": at, "e": "landing" if landed_now else "chain", "url": sanitized[:MAX_URL]}


def promo(at: int, code: object, ours: bool) -> TrailEntry | None:
    if not isinstance(code, str) or not code.strip() or has_control(code):
        return None
    return {"t": at, "e": "promo", "code": code.strip()[:64], "own": ours}


def checkout(at: int, event: Mapping[str, Any]) -> TrailEntry:
    device, items, store = event.get("device"), event.get("basket_items_before_activation"), event.get("store_id")
    return {"t": at, "e": "checkout", "device": device[:128] if isinstance(device, str) else None,
            "items": items if isinstance(items, int) and not isinstance(items, bool) else None,
            "store": str(store)[:32] if isinstance(store, str | int) and not isinstance(store, bool) else None}


def load(raw: object) -> list[TrailEntry]:
    """The trail from a stored state, whatever an older or newer worker left there."""
    if not isinstance(raw, list):
        return []
    return [e for e in raw if _is_entry(e)]


def _is_entry(e: object) -> TypeGuard[TrailEntry]:
    return isinstance(e, dict) and e.get("e") in LIMITS and isinstance(e.get("t"), int)
