"""Click ids: 128 bits (48-bit millisecond time + 80 random bits) in a sortable base64 alphabet.

22 characters of `[-0-9A-Z_a-z]`, URL-safe, unique across processes and hosts without coordination
(80 random bits per millisecond), and ordered by time: string order is creation order, and the time
reads back from the first 8 characters. The clicks table is partitioned by that time, so a lookup by
click id names its partition.
"""
from __future__ import annotations

import base64
import random
import time
from datetime import datetime, timezone

_STD = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SORTED = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_TO_SORTED = bytes.maketrans(_STD, _SORTED)
_FROM_SORTED = bytes.maketrans(_SORTED, _STD)
_ALPHABET = frozenset(_SORTED.decode())
# The random module's generator is seeded from os.urandom and reseeded in every forked worker
# (random.py registers that at fork), so two processes never share a sequence. Ids need
# uniqueness, not secrecy (observe checks the user's token), and this saves a syscall per id.
_getrandbits = random.getrandbits
LENGTH = 22
# A version bit above the 46 bits of milliseconds (enough until the year 4199): every id starts with
# a letter, never with '-', which some tools and sub-id fields mistake for an option or reject.
_MARK = 1 << 46
_MS_MASK = _MARK - 1


class InvalidClickId(ValueError):
    pass


def new_click_id(now_ms: int | None = None) -> tuple[str, int]:
    """A fresh click id and its creation time in Unix milliseconds."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    raw = (_MARK | ms).to_bytes(6, "big") + _getrandbits(80).to_bytes(10, "big")
    return base64.urlsafe_b64encode(raw)[:LENGTH].translate(_TO_SORTED).decode(), ms


def click_time_ms(click_id: str) -> int:
    """The creation time (Unix ms) carried by a click id; InvalidClickId if it is not one of ours."""
    if len(click_id) != LENGTH or not _ALPHABET.issuperset(click_id):
        raise InvalidClickId(click_id)
    std = click_id.encode().translate(_FROM_SORTED)
    raw = base64.urlsafe_b64decode(std + b"==")
    # The last character carries 2 padding bits: only the canonical form is an id.
    if base64.urlsafe_b64encode(raw)[:LENGTH] != std:
        raise InvalidClickId(click_id)
    stamp = int.from_bytes(raw[:6], "big")
    if stamp >> 46 != 1:
        raise InvalidClickId(click_id)
    return stamp & _MS_MASK


def click_time(click_id: str) -> datetime:
    return datetime.fromtimestamp(click_time_ms(click_id) / 1000, tz=timezone.utc)


def is_click_id(value: str) -> bool:
    try:
        click_time_ms(value)
    except (InvalidClickId, ValueError):
        return False
    return True
