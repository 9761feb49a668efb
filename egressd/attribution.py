"""What egressd knows of an address the firewall rejected (pure: the ledger's memory only).

A blocked connection's record says whether an allowed name ever resolved to the address
through egressd, for which profile and when, so the user can tell a hard-coded address
from an expired grant, a port not on the line, or another profile's name. Nothing here
sends a query: a blocked name is never resolved to find its addresses (the agent's query
for it was answered NXDOMAIN, and its addresses are nobody's business but the upstream's).

Inputs are the ledger's ``about(ip)``: the reasons naming the address (live, or run out
but not pruned yet: ``addrs[ip]`` is the expiry) and the pruned ones (``Past``), all in
``time.monotonic()`` seconds, and ``now`` on the same clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .events import ConnectionBlocked
from .ledger import Past, Reason

NEVER = "never resolved through egressd"
# The set of ports a `ports=` grant covers (hash:ip,port): TCP and UDP only.
_PORTED = ("tcp", "udp")


@dataclass(frozen=True, slots=True)
class _Seen:
    """One name's answer that gave the address, live or not."""

    profile: str
    name: str
    ports: tuple[int, ...]
    expiry: float


def _seen(reasons: Sequence[Reason], pasts: Sequence[Past], ip: str) -> list[_Seen]:
    seen = [
        _Seen(r.profile, r.name, r.ports, exp) for r in reasons if (exp := r.expiry(ip)) is not None
    ]
    seen += [_Seen(p.profile, p.name, p.ports, p.expired) for p in pasts]
    # Latest first: the freshest grant is the best explanation.
    return sorted(seen, key=lambda s: (-s.expiry, s.profile, s.name))


def _names(seen: Sequence[_Seen]) -> str:
    names = list(dict.fromkeys(s.name for s in seen))
    return " and ".join(names) if len(names) <= 2 else f"{', '.join(names[:-1])} and {names[-1]}"


def _ports(ports: tuple[int, ...]) -> str:
    return ",".join(str(p) for p in ports)


def known(
    profile: str,
    protocol: str,
    port: int,
    ip: str,
    about: tuple[Sequence[Reason], Sequence[Past]],
    now: float,
) -> tuple[str, tuple[str, ...]]:
    """(what egressd knows of ``ip`` for this blocked connection, the allowed names that
    resolved to it for any profile, this profile's first)."""
    seen = _seen(about[0], about[1], ip)
    if not seen:
        return NEVER, ()
    mine = [s for s in seen if s.profile == profile]
    others = [s for s in seen if s.profile != profile]
    names = tuple(dict.fromkeys([s.name for s in mine] + [s.name for s in others]))
    live = [s for s in mine if s.expiry > now]
    if live:
        left = round(max(s.expiry for s in live) - now)
        # Live and blocked: either the grant is for other ports (or another protocol), or
        # some other rule (rate, count, a flow not admitted as new) rejected it.
        if all(s.ports for s in live):
            ports = sorted({p for s in live for p in s.ports})
            if protocol not in _PORTED:
                what = f"{protocol} is not on the line's ports (tcp/udp {_ports(tuple(ports))})"
            elif port not in ports:
                what = f"port {port} is not on the line's ports ({_ports(tuple(ports))})"
            else:
                what = (
                    "rejected by another rule (connection rate or count limit, or not a new flow)"
                )
            return (
                f"resolved from {_names(live)} for {left} s more, on ports "
                f"{_ports(tuple(ports))} only: {what}",
                names,
            )
        return (
            f"resolved from {_names(live)} for {left} s more, on every port: rejected by "
            "another rule (connection rate or count limit, or not a new flow)",
            names,
        )
    if mine:
        ago = round(now - mine[0].expiry)
        return (
            f"resolved from {_names(mine)}, but the grant expired {ago} s ago "
            "(a connection must follow a fresh lookup)",
            names,
        )
    profiles = ", ".join(dict.fromkeys(s.profile for s in others))
    state = "live" if any(s.expiry > now for s in others) else "expired"
    return (
        f"resolved from {_names(others)} for profile {profiles} only ({state}); "
        f"never granted to profile {profile}",
        names,
    )


def blocked(
    profile: str,
    uid: int,
    ip: str,
    protocol: str,
    port: int,
    about: tuple[Sequence[Reason], Sequence[Past]],
    now: float,
) -> ConnectionBlocked:
    """The journal record of one blocked connection."""
    text, names = known(profile, protocol, port, ip, about, now)
    return ConnectionBlocked(profile, uid, ip, port, protocol, text, names)
