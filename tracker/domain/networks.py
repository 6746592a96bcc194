"""Networks that send postbacks, as the merchants file names them: profile and credentials."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True, slots=True)
class Network:
    name: str
    profile: str
    token: str | None = None
    hmac_secret: str | None = None
    allow_ips: tuple[str, ...] = ()



def str_list(value: Any, where: str, problems: list[str]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str | int) and not isinstance(v, bool)
                                              for v in value):
        problems.append(f"{where}: must be a list of strings")
        return []
    return [str(v) for v in value]


def open_entry(raw: Any, section: str, index: int, key: str, kind: str,
               problems: list[str]) -> tuple[dict[str, Any] | None, Any, str]:
    """An entry of a file section: its mapping (None if it is not one), the value of its naming key,
    and the label its problems are named with (`merchant 'x'`, or `merchants[3]` without a name)."""
    if not isinstance(raw, dict):
        problems.append(f"{section}[{index}]: must be a mapping")
        return None, None, ""
    value = raw.get(key)
    return raw, value, f"{kind} {value!r}" if isinstance(value, str) else f"{section}[{index}]"


def parse_network(raw: Any, index: int, problems: list[str], profiles: frozenset[str]) -> Network | None:
    raw, name, label = open_entry(raw, "networks", index, "name", "network", problems)
    if raw is None:
        return None
    before = len(problems)
    if not isinstance(name, str) or not SLUG.fullmatch(name):
        problems.append(f"{label}: name: 1-63 characters of a-z 0-9 _ -")
    for key in sorted(set(raw) - {"name", "profile", "token", "hmac_secret", "allow_ips"}, key=str):
        problems.append(f"{label}: {key}: unknown field")
    profile = raw.get("profile", name)
    if profile not in profiles:
        problems.append(f"{label}: profile: {profile!r} is not one of {sorted(profiles)}")
    token, hmac_secret = raw.get("token"), raw.get("hmac_secret")
    for key, value in (("token", token), ("hmac_secret", hmac_secret)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problems.append(f"{label}: {key}: a non-empty secret")
    if token is None and hmac_secret is None:
        problems.append(f"{label}: needs a token or an hmac_secret: postbacks are authenticated")
    cidrs = []
    for cidr in str_list(raw.get("allow_ips"), f"{label}: allow_ips", problems):
        try:
            cidrs.append(str(ipaddress.ip_network(cidr.strip(), strict=False)))
        except ValueError:
            problems.append(f"{label}: allow_ips: {cidr!r} is not an address or CIDR")
    if len(problems) > before:
        return None
    return Network(name=name, profile=profile, token=token, hmac_secret=hmac_secret,
                   allow_ips=tuple(cidrs))
