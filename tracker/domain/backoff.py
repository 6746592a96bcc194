"""How long to wait before trying again something that failed: exponential backoff with jitter.

One rule for every retry in the service: the webhook deliveries' schedule (domain/webhooks.py) and
the in-process loops that reconnect or query again after a failure (the state feed, the merchant
listener, the signal writer, the webhook dispatcher's claims). The jitter spreads the attempts of
many workers, so that a dependency coming back is not hit by all of them in the same instant.
"""
from __future__ import annotations

import random


def jittered(failures: int, first: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after `failures` failed attempts in a row: first x 2^(failures-1), at most
    `cap`, with "equal jitter" (uniform in [d/2, d])."""
    delay: float = min(first * 2 ** min(max(failures - 1, 0), 40), cap)  # int ** int is Any to mypy
    return delay / 2 + (rng or random).uniform(0, delay / 2)


class Backoff:
    """The waits of one retry loop: each failure in a row waits longer, up to `cap`; a success
    starts again from `first`."""

    __slots__ = ("first", "cap", "failures")

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap, self.failures = first, cap, 0

    def next(self) -> float:
        """The wait after one more failure."""
        self.failures += 1
        return jittered(self.failures, self.first, self.cap)

    def reset(self) -> None:
        self.failures = 0
