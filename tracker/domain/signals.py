"""A signal: one thing the shopping tab showed that bears on who gets the order (domain/detection.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

# What was seen, as stored in signals.evidence (JSON) and answered: a flat object of text, counts and
# flags. The keys depend on the kind: host, url, param, value, standdown, same_network (a foreign
# affiliate link); code (a promo code); activated_on, ordered_on (another device); items (a basket
# filled before activation); store_id (an excluded store); session_ttl_s (an expired session).
Evidence: TypeAlias = dict[str, str | int | bool]


@dataclass(frozen=True, slots=True)
class Signal:
    """A signal as the detector finds it, before it is stored (signals table) and answered."""
    kind: str  # foreign_affiliate_param | foreign_redirect_host | foreign_promo_code | ad_click_id | ...
    network: str | None
    evidence: Evidence
    at: int  # ms since the epoch, clamped to [click creation, server now]
    late: bool  # after a postback: kept, changes nothing
