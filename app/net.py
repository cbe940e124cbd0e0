"""Client-IP resolution behind trusted proxies, IP allowlist matching and origin normalisation.

Allowlists are parsed into network objects once (when a key is cached), never matched as strings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_ALLOWED_IPS = 100
MAX_ORIGINS = 100


def parse_address(text: str) -> Address | None:
    """Parse one IP address as a peer or header gives it; None when it is not one.

    Accepts `[v6]:port`, `v4:port` and zone-less forms; IPv4-mapped IPv6 becomes IPv4.
    """
    value = text.strip()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            return None
        value = value[1:end]
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmap(network: Network) -> Network:
    """An IPv4-mapped IPv6 range (`::ffff:10.0.0.0/104`) as the IPv4 range it stands for
    (`10.0.0.0/8`): clients' mapped addresses are compared as IPv4, so the entry must be too."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        return ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
        )
    return network


def parse_network(text: str) -> Network:
    """Parse an IP or CIDR (`10.0.0.0/8`, `2001:db8::/32`, `192.0.2.7`); ValueError otherwise.
    IPv4-mapped IPv6 ranges become the IPv4 range they stand for."""
    return _unmap(ipaddress.ip_network(text.strip(), strict=False))


def normalise_allowed_ip(text: str) -> str:
    """Validate one allowlist entry and return its canonical text.

    A single address is kept without a prefix length; a CIDR with host bits set is refused
    because it almost always hides a typo.
    """
    value = text.strip()
    if not value:
        raise ValueError("empty IP address")
    if "/" in value:
        try:
            network = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                loose = ipaddress.ip_network(value, strict=False)
                raise ValueError(
                    f"{text!r} has host bits set; did you mean {loose.compressed}?"
                ) from None
            raise ValueError(f"{text!r} is not an IPv4/IPv6 address or CIDR") from None
        network = _unmap(network)
        if network.num_addresses == 1:
            return network.network_address.compressed
        return network.compressed
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4/IPv6 address or CIDR") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.compressed
    return address.compressed


def normalise_allowed_ips(values: Sequence[str]) -> list[str]:
    """Validate and canonicalise a whole allowlist, dropping duplicates and keeping order."""
    if len(values) > MAX_ALLOWED_IPS:
        raise ValueError(f"too many allowed IPs ({len(values)}); the limit is {MAX_ALLOWED_IPS}")
    result: list[str] = []
    for value in values:
        canonical = normalise_allowed_ip(value)
        if canonical not in result:
            result.append(canonical)
    return result


def compile_allowlist(values: Iterable[str]) -> tuple[Network, ...]:
    """Turn stored allowlist text into network objects for the hot path."""
    return tuple(parse_network(v) for v in values)


def ip_allowed(address: Address | None, allowlist: Sequence[Network]) -> bool:
    """True when the list is empty (no restriction) or the address falls in one of its networks."""
    if not allowlist:
        return True
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in allowlist)


def is_trusted(address: Address | None, trusted: Sequence[Network]) -> bool:
    """True when the address is one of the trusted proxies."""
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in trusted)


def resolve_client_ip(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> Address | None:
    """The client's IP as CONTRACT §4 defines it.

    Only when the direct peer is a trusted proxy is X-Forwarded-For believed: its entries are
    read right to left, trusted proxies skipped, and the first untrusted one is the client.
    Several headers count as one list, in order; empty entries are skipped. An entry that is not
    an address (`unknown`, `unix:`, a host name) where the client should be makes the client
    unknown (None), so no allowlist passes: the hop that wrote it could not say who its client
    was, and taking the trusted hop to its right instead would let every such caller pass an
    allowlist of the proxies' own private addresses.
    """
    peer_address = parse_address(peer) if peer else None
    if not is_trusted(peer_address, trusted):
        return peer_address
    entries = [item for header in forwarded_for for item in header.split(",")]
    entries = [e.strip() for e in entries if e.strip()]
    if not entries:
        return peer_address
    for raw in reversed(entries):
        address = parse_address(raw)
        if address is None or not is_trusted(address, trusted):
            return address
    # Every entry is a trusted address: the first (leftmost) one is the client.
    return parse_address(entries[0])


class ClientIpResolver:
    """`resolve_client_ip` with a bounded memo for the hot path: the same peer and the same
    X-Forwarded-For always give the same answer, and a service sees few distinct ones. Returns
    the address and its text (`unknown` when there is none)."""

    MEMO_SIZE = 8192
    MEMO_KEY_LIMIT = 512  # characters of X-Forwarded-For worth remembering

    def __init__(self, trusted: Sequence[Network]) -> None:
        self.trusted = tuple(trusted)
        self._memo: dict[tuple[str | None, tuple[str, ...]], tuple[Address | None, str]] = {}

    def resolve(
        self, peer: str | None, forwarded_for: tuple[str, ...]
    ) -> tuple[Address | None, str]:
        key = (peer, forwarded_for)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        address = resolve_client_ip(peer, forwarded_for, self.trusted)
        hit = (address, str(address) if address is not None else "unknown")
        if sum(len(h) for h in forwarded_for) <= self.MEMO_KEY_LIMIT:
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = hit
        return hit


def normalise_origin(text: str) -> str:
    """Validate a web origin and return it canonical: `scheme://host[:port]`, lowercase,
    default ports dropped. Paths, queries, fragments, credentials and wildcards are refused."""
    value = text.strip()
    if not value:
        raise ValueError("empty origin")
    if "*" in value:
        raise ValueError(f"{text!r}: wildcards are not allowed; list exact origins")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} is not an origin (scheme://host[:port])") from None
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"}:
        raise ValueError(f"{text!r} is not an origin: scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{text!r} is not an origin: credentials are not allowed")
    if (parts.path not in {"", "/"}) or parts.query or parts.fragment or value.endswith("?"):
        raise ValueError(f"{text!r} is not an origin: no path, query or fragment allowed")
    if parts.path == "/":
        raise ValueError(f"{text!r} is not an origin: remove the trailing slash")
    host = (parts.hostname or "").lower()
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{text!r} is not an origin: it has no host")
    if ":" in host:
        host = f"[{host}]"
    if port is None or (scheme, port) in {("http", 80), ("https", 443)}:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def normalise_origins(values: Sequence[str]) -> list[str]:
    """Validate and canonicalise an authorized-origins list, dropping duplicates."""
    if len(values) > MAX_ORIGINS:
        raise ValueError(f"too many origins ({len(values)}); the limit is {MAX_ORIGINS}")
    result: list[str] = []
    for value in values:
        origin = normalise_origin(value)
        if origin not in result:
            result.append(origin)
    return result
