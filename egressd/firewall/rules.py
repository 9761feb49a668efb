"""Render egressd's iptables rules as iptables-restore text (pure, golden-tested).

One render per family. The text declares egressd's own chains, which iptables-restore
--noflush flushes and refills in one transaction: a (re)start or reload never has a moment
where the agent's traffic is unfiltered. The OUTPUT jumps into those chains are added only
when missing (the caller checks), so applying twice changes nothing.

Rejected packets (``daemon.log_rejects``, on by default) go to NFLOG before the REJECT, so
that egressd itself reads them back (egressd.firewall.nflog) and writes one journal record
per blocked connection with the uid, the profile and what egressd knows of the address
(egressd.attribution): an attributed record instead of an unattributed kernel log line,
which is why NFLOG replaces the LOG rule rather than joining it. Each profile has its own
group, ``NFLOG_BASE`` + its conntrack mark id: stable across reloads and restarts like the
id, unique per profile, and away from the low groups other NFLOG users (ulogd) take by
default. NFLOG groups are 16 bits: a profile whose id does not fit (only with a very
wide ``daemon.ct_mask``) keeps the kernel LOG rule. The rule is rate-limited in the kernel
(``NFLOG_LIMIT`` per profile and family) so that a flood of rejected packets costs egressd
nothing; above that, egressd's per-profile record budget (blocklog) applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ..config import DEFAULT_CT_MASK, Profile

FILTER_CHAIN = "EGRESSD-OUTPUT"
NAT_CHAIN = "EGRESSD-DNS"
PROFILE_PREFIX = "EGRESSD-P-"
ADMIT_PREFIX = "EGRESSD-A-"
REJECT_PREFIX = "EGRESSD-R-"
CHAIN_PREFIX = "EGRESSD-"

# (table, chain) pairs jumped to from OUTPUT.
JUMPS = (("filter", FILTER_CHAIN), ("nat", NAT_CHAIN))

LOG_LIMIT = "--limit 10/second --limit-burst 20"
NFLOG_LIMIT = "--limit 20/second --limit-burst 40"
NFLOG_BASE = 16384  # a profile's group: this + its mark id (see the module docstring)
NFLOG_MAX = 0xFFFF


@dataclass(frozen=True, slots=True)
class Family:
    version: int  # 4 or 6
    loopback: str
    reject: str  # REJECT type for non-TCP traffic

    def set_of(self, profile: Profile) -> str:
        return profile.set4 if self.version == 4 else profile.set6

    def pset_of(self, profile: Profile) -> str:
        return profile.pset4 if self.version == 4 else profile.pset6


V4 = Family(4, "127.0.0.1/32", "icmp-admin-prohibited")
V6 = Family(6, "::1/128", "icmp6-adm-prohibited")
FAMILIES = (V4, V6)


def profile_chain(profile: Profile) -> str:
    return PROFILE_PREFIX + profile.name


def admit_chain(profile: Profile) -> str:
    return ADMIT_PREFIX + profile.name


def reject_chain(profile: Profile) -> str:
    return REJECT_PREFIX + profile.name


def mark_of(profile: Profile, ct_mask: int) -> str:
    """``VALUE/MASK``: the profile's id in the conntrack mark bits egressd owns."""
    shift = (ct_mask & -ct_mask).bit_length() - 1
    return f"{profile.mark_id << shift:#x}/{ct_mask:#x}"


def _hashlimit_name(profile: Profile) -> str:
    # The kernel keeps a hashlimit table by name across rule replacements, with the
    # parameters it was created with: a reload that changed the rate would silently keep
    # the old one (measured). So the parameters are part of the name.
    return f"egressd-{profile.mark_id}-{profile.conn_rate}-{profile.conn_burst}"


def nflog_group(profile: Profile) -> int | None:
    """The NFLOG group of the profile's rejected packets; None if its id does not fit."""
    group = NFLOG_BASE + profile.mark_id
    return group if profile.mark_id > 0 and group <= NFLOG_MAX else None


def nflog_groups(profiles: Sequence[Profile]) -> dict[int, str]:
    """NFLOG group -> profile name, for the profiles whose rejects go to NFLOG."""
    return {g: p.name for p in profiles if (g := nflog_group(p)) is not None}


def _log_prefix(profile: Profile) -> str:
    # The kernel takes at most 29 characters; a 15-character profile name would overflow.
    return f"egressd reject {profile.name}"[:27] + ": "


def _profile_rules(
    profile: Profile, fam: Family, ct_mask: int, log_rejects: bool, nflog: bool
) -> list[str]:
    chain, admit, reject = profile_chain(profile), admit_chain(profile), reject_chain(profile)
    mark = mark_of(profile, ct_mask)
    rules = [
        # Only flows this profile's chain admitted continue (their conntrack mark says so),
        # so a live connection outlives the grant that let it start. A flow another uid,
        # egressd itself or an outside host opened is not continued: the agent could bind
        # the source port of egressd's upstream query and talk DNS past the redirect.
        f"-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -m connmark --mark {mark}"
        " -j ACCEPT",
        # The agent's own local servers answering local clients (a dev server and the
        # user's browser): the reply direction on loopback only. Not `-o lo` as a whole,
        # which would continue egressd's flows to a loopback upstream such as 127.0.0.53.
        f"-A {chain} -o lo -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT",
        # Everything else that is not a new flow (foreign or unmarked established, invalid,
        # untracked) is rejected here, never falls through to the accepts below.
        f"-A {chain} -m conntrack ! --ctstate NEW -j {reject}",
        # Each admitted flow is a conntrack entry in the host's table: bound the rate, and
        # how many the users hold at once (counted per rule: this chain's flows only).
        f"-A {chain} -m hashlimit --hashlimit-above {profile.conn_rate}/second"
        f" --hashlimit-burst {profile.conn_burst} --hashlimit-name {_hashlimit_name(profile)}"
        f" -j {reject}",
        f"-A {chain} -m connlimit --connlimit-above {profile.conn_max} --connlimit-mask 0"
        f" -j {reject}",
        # DNS to egressd itself (the nat rule has already rewritten the destination).
        f"-A {chain} -d {fam.loopback} -p udp -m udp --dport {profile.port} -j {admit}",
        f"-A {chain} -d {fam.loopback} -p tcp -m tcp --dport {profile.port} -j {admit}",
        # Port 53 anywhere else escaped the redirect (a packet of a flow that existed before
        # its first packet reached nat): never to a resolver directly, CIDRs or not.
        f"-A {chain} -p udp -m udp --dport 53 -j {reject}",
        f"-A {chain} -p tcp -m tcp --dport 53 -j {reject}",
    ]
    if profile.allow_loopback:
        rules.append(f"-A {chain} -o lo -j {admit}")
    else:
        # The host's own addresses, public ones included: local services are not egress.
        rules.append(f"-A {chain} -m addrtype --dst-type LOCAL -j {reject}")
    # Granted addresses: on every port, or (hash:ip,port) on the ports of the line that
    # granted them, TCP and UDP.
    rules.append(f"-A {chain} -m set --match-set {fam.set_of(profile)} dst -j {admit}")
    rules.append(f"-A {chain} -m set --match-set {fam.pset_of(profile)} dst,dst -j {admit}")
    for net in profile.cidrs:
        if net.version == fam.version:
            rules.append(f"-A {chain} -d {net} -j {admit}")
    rules.append(f"-A {chain} -j {reject}")

    # Admit: mark the flow as this profile's (on its first packet only: established
    # packets never get here), then accept.
    rules.append(f"-A {admit} -j CONNMARK --set-xmark {mark}")
    rules.append(f"-A {admit} -j ACCEPT")
    group = nflog_group(profile) if nflog else None
    if log_rejects and group is not None:
        rules.append(f"-A {reject} -m limit {NFLOG_LIMIT} -j NFLOG --nflog-group {group}")
    elif log_rejects:
        rules.append(
            f'-A {reject} -m limit {LOG_LIMIT} -j LOG --log-prefix "{_log_prefix(profile)}"'
            " --log-uid"
        )
    rules.append(f"-A {reject} -p tcp -j REJECT --reject-with tcp-reset")
    rules.append(f"-A {reject} -j REJECT --reject-with {fam.reject}")
    return rules


def render(
    profiles: Sequence[Profile],
    fam: Family,
    *,
    ct_mask: int = DEFAULT_CT_MASK,
    log_rejects: bool = True,
    nflog: bool = True,
    missing_jumps: Sequence[tuple[str, str]] = (),
    stale_jumps: Mapping[tuple[str, str], int] = MappingProxyType({}),
) -> str:
    """The iptables-restore --noflush input for one family.

    ``missing_jumps`` are inserted at the top of OUTPUT. ``stale_jumps`` maps a jump that
    exists but is not (only) the first OUTPUT rule to its number of copies: they are all
    deleted and one is inserted at the top, in the same transaction, so there is no moment
    without the jump. ``nflog=False`` logs rejects with the kernel's LOG instead of NFLOG
    (for a kernel without nfnetlink_log, where the NFLOG rule would not load).
    """

    def jump(table: str, chain: str) -> list[str]:
        copies = stale_jumps.get((table, chain), 0)
        lines = [f"-D OUTPUT -j {chain}"] * copies
        if copies or (table, chain) in missing_jumps:
            lines.append(f"-I OUTPUT 1 -j {chain}")
        return lines

    out = ["*filter", f":{FILTER_CHAIN} - [0:0]"]
    for p in profiles:
        out += [f":{c} - [0:0]" for c in (profile_chain(p), admit_chain(p), reject_chain(p))]
    out += jump("filter", FILTER_CHAIN)
    for p in profiles:
        for owner in _owners(p):
            out.append(f"-A {FILTER_CHAIN} -m owner --uid-owner {owner} -j {profile_chain(p)}")
    for p in profiles:
        out += _profile_rules(p, fam, ct_mask, log_rejects, nflog)
    out.append("COMMIT")

    out += ["*nat", f":{NAT_CHAIN} - [0:0]"]
    out += jump("nat", NAT_CHAIN)
    for p in profiles:
        for owner in _owners(p):
            for proto in ("udp", "tcp"):
                # DNS to any server, so a hard-coded resolver address lands here too.
                out.append(
                    f"-A {NAT_CHAIN} -p {proto} -m owner --uid-owner {owner} -m {proto} --dport 53"
                    f" -j REDIRECT --to-ports {p.port}"
                )
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_lock(profiles: Sequence[Profile], fam: Family, *, add_jump: bool) -> str:
    """Deny-all for the profiles' users: what a family holds until its full render applied.

    Applied first where egressd's filter jump is missing (a first start, or after a foreign
    flush), so that if the full render then fails for this family (or for the other one,
    after this one succeeded), the users reach nothing rather than everything. The same
    text as packaging/egressd-lockdown writes at boot. DNS needs no rule: without the nat
    REDIRECT, the users' port-53 packets meet this REJECT too.
    """
    out = ["*filter", f":{FILTER_CHAIN} - [0:0]"]
    for p in profiles:
        for owner in _owners(p):
            m = f"-m owner --uid-owner {owner}"
            out.append(f"-A {FILTER_CHAIN} -p tcp {m} -j REJECT --reject-with tcp-reset")
            out.append(f"-A {FILTER_CHAIN} {m} -j REJECT --reject-with {fam.reject}")
    if add_jump:
        out.append(f"-I OUTPUT 1 -j {FILTER_CHAIN}")
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def restricted(profiles: Sequence[Profile]) -> str:
    """The state file the boot-time lockdown reads: every restricted uid and uid range."""
    lines = ["# Written by egressd after each successful install; read at boot by"]
    lines.append("# egressd-lockdown, which rejects these uids until egressd is serving.")
    lines += [owner for p in profiles for owner in _owners(p)]
    return "\n".join(lines) + "\n"


def _owners(profile: Profile) -> list[str]:
    """The profile's uids, then its users' subordinate uid ranges (``FIRST-LAST``)."""
    return [str(u) for u in profile.uids] + [f"{a}-{b}" for a, b in profile.uid_ranges]


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
        "filter": {
            FILTER_CHAIN,
            *(c for p in profiles for c in (profile_chain(p), admit_chain(p), reject_chain(p))),
        },
        "nat": {NAT_CHAIN},
    }
