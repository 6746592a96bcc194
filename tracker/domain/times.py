"""How the API writes times: ISO 8601, in UTC, with a `Z`."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import overload


@overload
def iso(value: datetime) -> str: ...
@overload
def iso(value: datetime | None) -> str | None: ...
def iso(value: datetime | None) -> str | None:
    """A timestamp from PostgreSQL (microseconds, when it has them)."""
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if value else None


def iso_ms(ms: int) -> str:
    """A time in Unix milliseconds (an event's time, as the detector keeps it), to the millisecond."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"
