"""The names of tracker's Redis keys and channels.

A click's keys carry its id as a hash tag (`{…}`): on a Redis Cluster the session, the detector
state and the event channel of one click share a slot, so the state script (a key and a channel) and
the session+state MGET are single-slot, while different clicks spread over every master. The rate
limits' counters share one hash tag of their own (`{rl}`): the count script touches any number of
them in one atomic call, which a cluster runs only within one slot (one call per worker per
interval, so that one slot is not a hot spot). The wrong-key counts (key_guard.py) are tagged per
client address. TRACKER_REDIS_PREFIX holds no brace (settings.py), so the tags are the keys' own.
"""
from __future__ import annotations


def session_key(prefix: str, click_id: str) -> str:
    """What /go leaves for the click's observes (domain/states.ActivationSession)."""
    return f"{prefix}s:{{{click_id}}}"


def state_key(prefix: str, click_id: str) -> str:
    """The click's detector state (domain/states.StoredState)."""
    return f"{prefix}st:{{{click_id}}}"


def channel(prefix: str, click_id: str) -> str:
    """Where the click's state changes are published for its event streams."""
    return f"{prefix}ev:{{{click_id}}}"


def limits_prefix(prefix: str) -> str:
    """The start of every rate-limit key: `<this>rl:<scope>:<key>:<minute>` (hits counted),
    `<this>rr:…` (hits reserved) and `<this>rl-workers` (the live workers)."""
    return f"{prefix}{{rl}}:"
