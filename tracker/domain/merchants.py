"""Merchants and networks: the merchants file's rules, checked whole (pydantic), every problem named."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, ClassVar
from urllib.parse import quote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .networks import Entry, Network, NetworkEntry, slug
from .problems import NAMING, label, problems
from .profiles import profiles
from .targets import BadTarget, check_target, normalize_pattern
from .webhooks import Webhook, WebhookEntry, warnings_for

_DURATION = re.compile(r"(\d{1,9})(s|m|h|d)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
DURATION = "a duration like 5s, 90m, 2h or 90d"
_BAD_APP_SCHEMES = {"javascript", "data", "vbscript", "file", "blob", "about"}
# quote(value, safe="") for ASCII text as one str.translate: checked targets are ASCII, and this is
# 1.2 instead of 2.6 us per redirect (timeit, a 55-character deep link).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_QUOTE_ALL = {c: chr(c) if c in _UNRESERVED else f"%{c:02X}" for c in range(128)}


# What quote_all leaves of a value once it is quoted: unreserved characters and escapes.
_QUOTED = re.compile(r"[A-Za-z0-9_.~%-]*")


def quote_all(value: str) -> str:
    """The same as urllib.parse.quote(value, safe=""): everything but unreserved characters escaped.
    A deep link's usual delimiters (% first, then :/?=&) are escaped by str.replace; if that left
    nothing but unreserved characters and escapes, every other character was unreserved and the
    value is quoted (9,200 instead of 19,700 instructions for a 50-character deep link, callgrind);
    else the translate table does all of it."""
    quoted = (value.replace("%", "%25").replace(":", "%3A").replace("/", "%2F").replace("?", "%3F")
              .replace("=", "%3D").replace("&", "%26"))
    if _QUOTED.fullmatch(quoted):
        return quoted
    return value.translate(_QUOTE_ALL) if value.isascii() else quote(value, safe="")


# A merchant's session and order confirmation window when its file names none; the same defaults
# stand in for a merchant that is gone from the file when support looks at one of its old clicks.
SESSION_TTL = 2 * 3600  # seconds
CONFIRMATION_WINDOW = 90 * 86400  # seconds


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
    network_offer_ids: frozenset[str] = frozenset()  # empty: its network's orders are not checked by offer

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


def _template(value: str, http_only: bool) -> str:
    """A partner_url or app_url: a URL with {click_id} (app_url may do without: a warning) and
    {target} only; every problem of it in one message."""
    found = []
    names = set(_PLACEHOLDER.findall(value))
    if http_only and "click_id" not in names:
        found.append("must contain {click_id}")
    if names - {"click_id", "target"}:
        found.append(f"unknown placeholders {sorted(names - {'click_id', 'target'})}")
    try:
        parts = urlsplit(value.replace("{click_id}", "CID").replace("{target}", "TARGET"))
    except ValueError:
        raise ValueError("; ".join([*found, "not a valid URL"])) from None
    scheme = parts.scheme.lower()
    if http_only and (scheme not in ("http", "https") or not parts.hostname):
        found.append("must be an absolute http(s) URL")
    elif not http_only and (not scheme or scheme in _BAD_APP_SCHEMES):
        found.append("needs an app or http(s) scheme")
    if any(c in value for c in "\\\r\n\t "):
        found.append("contains spaces or backslashes")
    if found or not value.strip():
        raise ValueError("; ".join(found) or "must be a URL template with {click_id}")
    return value


def _host(value: str) -> str:
    try:
        return normalize_pattern(value)
    except BadTarget as exc:
        raise ValueError(f"{value!r}: {exc}") from None


def _share(value: Any) -> Decimal:
    if isinstance(value, float):  # an unquoted 0.5: its shortest repr is the decimal written (a warning)
        value = repr(value)
    try:
        share = Decimal(str(value)) if isinstance(value, str | int) and not isinstance(value, bool) else None
        if share is not None and 0 <= share <= 1 and share.as_tuple().exponent >= -6:  # type: ignore[operator]
            return share
    except (InvalidOperation, ValueError):
        pass
    raise ValueError("")


def _offer_id(value: str | int) -> str:
    """A network's offer id as postbacks carry it: written as a string or a bare number."""
    text = str(value).strip()
    if not text or len(text) > 128 or not text.isprintable() or " " in text:
        raise ValueError(f"{str(value)[:40]!r} is not an offer id (1-128 printable characters, no spaces)")
    return text


Duration = Annotated[int, BeforeValidator(parse_duration)]
Codes = list[Annotated[str | int, AfterValidator(str)]]
OfferIds = list[Annotated[str | int, AfterValidator(_offer_id)]]


class MerchantEntry(Entry):
    """A `merchants:` entry. The network names it may use are the validation's context."""
    HINTS: ClassVar[dict[str, str]] = {
        "slug": "1-63 characters of a-z 0-9 _ -, starting with a letter or digit",
        "name": "required text of at most 200 characters", "network": "required: a network's name",
        "partner_url": "must be a URL template with {click_id}", "app_url": "must be a URL template",
        "default_target": "required http(s) URL",
        "allowed_hosts": "a non-empty list of host names or *.domain",
        "user_share": 'a decimal between 0 and 1, like "0.5"', "session_ttl": DURATION,
        "confirmation_window": DURATION, "own_promo_codes": "must be a list of strings",
        "excluded_stores": "must be a list of strings", "active": "true or false",
        "network_offer_ids": "must be a list of the network's offer ids (strings)"}
    slug: Annotated[str, AfterValidator(slug)]
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    network: str
    partner_url: Annotated[str, AfterValidator(lambda v: _template(v, True))]
    allowed_hosts: Annotated[list[Annotated[str, AfterValidator(_host)]], Field(min_length=1)]
    default_target: str  # after allowed_hosts: checked against them
    user_share: Annotated[Decimal, BeforeValidator(_share)]
    session_ttl: Duration = SESSION_TTL
    confirmation_window: Duration = CONFIRMATION_WINDOW
    own_promo_codes: Codes = []
    app_url: Annotated[str, AfterValidator(lambda v: _template(v, False))] | None = None
    excluded_stores: Codes = []
    active: bool = True
    network_offer_ids: OfferIds = []

    @field_validator("network")
    @classmethod
    def _known_network(cls, value: str, info: ValidationInfo) -> str:
        networks: Any = (info.context or {}).get("networks", ())
        if value not in networks:
            raise ValueError(f"{value!r} is not one of the networks {sorted(networks)} "
                             "(the file's networks, or a postback profile)")
        return value

    @field_validator("default_target")
    @classmethod
    def _on_its_hosts(cls, value: str, info: ValidationInfo) -> str:
        hosts = info.data.get("allowed_hosts")
        try:
            return check_target(value, frozenset(hosts)) if hosts else value
        except BadTarget as exc:
            raise ValueError(str(exc)) from None

    def merchant(self) -> Merchant:
        return Merchant(
            slug=self.slug, name=self.name, network=self.network, partner_url=self.partner_url,
            default_target=self.default_target,
            allowed_hosts=frozenset(self.allowed_hosts), user_share=self.user_share,
            session_ttl=self.session_ttl, confirmation_window=self.confirmation_window,
            own_promo_codes=frozenset(str(c).strip().casefold() for c in self.own_promo_codes if str(c).strip()),
            app_url=self.app_url, excluded_stores=frozenset(str(s).strip() for s in self.excluded_stores),
            active=self.active, network_offer_ids=frozenset(str(o) for o in self.network_offer_ids))


class MerchantsDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    merchants: list[MerchantEntry]
    networks: list[NetworkEntry] | None = None
    webhooks: list[WebhookEntry] | None = None


ENTRIES: dict[str, type[Entry]] = {"merchants": MerchantEntry, "networks": NetworkEntry, "webhooks": WebhookEntry}


def _duplicates(doc: dict[str, Any], section: str) -> list[str]:
    key, kind = NAMING[section]
    raw = doc.get(section)
    names = [e.get(key) for e in raw if isinstance(e, dict)] if isinstance(raw, list) else []
    return [f"{kind} {dup!r}: {key}: appears more than once"
            for dup in sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})]


def _shared_offers(doc: dict[str, Any]) -> list[str]:
    """An offer id listed by two merchants of one network: its orders could be attributed to either
    merchant's clicks, which is the swap the check is there to stop."""
    owners: dict[tuple[str, str], list[str]] = {}
    raw = doc.get("merchants")
    for entry in raw if isinstance(raw, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("slug"), str):
            continue
        offers = entry.get("network_offer_ids")
        for offer in {str(o).strip() for o in offers if isinstance(o, str | int)} if isinstance(offers, list) else ():
            owners.setdefault((str(entry.get("network")), offer), []).append(entry["slug"])
    return [f"merchant {slugs[-1]!r}: network_offer_ids: {offer!r} is also listed by "
            f"{', '.join(repr(s) for s in slugs[:-1])} of network {network!r}"
            for (network, offer), slugs in sorted(owners.items()) if offer and len(slugs) > 1]


def parse_merchants_file(doc: Any, profiles: frozenset[str]) -> MerchantsFile:
    """Validate a whole merchants document; MerchantsFileError lists every problem found."""
    if not isinstance(doc, dict):
        raise MerchantsFileError(["the file must be a mapping with a 'merchants' list"])
    raw_networks = doc.get("networks")
    # A merchant names one of the file's networks, or a postback profile directly (its orders then
    # need a network entry before postbacks are accepted).
    networks = {n["name"] for n in raw_networks if isinstance(n, dict) and isinstance(n.get("name"), str)} \
        if isinstance(raw_networks, list) else set()
    found = [p for section in ENTRIES for p in _duplicates(doc, section)] + _shared_offers(doc)
    try:
        parsed = MerchantsDocument.model_validate(doc, context={"profiles": profiles,
                                                                "networks": networks | set(profiles)})
    except ValidationError as exc:
        raise MerchantsFileError(problems(exc, doc, ENTRIES) + found) from None
    if found:
        raise MerchantsFileError(found)
    return _with_warnings(parsed, doc)


def _with_warnings(parsed: MerchantsDocument, doc: dict[str, Any]) -> MerchantsFile:
    """The parsed file, with what is allowed but likely a mistake said."""
    warnings = []
    for i, m in enumerate(parsed.merchants):
        where = label(doc, "merchants", i)
        if isinstance(doc["merchants"][i].get("user_share"), float):
            warnings.append(f"{where}: user_share: quote it (\"{m.user_share}\"): shares are decimal strings")
        if m.app_url is not None and "{click_id}" not in m.app_url:
            warnings.append(f"{where}: app_url: has no {{click_id}}: app clicks will carry no sub-id")
    webhooks = tuple(w.webhook() for w in parsed.webhooks or ())
    warnings += warnings_for(webhooks)
    networks = tuple(n.network() for n in parsed.networks or ())
    listed = {n.name for n in networks}
    warnings += [f"merchant {m.slug!r}: network: {m.network!r} has no entry under networks; "
                 "its postbacks are refused until one is added" for m in parsed.merchants if m.network not in listed]
    profile_of = {n.name: n.profile for n in networks}
    for m in parsed.merchants:
        profile = profiles().get(profile_of.get(m.network, m.network))
        if m.network_offer_ids and profile is not None and not profile.params["offer_id"]:
            warnings.append(f"merchant {m.slug!r}: network_offer_ids: the {profile.name} profile reads no "
                            "offer id, so its orders are not checked against them")
    return MerchantsFile(tuple(m.merchant() for m in parsed.merchants), networks, tuple(warnings), webhooks)
