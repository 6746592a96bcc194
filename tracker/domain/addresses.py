"""Addresses among a postback's parameters: what an erasure removes and address retention truncates.

Networks pass the shopper's address through as a parameter of their own (Admitad's `action_ip`), and
a postback's parameters are kept as sent (`raw`). A value that is an IP address is the shopper's,
whatever the parameter is called: the names differ from network to network and a profile may not
know them all. Truncated, an address becomes its network as PostgreSQL writes `network(...)::text`
for the clicks' addresses (IPv4 to its /24, IPv6 to its /48: `198.51.100.0/24`), so a truncated
parameter reads like a truncated click. An IPv4-mapped IPv6 address (`::ffff:198.51.100.9`, what a
dual-stack listener reports for an IPv4 client) is the IPv4 address it carries.

`without_addresses(with_truncated_addresses(raw)) == without_addresses(raw)`: an erasure takes a
truncated address too, so a postback's parameters end up the same whichever came first.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Mapping

IPV4_PREFIX = 24
IPV6_PREFIX = 48


def address(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a parameter's value is (a mapped IPv6 one as IPv4), or None."""
    if not isinstance(value, str) or not 2 <= len(value) <= 64:  # "::" is the shortest, 45 + a zone the longest
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_address(value: object) -> bool:
    return address(value) is not None


def truncated(value: object) -> str | None:
    """The network an address truncates to, as PostgreSQL's `network(...)::text` writes it; None for
    a value that is not an address."""
    addr = address(value)
    if addr is None:
        return None
    prefix = IPV4_PREFIX if addr.version == 4 else IPV6_PREFIX
    # From the integer: a zone (`fe80::1%eth0`) is no part of the network.
    return str(ipaddress.ip_network((int(addr), prefix), strict=False))


def is_truncated_address(value: object) -> bool:
    """A value as `truncated` writes one: an IPv4 /24 or IPv6 /48 network."""
    if not isinstance(value, str) or "/" not in value or len(value) > 64:
        return False
    try:
        net = ipaddress.ip_network(value)
    except ValueError:
        return False
    return net.prefixlen == (IPV4_PREFIX if net.version == 4 else IPV6_PREFIX) and truncated(
        str(net.network_address)) == value


def without_addresses(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters but those whose value is an address, or an address truncated to its network."""
    return {k: v for k, v in raw.items() if not is_address(v) and not is_truncated_address(v)}


def with_truncated_addresses(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters with each address replaced by its network (a network is left as it is)."""
    return {k: truncated(v) or v for k, v in raw.items()}
