"""Render egressd's iptables rules as iptables-restore text (pure, golden-tested).

One render per family. The text declares egressd's own chains, which iptables-restore
--noflush flushes and refills in one transaction: a (re)start or reload never has a moment
where the agent's traffic is unfiltered. The OUTPUT jumps into those chains are added only
when missing (the caller checks), so applying twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ..config import Profile

FILTER_CHAIN = "EGRESSD-OUTPUT"
NAT_CHAIN = "EGRESSD-DNS"
PROFILE_PREFIX = "EGRESSD-P-"
CHAIN_PREFIX = "EGRESSD-"

# (table, chain) pairs jumped to from OUTPUT.
JUMPS = (("filter", FILTER_CHAIN), ("nat", NAT_CHAIN))

LOG_LIMIT = "--limit 10/second --limit-burst 20"
MULTIPORT_MAX = 15  # the multiport match takes at most 15 ports per rule


@dataclass(frozen=True, slots=True)
class Family:
    version: int  # 4 or 6
    loopback: str
    reject: str  # REJECT type for non-TCP traffic

    def set_of(self, profile: Profile) -> str:
        return profile.set4 if self.version == 4 else profile.set6


V4 = Family(4, "127.0.0.1/32", "icmp-admin-prohibited")
V6 = Family(6, "::1/128", "icmp6-adm-prohibited")
FAMILIES = (V4, V6)


def profile_chain(profile: Profile) -> str:
    return PROFILE_PREFIX + profile.name


def _chunks(ports: Sequence[int]) -> list[str]:
    return [
        ",".join(str(p) for p in ports[i : i + MULTIPORT_MAX])
        for i in range(0, len(ports), MULTIPORT_MAX)
    ]


def _profile_rules(profile: Profile, fam: Family, log_rejects: bool) -> list[str]:
    chain = profile_chain(profile)
    rules = [
        # Replies and the rest of flows that were allowed when they began, so a live
        # connection outlives the grant that let it start.
        f"-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        # DNS to egressd itself (the nat rule has already rewritten the destination).
        f"-A {chain} -d {fam.loopback} -p udp -m udp --dport {profile.port} -j ACCEPT",
        f"-A {chain} -d {fam.loopback} -p tcp -m tcp --dport {profile.port} -j ACCEPT",
    ]
    if profile.allow_loopback:
        rules.append(f"-A {chain} -o lo -j ACCEPT")
    match_set = f"-m set --match-set {fam.set_of(profile)} dst"
    if profile.ports:
        for proto in ("tcp", "udp"):
            for chunk in _chunks(profile.ports):
                rules.append(
                    f"-A {chain} -p {proto} -m multiport --dports {chunk} {match_set} -j ACCEPT"
                )
    else:
        rules.append(f"-A {chain} {match_set} -j ACCEPT")
    for net in profile.cidrs:
        if net.version == fam.version:
            rules.append(f"-A {chain} -d {net} -j ACCEPT")
    if log_rejects:
        rules.append(
            f'-A {chain} -m limit {LOG_LIMIT} -j LOG --log-prefix "egressd reject {profile.name}: "'
            " --log-uid"
        )
    rules.append(f"-A {chain} -p tcp -j REJECT --reject-with tcp-reset")
    rules.append(f"-A {chain} -j REJECT --reject-with {fam.reject}")
    return rules


def render(
    profiles: Sequence[Profile],
    fam: Family,
    *,
    log_rejects: bool = True,
    missing_jumps: Sequence[tuple[str, str]] = (),
    stale_jumps: Mapping[tuple[str, str], int] = MappingProxyType({}),
) -> str:
    """The iptables-restore --noflush input for one family.

    ``missing_jumps`` are inserted at the top of OUTPUT. ``stale_jumps`` maps a jump that
    exists but is not (only) the first OUTPUT rule to its number of copies: they are all
    deleted and one is inserted at the top, in the same transaction, so there is no moment
    without the jump.
    """

    def jump(table: str, chain: str) -> list[str]:
        copies = stale_jumps.get((table, chain), 0)
        lines = [f"-D OUTPUT -j {chain}"] * copies
        if copies or (table, chain) in missing_jumps:
            lines.append(f"-I OUTPUT 1 -j {chain}")
        return lines

    out = ["*filter", f":{FILTER_CHAIN} - [0:0]"]
    out += [f":{profile_chain(p)} - [0:0]" for p in profiles]
    out += jump("filter", FILTER_CHAIN)
    for p in profiles:
        for uid in p.uids:
            out.append(f"-A {FILTER_CHAIN} -m owner --uid-owner {uid} -j {profile_chain(p)}")
    for p in profiles:
        out += _profile_rules(p, fam, log_rejects)
    out.append("COMMIT")

    out += ["*nat", f":{NAT_CHAIN} - [0:0]"]
    out += jump("nat", NAT_CHAIN)
    for p in profiles:
        for uid in p.uids:
            for proto in ("udp", "tcp"):
                # DNS to any server, so a hard-coded resolver address lands here too.
                out.append(
                    f"-A {NAT_CHAIN} -p {proto} -m owner --uid-owner {uid} -m {proto} --dport 53"
                    f" -j REDIRECT --to-ports {p.port}"
                )
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def rule_counts(text: str) -> dict[str, int]:
    """How many rules each chain gets from a render (what verify expects to find)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["-A"] and parts[1].startswith(CHAIN_PREFIX):
            counts[parts[1]] = counts.get(parts[1], 0) + 1
    return counts


def chains(profiles: Sequence[Profile]) -> dict[str, set[str]]:
    """egressd's chains per table for these profiles (to find stale ones after a reload)."""
    return {
        "filter": {FILTER_CHAIN, *(profile_chain(p) for p in profiles)},
        "nat": {NAT_CHAIN},
    }
