"""Merchants and networks: the merchants file's rules, checked whole, every problem named."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, urlsplit

from .networks import SLUG, Network, open_entry, parse_network, str_list
from .targets import BadTarget, check_target, normalize_pattern
from .webhooks import Webhook, parse_webhooks, warnings_for

_DURATION = re.compile(r"(\d{1,9})(s|m|h|d)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_BAD_APP_SCHEMES = {"javascript", "data", "vbscript", "file", "blob", "about"}
# quote(value, safe="") for ASCII text as one str.translate: checked targets are ASCII, and this is
# 1.2 instead of 2.6 us per redirect (timeit, a 55-character deep link).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_QUOTE_ALL = {c: chr(c) if c in _UNRESERVED else f"%{c:02X}" for c in range(128)}


def quote_all(value: str) -> str:
    """The same as urllib.parse.quote(value, safe=""): everything but unreserved characters escaped."""
    return value.translate(_QUOTE_ALL) if value.isascii() else quote(value, safe="")


@dataclass(frozen=True, slots=True)
class Merchant:
    slug: str
    name: str
    network: str
    partner_url: str
    default_target: str
    allowed_hosts: frozenset[str]
    user_share: Decimal
    session_ttl: int  # seconds
    confirmation_window: int  # seconds
    own_promo_codes: frozenset[str] = frozenset()
    app_url: str | None = None
    excluded_stores: frozenset[str] = frozenset()
    active: bool = True

    def partner_link(self, click_id: str, target: str, app: bool = False) -> str:
        template = self.app_url if app and self.app_url else self.partner_url
        return template.replace("{click_id}", click_id).replace("{target}", quote_all(target))

    def is_own_code(self, code: str) -> bool:
        return code.strip().casefold() in self.own_promo_codes


@dataclass(frozen=True, slots=True)
class MerchantsFile:
    merchants: tuple[Merchant, ...]
    networks: tuple[Network, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())
    webhooks: tuple[Webhook, ...] = field(default=())


class MerchantsFileError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("a duration reads like 5s, 90m, 2h or 90d")
    if isinstance(value, int):
        seconds = value
    else:
        match = _DURATION.fullmatch(value.strip())
        if not match:
            raise ValueError(f"{value!r} is not a duration like 5s, 90m, 2h or 90d")
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


def _template(value: Any, where: str, problems: list[str], http_only: bool,
              warnings: list[str] | None = None) -> str | None:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: must be a URL template with {{click_id}}")
        return None
    names = set(_PLACEHOLDER.findall(value))
    if "click_id" not in names:
        if warnings is None:
            problems.append(f"{where}: must contain {{click_id}}")
        else:
            warnings.append(f"{where}: has no {{click_id}}: app clicks will carry no sub-id")
    if names - {"click_id", "target"}:
        problems.append(f"{where}: unknown placeholders {sorted(names - {'click_id', 'target'})}")
    sample = value.replace("{click_id}", "CID").replace("{target}", "TARGET")
    try:
        parts = urlsplit(sample)
    except ValueError:
        problems.append(f"{where}: not a valid URL")
        return None
    scheme = parts.scheme.lower()
    if http_only and (scheme not in ("http", "https") or not parts.hostname):
        problems.append(f"{where}: must be an absolute http(s) URL")
    elif not http_only and (not scheme or scheme in _BAD_APP_SCHEMES):
        problems.append(f"{where}: needs an app or http(s) scheme")
    if any(c in value for c in "\\\r\n\t "):
        problems.append(f"{where}: contains spaces or backslashes")
    return value


def _merchant(raw: Any, index: int, problems: list[str], networks: set[str],
              warnings: list[str]) -> Merchant | None:
    raw, slug, label = open_entry(raw, "merchants", index, "slug", "merchant", problems)
    if raw is None:
        return None
    before = len(problems)
    if not isinstance(slug, str) or not SLUG.fullmatch(slug):
        problems.append(f"{label}: slug: 1-63 characters of a-z 0-9 _ -, starting with a letter or digit")
    known = {"slug", "name", "network", "partner_url", "default_target", "allowed_hosts", "user_share",
             "session_ttl", "confirmation_window", "own_promo_codes", "app_url", "excluded_stores",
             "active"}
    for key in sorted(set(raw) - known, key=str):
        problems.append(f"{label}: {key}: unknown field")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        problems.append(f"{label}: name: required text of at most 200 characters")
    network = raw.get("network")
    if not isinstance(network, str) or network not in networks:
        problems.append(f"{label}: network: {network!r} is not one of the networks {sorted(networks)} "
                        "(the file's networks, or a postback profile)")
    partner_url = _template(raw.get("partner_url"), f"{label}: partner_url", problems, True)
    app_url = raw.get("app_url")
    if app_url is not None:
        app_url = _template(app_url, f"{label}: app_url", problems, False, warnings)
    hosts: set[str] = set()
    raw_hosts = raw.get("allowed_hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        problems.append(f"{label}: allowed_hosts: a non-empty list of host names or *.domain")
    else:
        for host in raw_hosts:
            try:
                if not isinstance(host, str):
                    raise BadTarget("not text")
                hosts.add(normalize_pattern(host))
            except BadTarget as exc:
                problems.append(f"{label}: allowed_hosts: {host!r}: {exc}")
    default_target = raw.get("default_target")
    if not isinstance(default_target, str):
        problems.append(f"{label}: default_target: required http(s) URL")
    elif hosts:
        try:
            default_target = check_target(default_target, frozenset(hosts))
        except BadTarget as exc:
            problems.append(f"{label}: default_target: {exc}")
    share = raw.get("user_share")
    user_share = Decimal(0)
    if isinstance(share, float):
        # An unquoted 0.5 reads as a float; its shortest repr is the decimal that was written.
        warnings.append(f"{label}: user_share: quote it (\"{share!r}\"): shares are decimal strings")
        share = repr(share)
    try:
        user_share = Decimal(str(share)) if isinstance(share, str | int) else Decimal("NaN")
        if not (0 <= user_share <= 1) or user_share.as_tuple().exponent < -6:  # type: ignore[operator]
            raise InvalidOperation
    except (InvalidOperation, ValueError):
        problems.append(f"{label}: user_share: a decimal between 0 and 1, like \"0.5\"")
    durations = {}
    for key, default in (("session_ttl", "2h"), ("confirmation_window", "90d")):
        try:
            durations[key] = parse_duration(raw.get(key, default))
        except ValueError as exc:
            problems.append(f"{label}: {key}: {exc}")
    codes = str_list(raw.get("own_promo_codes"), f"{label}: own_promo_codes", problems)
    stores = str_list(raw.get("excluded_stores"), f"{label}: excluded_stores", problems)
    active = raw.get("active", True)
    if not isinstance(active, bool):
        problems.append(f"{label}: active: true or false")
    if len(problems) > before or not (isinstance(slug, str) and isinstance(name, str) and isinstance(network, str)
                                      and isinstance(partner_url, str) and isinstance(default_target, str)):
        return None
    return Merchant(
        slug=slug, name=name.strip(), network=network, partner_url=partner_url,
        default_target=default_target, allowed_hosts=frozenset(hosts), user_share=user_share,
        session_ttl=durations["session_ttl"], confirmation_window=durations["confirmation_window"],
        own_promo_codes=frozenset(c.strip().casefold() for c in codes if c.strip()),
        app_url=app_url, excluded_stores=frozenset(s.strip() for s in stores), active=active,
    )


def parse_merchants_file(doc: Any, profiles: frozenset[str]) -> MerchantsFile:
    """Validate a whole merchants document; MerchantsFileError lists every problem found."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise MerchantsFileError(["the file must be a mapping with a 'merchants' list"])
    for key in sorted(set(doc) - {"merchants", "networks", "webhooks"}, key=str):
        problems.append(f"{key}: unknown top-level section")
    raw_networks = doc.get("networks") or []
    if not isinstance(raw_networks, list):
        problems.append("networks: must be a list")
        raw_networks = []
    networks = [parse_network(n, i, problems, profiles) for i, n in enumerate(raw_networks)]
    names = [n.get("name") for n in raw_networks if isinstance(n, dict)]
    for dup in sorted({n for n in names if isinstance(n, str) and names.count(n) > 1}):
        problems.append(f"network {dup!r}: name: appears more than once")
    # A merchant names one of the file's networks, or a postback profile directly (its orders then
    # need a network entry before postbacks are accepted).
    known_networks = {n for n in names if isinstance(n, str)} | set(profiles)
    warnings: list[str] = []
    raw_merchants = doc.get("merchants")
    if not isinstance(raw_merchants, list):
        problems.append("merchants: must be a list")
        raw_merchants = []
    merchants = [_merchant(m, i, problems, known_networks, warnings) for i, m in enumerate(raw_merchants)]
    slugs = [m.get("slug") for m in raw_merchants if isinstance(m, dict)]
    for dup in sorted({s for s in slugs if isinstance(s, str) and slugs.count(s) > 1}):
        problems.append(f"merchant {dup!r}: slug: appears more than once")
    webhooks = parse_webhooks(doc.get("webhooks"), problems)
    if problems:
        raise MerchantsFileError(problems)
    warnings += warnings_for(webhooks)
    listed = {n.name for n in networks if n}
    for m in merchants:
        if m and m.network not in listed:
            warnings.append(f"merchant {m.slug!r}: network: {m.network!r} has no entry under networks; "
                            "its postbacks are refused until one is added")
    return MerchantsFile(tuple(m for m in merchants if m), tuple(n for n in networks if n), tuple(warnings),
                         webhooks)
