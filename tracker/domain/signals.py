"""A signal: one thing the shopping tab showed that bears on who gets the order (domain/detection.py).

Signals are bounded per click (the contract's "one signal per click, kind, network and evidence
key"): a signal seen again is the same signal, counted (`count`, `last_at`), never a new row, and a
click keeps at most MAX_PER_CLICK of them. An observe first folds its own sightings together
(`tally`), then `admit` splits them into those new to the click (answered and stored) and those it
already has (counted only), against the click's `seen` list kept in its detector state.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias

# What was seen, as stored in signals.evidence (JSON) and answered: a flat object of text, counts and
# flags. The keys depend on the kind: host, url, param, value, standdown, same_network (a foreign
# affiliate link); code (a promo code); activated_on, ordered_on (another device); items (a basket
# filled before activation); store_id (an excluded store); session_ttl_s (an expired session).
Evidence: TypeAlias = dict[str, str | int | bool]

MAX_PER_CLICK = 100
MAX_KEY = 300
# The evidence fields that tell one signal of a kind from another (the evidence key); the rest (the
# URL it was seen on, for a parameter) is the first sighting's detail. Migration 0010 computes the
# same key in SQL for the rows stored before: keep the two in step.
KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "foreign_affiliate_param": ("param", "value"),
    "ad_click_id": ("param", "value"),
    "foreign_redirect_host": ("host",),
    "foreign_promo_code": ("code",),
    "cross_device": ("ordered_on",),
    "prefilled_basket": ("items",),
    "excluded_store": ("store_id",),
    "unreadable_url": ("url",),
    "session_expired": (),
}


@dataclass(frozen=True, slots=True)
class Signal:
    """A signal as the detector finds it, before it is stored (signals table) and answered."""
    kind: str  # foreign_affiliate_param | foreign_redirect_host | foreign_promo_code | ad_click_id | ...
    network: str | None
    evidence: Evidence
    at: int  # ms since the epoch, clamped to [click creation, server now]
    late: bool  # after a postback: kept, changes nothing

    @property
    def key(self) -> str:
        """The evidence key: its KEY_FIELDS' values joined by '|' (absent ones skipped)."""
        fields = KEY_FIELDS.get(self.kind, ())
        return "|".join(str(self.evidence[f]) for f in fields if f in self.evidence)[:MAX_KEY]

    @property
    def identity(self) -> tuple[str, str | None, str]:
        return self.kind, self.network, self.key


@dataclass(slots=True)
class Sighting:
    """A signal as one observe saw it: the first sighting, how many times, and the last one's time."""
    signal: Signal
    count: int
    last_at: int


@dataclass(slots=True)
class Admission:
    added: list[Sighting]  # new to the click: answered, stored as new rows
    repeated: list[Sighting]  # the click has them: their count and last_at grow
    dropped: int  # new, but the click already holds MAX_PER_CLICK


def tally(signals: list[Signal]) -> list[Sighting]:
    """One Sighting per identity, in the order first seen."""
    found: dict[tuple[str, str | None, str], Sighting] = {}
    for s in signals:
        identity = s.identity
        seen = found.get(identity)
        if seen is None:
            found[identity] = Sighting(s, 1, s.at)
        else:
            seen.count += 1
            seen.last_at = max(seen.last_at, s.at)
    return list(found.values())


@lru_cache(maxsize=4096)  # the detector and admit() both ask, for every sighting of a flood
def digest(identity: tuple[str, str | None, str]) -> str:
    """A signal's identity in 12 characters, for the click's `seen` list (its detector state)."""
    kind, network, key = identity
    raw = hashlib.blake2b(f"{kind}\x1f{network or ''}\x1f{key}".encode("utf-8", "surrogatepass"), digest_size=9)
    return base64.urlsafe_b64encode(raw.digest()).decode()


def admit(sightings: list[Sighting], seen: list[str]) -> Admission:
    """Split an observe's sightings by what the click has seen (`seen`, extended in place with what
    is added, up to MAX_PER_CLICK)."""
    known = set(seen)
    out = Admission([], [], 0)
    for sighting in sightings:
        d = digest(sighting.signal.identity)
        if d in known:
            out.repeated.append(sighting)
        elif len(seen) < MAX_PER_CLICK:
            seen.append(d)
            known.add(d)
            out.added.append(sighting)
        else:
            out.dropped += 1
    return out
