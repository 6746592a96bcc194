"""The affiliate catalog (data/affiliate_catalog.yaml), indexed for fast matching: a dict by parameter
name and a dict by host (walking the host's parent domains), never a scan over every rule."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Container, Iterator
from urllib.parse import unquote_plus, urlsplit

import yaml


@dataclass(frozen=True, slots=True)
class Hit:
    network: str | None
    kind: str  # param | marker | host | standdown
    host: str
    param: str | None = None
    value: str | None = None
    risk: bool = False
    url: str = ""


@dataclass(frozen=True, slots=True)
class _ParamRule:
    network: str
    risk: bool
    values: tuple[Any, ...] | None  # None: any value; else exact strings (lower) or compiled regexes
    on_hosts: frozenset[str] | None  # host labels the parameter counts on


def query_fields(query: str, watched: Container[str]) -> list[tuple[str, str]]:
    """The (name in lower case, raw value) of each field of a query string whose name is `watched`,
    in order: every field however many there are and however long (the body's limit bounds them),
    so that padding of empty fields or kilobytes of junk cannot hide the one that counts. Names are
    decoded as parse_qsl decodes them; values are left for the caller to decode (unquote_plus), so
    a field nobody watches costs a split and a set lookup."""
    out = []
    for field in query.split("&"):
        if not field:
            continue
        name, _, value = field.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        name = name.lower()
        if name in watched:
            out.append((name, value))
    return out


def _host_of(url: str) -> tuple[str, Any] | None:
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        return None
    if not host or parts.scheme.lower() not in ("http", "https"):
        return None
    try:
        host = host.encode("idna").decode("ascii").lower().rstrip(".")
    except UnicodeError:
        host = host.lower().rstrip(".")
    return host, parts


class AffiliateCatalog:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.networks: dict[str, dict[str, Any]] = doc["networks"]
        self.params: dict[str, list[_ParamRule]] = {}
        self.hosts: dict[str, str] = {}  # exact host (and www.host) -> network
        self.suffixes: dict[str, str] = {}  # "*.x" -> network, stored as "x"
        self.path_hosts: dict[str, list[tuple[str, str]]] = {}
        self.risk_networks = {slug for slug, n in self.networks.items() if n.get("risk")}
        for slug, net in self.networks.items():
            risk = bool(net.get("risk"))
            on = frozenset(net["params_on_hosts"]) if net.get("params_on_hosts") else None
            for p in net.get("params") or []:
                self.params.setdefault(p.lower(), []).append(_ParamRule(slug, risk, None, on))
            for p, values in (net.get("param_values") or {}).items():
                compiled = tuple(re.compile(v[3:]) if v.startswith("re:") else v.lower() for v in values)
                self.params.setdefault(p.lower(), []).append(_ParamRule(slug, risk, compiled, on))
            for h in net.get("hosts") or []:
                if h.startswith("*."):
                    self.suffixes[h[2:].lower()] = slug
                else:
                    self.hosts[h.lower()] = slug
                    self.hosts["www." + h.lower()] = slug
            for h, prefixes in (net.get("path_hosts") or {}).items():
                for prefix in prefixes:
                    for host in (h.lower(), "www." + h.lower()):
                        self.path_hosts.setdefault(host, []).append((prefix, slug))
        self.url_params = frozenset(p.lower() for p in doc.get("url_params", []))
        self.benign = frozenset(p.lower() for p in doc.get("benign_params", []))
        self.benign_prefixes = tuple(doc.get("benign_prefixes", []))
        self.standdown = {k.lower(): {v.lower() for v in vs} for k, vs in (doc.get("standdown") or {}).items()}
        self.watched = frozenset([*self.params, *self.standdown, *self.url_params])  # names scan() reads
        self.click_param = {slug: (n.get("params") or [None])[0] for slug, n in self.networks.items()}

    def host_network(self, host: str) -> str | None:
        found = self.hosts.get(host)
        if found:
            return found
        dot = host.find(".")
        while dot != -1:
            found = self.suffixes.get(host[dot + 1:])
            if found:
                return found
            dot = host.find(".", dot + 1)
        return None

    def _param_hits(self, name: str, value: str, host: str, labels: frozenset[str], url: str) -> Iterator[Hit]:
        for rule in self.params.get(name, ()):
            if rule.on_hosts is not None and not (rule.on_hosts & labels):
                continue
            if rule.values is None:
                if value:
                    yield Hit(rule.network, "param", host, name, value, rule.risk, url)
            elif any(v.match(value) if isinstance(v, re.Pattern) else v == value.lower() for v in rule.values):
                yield Hit(rule.network, "marker", host, name, value, rule.risk, url)

    def scan(self, url: str, depth: int = 2) -> list[Hit]:
        """Every catalog hit in a URL and in URL-valued parameters up to `depth` levels down."""
        parsed = _host_of(url)
        if parsed is None:
            return []
        host, parts = parsed
        hits: list[Hit] = []
        labels = frozenset(host.split("."))
        network = self.host_network(host)
        if network:
            hits.append(Hit(network, "host", host, risk=network in self.risk_networks, url=url))
        for prefix, slug in self.path_hosts.get(host, ()):
            if parts.path.startswith(prefix):
                hits.append(Hit(slug, "host", host, url=url))
        query = parts.query
        if "=" in parts.fragment:
            # A single-page store's route (`#/item/1?cjevent=…`) has a query of its own: `?` splits too.
            fragment = parts.fragment.replace("?", "&")
            query = f"{query}&{fragment}" if query else fragment
        for name, raw in query_fields(query, self.watched):
            value = unquote_plus(raw) if "%" in raw or "+" in raw else raw
            if name in self.standdown and value.lower() in self.standdown[name]:
                hits.append(Hit(None, "standdown", host, name, value, url=url))
            if name in self.params:
                hits.extend(self._param_hits(name, value, host, labels, url))
            if depth > 0 and name in self.url_params and value:
                nested = value if "://" in value[:12] else ("https://" + value if value.startswith("www.") else "")
                if nested:
                    hits.extend(self.scan(nested, depth - 1))
        return hits


@lru_cache(maxsize=1)
def load_catalog() -> AffiliateCatalog:
    text = resources.files("tracker.data").joinpath("affiliate_catalog.yaml").read_text()
    return AffiliateCatalog(yaml.safe_load(text))


def host_of(url: str) -> str | None:
    parsed = _host_of(url)
    return parsed[0] if parsed else None
