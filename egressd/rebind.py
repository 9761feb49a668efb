"""The rebinding guard: which answer addresses an allowed name may not grant (pure, no I/O).

An allowed name is not proof that its answer points at the internet. Whoever controls the
zone (or a CNAME target in it) can answer with 127.0.0.1, 10.0.0.5 or 169.254.169.254 (cloud
metadata: credentials), and granting that address lets the agent reach local and internal
services through an allowlisted name. So every address of an answer is checked against an
explicit table of special-purpose ranges and against the host's own addresses; the ones
that match are removed from the answer and never granted.

The table is written out here on purpose rather than taken from ``ipaddress.is_private``,
which calls the documentation ranges (TEST-NET, 2001:db8::/32) private and does not know
100.64.0.0/10 (CGNAT) or NAT64. Documentation ranges are ordinary addresses here: the tests
use them as "the internet". A change to the table shows up as a diff of the golden file
``tests/unit/golden/rebind-table.txt`` (``render_table``).

IPv6 forms that carry an IPv4 address (IPv4-mapped, -compatible, -translated, NAT64, 6to4)
are judged by the IPv4 address inside, against the IPv4 table and the host's addresses.

Exceptions (per profile, ``private_answers``): CIDRs whose addresses are fine, and name
patterns whose answers may carry special addresses. Neither lifts the rows marked "host"
(unspecified, loopback) nor the host's own addresses: DNS never grants this host; a profile
that must reach local services says so with ``allow_loopback`` or ``cidrs``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from .allowlist import Labels, Matcher, Rule

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

OWN_ADDRESS = "own-address"  # the rule name for "one of the host's own addresses"


@dataclass(frozen=True, slots=True)
class Range:
    network: IPNetwork
    reason: str
    host: bool = False  # "this host": no exception lifts it


def _r(cidr: str, reason: str, host: bool = False) -> Range:
    return Range(ipaddress.ip_network(cidr), reason, host)


# Commas are avoided in reasons: journal fields join lists with commas.
V4_TABLE: tuple[Range, ...] = (
    _r("0.0.0.0/8", "this network; 0.0.0.0 reaches the local host", host=True),
    _r("10.0.0.0/8", "private (RFC 1918)"),
    _r("100.64.0.0/10", "shared address space / CGNAT (RFC 6598)"),
    _r("127.0.0.0/8", "loopback", host=True),
    _r("169.254.0.0/16", "link-local; cloud metadata 169.254.169.254 (RFC 3927)"),
    _r("172.16.0.0/12", "private (RFC 1918)"),
    _r("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
    _r("192.168.0.0/16", "private (RFC 1918)"),
    _r("198.18.0.0/15", "benchmarking (RFC 2544)"),
    _r("224.0.0.0/4", "multicast"),
    _r("240.0.0.0/4", "reserved; includes limited broadcast 255.255.255.255"),
)

V6_TABLE: tuple[Range, ...] = (
    _r("::/128", "unspecified; reaches the local host", host=True),
    _r("::1/128", "loopback", host=True),
    _r("100::/64", "discard-only (RFC 6666)"),
    _r("fc00::/7", "unique local / ULA (RFC 4193)"),
    _r("fe80::/10", "link-local"),
    _r("fec0::/10", "site-local (deprecated; RFC 3879)"),
    _r("ff00::/8", "multicast"),
    _r("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
)


@dataclass(frozen=True, slots=True)
class Embedding:
    network: ipaddress.IPv6Network
    reason: str
    shift: int  # the embedded IPv4 address is (int(address) >> shift) & 0xFFFFFFFF


def _e(cidr: str, reason: str, shift: int = 0) -> Embedding:
    net = ipaddress.ip_network(cidr)
    assert isinstance(net, ipaddress.IPv6Network)
    return Embedding(net, reason, shift)


# Checked after V6_TABLE, so ::/128 and ::1/128 are judged as themselves, not as
# IPv4-compatible 0.0.0.0 and 0.0.0.1.
EMBEDDED: tuple[Embedding, ...] = (
    _e("::ffff:0:0/96", "IPv4-mapped"),
    _e("::/96", "IPv4-compatible (deprecated)"),
    _e("::ffff:0:0:0/96", "IPv4-translated (RFC 2765)"),
    _e("64:ff9b::/96", "NAT64 (RFC 6052)"),
    _e("2002::/16", "6to4 (RFC 3056)", shift=80),
)


@dataclass(frozen=True, slots=True)
class Special:
    """Why one address is special: the rule (a CIDR, or ``own-address``) and its reason."""

    rule: str
    reason: str
    host: bool  # no exception lifts it

    def __str__(self) -> str:
        return f"{self.rule} ({self.reason})"


def _masks(table: tuple[Range, ...]) -> tuple[tuple[int, int, Range], ...]:
    return tuple((int(r.network.network_address), int(r.network.netmask), r) for r in table)


# Integer (network, mask) pairs: an `addr in network` of the ipaddress module costs ~1 us
# per row, and every address of every fresh answer is screened.
_MASKS = {4: _masks(V4_TABLE), 6: _masks(V6_TABLE)}
_EMBEDDED_MASKS = tuple(
    (int(e.network.network_address), int(e.network.netmask), e) for e in EMBEDDED
)


def _table_match(addr: IPAddress) -> Range | None:
    """The row of the address's own family's table that holds it."""
    value = int(addr)
    for net, mask, row in _MASKS[addr.version]:
        if value & mask == net:
            return row
    return None


def _embedding(addr: ipaddress.IPv6Address) -> Embedding | None:
    value = int(addr)
    for net, mask, emb in _EMBEDDED_MASKS:
        if value & mask == net:
            return emb
    return None


def classify(addr: IPAddress, local: frozenset[IPAddress] = frozenset()) -> Special | None:
    """The reason ``addr`` must not be granted, or None for an ordinary address."""
    if addr in local:
        return Special(OWN_ADDRESS, "one of this host's own addresses", True)
    if isinstance(addr, ipaddress.IPv4Address):
        row = _table_match(addr)
        return Special(str(row.network), row.reason, row.host) if row else None
    row = _table_match(addr)
    if row is not None:
        return Special(str(row.network), row.reason, row.host)
    emb = _embedding(addr)
    if emb is None:
        return None
    v4 = _unembed(addr, emb)
    inner = classify(v4, local)
    if inner is None:
        return None
    return Special(
        f"{inner.rule} via {emb.network}", f"{emb.reason} {v4}: {inner.reason}", inner.host
    )


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4...)."""
    emb = _embedding(addr)
    return None if emb is None else _unembed(addr, emb)


def _unembed(addr: ipaddress.IPv6Address, emb: Embedding) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address((int(addr) >> emb.shift) & 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class Exceptions:
    """A profile's ``private_answers``: CIDRs that are fine, names whose answers may be."""

    cidrs: tuple[IPNetwork, ...] = ()
    names: tuple[Rule, ...] = ()
    matcher: Matcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matcher", Matcher(self.names))

    def name_rule(self, labels: Labels) -> Rule | None:
        """The pattern that lets this query name's answer carry special addresses."""
        return self.matcher.allow_rule(labels) if self.names else None

    def covers(self, addr: IPAddress) -> bool:
        if any(addr in net for net in self.cidrs):
            return True
        if isinstance(addr, ipaddress.IPv6Address):
            # ::ffff:10.0.0.5 reaches 10.0.0.5: an exception for the one is one for the other.
            v4 = embedded_ipv4(addr)
            return v4 is not None and any(v4 in net for net in self.cidrs)
        return False


NO_EXCEPTIONS = Exceptions()


@dataclass(frozen=True, slots=True)
class Dropped:
    ip: str  # as the answer spelled it
    why: Special


@dataclass(frozen=True, slots=True)
class Screened:
    kept: tuple[str, ...]
    dropped: tuple[Dropped, ...]


def screen(
    ips: Iterable[str],
    exceptions: Exceptions = NO_EXCEPTIONS,
    local: frozenset[IPAddress] = frozenset(),
    labels: Labels | None = None,
) -> Screened:
    """Split an answer's addresses into the ones that may be granted and the ones that may not.

    ``labels`` is the query name (allowlist ``Labels``); a ``private_answers`` name pattern
    that matches it lets the answer carry special addresses, except this host's.
    ``local`` holds the host's own addresses (any interface, public ones included).
    """
    kept: list[str] = []
    dropped: list[Dropped] = []
    name_ok: bool | None = None  # decided on the first special address only
    for ip in ips:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            dropped.append(Dropped(ip, Special("unparsable", "not an IP address", True)))
            continue
        why = classify(addr, local)
        if why is not None and not why.host:
            if name_ok is None:
                name_ok = labels is not None and exceptions.name_rule(labels) is not None
            if name_ok or exceptions.covers(addr):
                why = None
        if why is None:
            kept.append(ip)
        else:
            dropped.append(Dropped(ip, why))
    return Screened(tuple(kept), tuple(dropped))


def host_overlap(net: IPNetwork) -> Range | None:
    """The "this host" row an exception CIDR would overlap (such CIDRs are refused)."""
    for row in (*V4_TABLE, *V6_TABLE):
        if row.host and net.version == row.network.version and net.overlaps(row.network):
            return row
    return None


def render_table() -> str:
    """The table as text, one row a line (golden-tested: a change is a visible diff)."""
    lines = ["# egressd rebinding guard: addresses an answer may not grant", ""]
    lines.append("# IPv4 (host = no private_answers exception lifts it)")
    for row in V4_TABLE:
        lines.append(_row(row))
    lines += ["", "# IPv6"]
    for row in V6_TABLE:
        lines.append(_row(row))
    lines += ["", "# IPv6 forms carrying an IPv4 address, judged by that address"]
    for emb in EMBEDDED:
        lines.append(f"{str(emb.network):<20} ipv4 at bit {emb.shift:<3} {emb.reason}")
    lines += ["", f"# and every address of the host itself ({OWN_ADDRESS}, host)", ""]
    return "\n".join(lines)


def _row(row: Range) -> str:
    return f"{str(row.network):<20} {'host' if row.host else '-':<4} {row.reason}"
