"""Postback profiles: per network, its parameter names, status words and time format (a data file)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

FIELDS = ("click_id", "order_id", "status", "amount", "commission", "currency", "order_time", "offer_id")
STATUSES = ("pending", "approved", "declined", "reversed")


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    params: dict[str, tuple[str, ...]]  # field -> lower-cased parameter names, in order
    statuses: dict[str, str]  # lower-cased network word -> canonical status
    time: str


@lru_cache(maxsize=1)
def profiles() -> dict[str, Profile]:
    doc = yaml.safe_load(resources.files("tracker.data").joinpath("postback_profiles.yaml").read_text())
    found = {}
    for name, raw in doc["profiles"].items():
        params = {f: tuple(p.lower() for p in raw["params"].get(f, ())) for f in FIELDS}
        statuses = {word.lower(): status for status, words in raw["statuses"].items()
                    for word in words}
        assert set(statuses.values()) <= set(STATUSES), name
        found[name] = Profile(name, params, statuses, raw.get("time", "auto"))
    return found


def profile_names() -> frozenset[str]:
    return frozenset(profiles())
