"""Golden-file tests of the iptables-restore text (egressd.firewall.rules).

Regenerate the golden files after an intended change with

    EGRESSD_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_rules.py

and read the diff before committing it.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from egressd.config import Profile
from egressd.firewall import rules
from egressd.firewall.rules import (
    FILTER_CHAIN,
    JUMPS,
    NAT_CHAIN,
    V4,
    V6,
    Family,
    chains,
    profile_chain,
    render,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("EGRESSD_UPDATE_GOLDEN") == "1"

AGENT_PORTS = (22, 80, 443, *range(8000, 8017))  # 20 ports: two multiport chunks
AGENT = Profile(
    name="agent",
    uids=(1000, 1001),
    port=153,
    ports=AGENT_PORTS,
    cidrs=(
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.168.1.0/24"),
    ),
    allow_loopback=True,
    uid_ranges=((100000, 165535),),
    mark_id=7,
)
BUILD = Profile(
    name="build",
    uids=(1002,),
    port=154,
    cidrs=(ipaddress.ip_network("2001:db8::/32"),),
    mark_id=255,
    conn_rate=50,
    conn_burst=100,
    conn_max=300,
)
PROFILES = (AGENT, BUILD)
ALL_JUMPS = (("filter", FILTER_CHAIN), ("nat", NAT_CHAIN))

CASES = {
    "v4": dict(fam=V4, missing_jumps=()),
    "v6": dict(fam=V6, missing_jumps=()),
    "v4-jumps": dict(fam=V4, missing_jumps=ALL_JUMPS),
    "v6-jumps": dict(fam=V6, missing_jumps=ALL_JUMPS),
    "v4-nat-jump-nolog": dict(fam=V4, missing_jumps=(("nat", NAT_CHAIN),), log_rejects=False),
}


def rendered(case: str) -> str:
    kw = dict(CASES[case])
    fam = kw.pop("fam")
    assert isinstance(fam, Family)
    return render(PROFILES, fam, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    path = GOLDEN / f"{case}.rules"
    text = rendered(case)
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path} missing; run with EGRESSD_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8")


def test_render_is_deterministic() -> None:
    for case in CASES:
        assert rendered(case) == rendered(case)


# --- structural checks (independent of the golden files) ------------------------------------


def lines(text: str) -> list[str]:
    return text.splitlines()


def table(text: str, name: str) -> list[str]:
    ls = lines(text)
    start = ls.index(f"*{name}")
    end = ls.index("COMMIT", start)
    return ls[start + 1 : end]


@pytest.mark.parametrize("fam", [V4, V6])
def test_tables_and_chain_declarations(fam: Family) -> None:
    text = render(PROFILES, fam)
    assert text.endswith("COMMIT\n")
    assert [ln for ln in lines(text) if ln.startswith("*")] == ["*filter", "*nat"]
    assert lines(text).count("COMMIT") == 2
    assert table(text, "filter")[:7] == [
        f":{FILTER_CHAIN} - [0:0]",
        ":EGRESSD-P-agent - [0:0]",
        ":EGRESSD-A-agent - [0:0]",
        ":EGRESSD-R-agent - [0:0]",
        ":EGRESSD-P-build - [0:0]",
        ":EGRESSD-A-build - [0:0]",
        ":EGRESSD-R-build - [0:0]",
    ]
    assert table(text, "nat")[0] == f":{NAT_CHAIN} - [0:0]"
    # nothing outside egressd's own chains is touched without missing_jumps
    for ln in lines(text):
        if ln.startswith("-"):
            assert ln.split()[1].startswith("EGRESSD-"), ln


@pytest.mark.parametrize("fam", [V4, V6])
def test_nat_redirects_dns_per_uid(fam: Family) -> None:
    nat = [ln for ln in table(render(PROFILES, fam), "nat") if ln.startswith("-A")]
    expected = []
    for uid, port in ((1000, 153), (1001, 153), ("100000-165535", 153), (1002, 154)):
        for proto in ("udp", "tcp"):
            expected.append(
                f"-A EGRESSD-DNS -p {proto} -m owner --uid-owner {uid} -m {proto} --dport 53 "
                f"-j REDIRECT --to-ports {port}"
            )
    assert nat == expected


@pytest.mark.parametrize("fam", [V4, V6])
def test_uid_dispatch(fam: Family) -> None:
    filt = table(render(PROFILES, fam), "filter")
    assert [ln for ln in filt if ln.startswith(f"-A {FILTER_CHAIN}")] == [
        f"-A {FILTER_CHAIN} -m owner --uid-owner 1000 -j EGRESSD-P-agent",
        f"-A {FILTER_CHAIN} -m owner --uid-owner 1001 -j EGRESSD-P-agent",
        f"-A {FILTER_CHAIN} -m owner --uid-owner 100000-165535 -j EGRESSD-P-agent",
        f"-A {FILTER_CHAIN} -m owner --uid-owner 1002 -j EGRESSD-P-build",
    ]


def chain_rules(text: str, chain: str) -> list[str]:
    return [ln for ln in table(text, "filter") if ln.startswith(f"-A {chain} ")]


def test_agent_chain_v4_order() -> None:
    text = render(PROFILES, V4)
    r = chain_rules(text, "EGRESSD-P-agent")
    c = "-A EGRESSD-P-agent"
    admit, reject = "-j EGRESSD-A-agent", "-j EGRESSD-R-agent"
    assert r == [
        f"{c} -m conntrack --ctstate ESTABLISHED,RELATED -m connmark --mark 0x7000000/0xff000000"
        " -j ACCEPT",
        f"{c} -o lo -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT",
        f"{c} -m conntrack ! --ctstate NEW {reject}",
        f"{c} -m hashlimit --hashlimit-above 500/second --hashlimit-burst 2000"
        f" --hashlimit-name egressd-7-500-2000 {reject}",
        f"{c} -m connlimit --connlimit-above 4096 --connlimit-mask 0 {reject}",
        f"{c} -d 127.0.0.1/32 -p udp -m udp --dport 153 {admit}",
        f"{c} -d 127.0.0.1/32 -p tcp -m tcp --dport 153 {admit}",
        f"{c} -p udp -m udp --dport 53 {reject}",
        f"{c} -p tcp -m tcp --dport 53 {reject}",
        f"{c} -o lo {admit}",
        f"{c} -m set --match-set egressd-agent-v4 dst {admit}",
        f"{c} -m set --match-set egressd-agent-p4 dst,dst {admit}",
        f"{c} -d 10.0.0.0/8 {admit}",
        f"{c} -d 192.168.1.0/24 {admit}",
        f"{c} {reject}",
    ]
    assert chain_rules(text, "EGRESSD-A-agent") == [
        "-A EGRESSD-A-agent -j CONNMARK --set-xmark 0x7000000/0xff000000",
        "-A EGRESSD-A-agent -j ACCEPT",
    ]
    assert chain_rules(text, "EGRESSD-R-agent") == [
        "-A EGRESSD-R-agent -m limit --limit 20/second --limit-burst 40 -j NFLOG"
        " --nflog-group 16391",
        "-A EGRESSD-R-agent -p tcp -j REJECT --reject-with tcp-reset",
        "-A EGRESSD-R-agent -j REJECT --reject-with icmp-admin-prohibited",
    ]


def test_build_chain_v6_order() -> None:
    text = render(PROFILES, V6, ct_mask=0x0000FF00)
    r = chain_rules(text, "EGRESSD-P-build")
    c = "-A EGRESSD-P-build"
    admit, reject = "-j EGRESSD-A-build", "-j EGRESSD-R-build"
    assert r == [
        f"{c} -m conntrack --ctstate ESTABLISHED,RELATED -m connmark --mark 0xff00/0xff00"
        " -j ACCEPT",
        f"{c} -o lo -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT",
        f"{c} -m conntrack ! --ctstate NEW {reject}",
        f"{c} -m hashlimit --hashlimit-above 50/second --hashlimit-burst 100"
        f" --hashlimit-name egressd-255-50-100 {reject}",
        f"{c} -m connlimit --connlimit-above 300 --connlimit-mask 0 {reject}",
        f"{c} -d ::1/128 -p udp -m udp --dport 154 {admit}",
        f"{c} -d ::1/128 -p tcp -m tcp --dport 154 {admit}",
        f"{c} -p udp -m udp --dport 53 {reject}",
        f"{c} -p tcp -m tcp --dport 53 {reject}",
        f"{c} -m addrtype --dst-type LOCAL {reject}",
        f"{c} -m set --match-set egressd-build-v6 dst {admit}",
        f"{c} -m set --match-set egressd-build-p6 dst,dst {admit}",
        f"{c} -d 2001:db8::/32 {admit}",
        f"{c} {reject}",
    ]
    assert chain_rules(text, "EGRESSD-A-build")[0] == (
        "-A EGRESSD-A-build -j CONNMARK --set-xmark 0xff00/0xff00"
    )
    assert chain_rules(text, "EGRESSD-R-build")[-1] == (
        "-A EGRESSD-R-build -j REJECT --reject-with icmp6-adm-prohibited"
    )


@pytest.mark.parametrize("fam", [V4, V6])
def test_every_accept_of_a_new_flow_marks_it(fam: Family) -> None:
    """Only the marked-established and loopback-reply rules accept directly; every other
    accept goes through the admit chain, which marks the flow first."""
    text = render(PROFILES, fam)
    for p in PROFILES:
        direct = [ln for ln in chain_rules(text, profile_chain(p)) if ln.endswith("-j ACCEPT")]
        assert len(direct) == 2
        assert "--connmark" not in direct[0] and "connmark --mark" in direct[0]
        assert "--ctdir REPLY" in direct[1] and "-o lo" in direct[1]
        admit = chain_rules(text, rules.admit_chain(p))
        assert admit[0].startswith(f"-A {rules.admit_chain(p)} -j CONNMARK --set-xmark ")
        assert admit[-1] == f"-A {rules.admit_chain(p)} -j ACCEPT"


@pytest.mark.parametrize("fam", [V4, V6])
def test_non_new_and_escaped_dns_are_rejected_before_any_admit(fam: Family) -> None:
    text = render(PROFILES, fam)
    for p in PROFILES:
        r = chain_rules(text, profile_chain(p))
        first_admit = min(i for i, ln in enumerate(r) if ln.endswith(rules.admit_chain(p)))
        non_new = next(i for i, ln in enumerate(r) if "! --ctstate NEW" in ln)
        limit = next(i for i, ln in enumerate(r) if "hashlimit" in ln)
        count = next(i for i, ln in enumerate(r) if "connlimit" in ln)
        assert non_new < limit < count < first_admit
        dns53 = [i for i, ln in enumerate(r) if "--dport 53 " in ln]
        accepts = [i for i, ln in enumerate(r) if ln.endswith(rules.admit_chain(p))]
        dns = [i for i, ln in enumerate(r) if f"--dport {p.port} " in ln]
        assert len(dns53) == 2 and all(i < min(set(accepts) - set(dns)) for i in dns53)
        assert r[-1] == f"-A {profile_chain(p)} -j {rules.reject_chain(p)}"


def test_mark_of_places_the_id_under_the_mask() -> None:
    assert rules.mark_of(AGENT, 0xFF000000) == "0x7000000/0xff000000"
    assert rules.mark_of(AGENT, 0x00F0) == "0x70/0xf0"
    assert rules.mark_of(BUILD, 0xFF) == "0xff/0xff"


def test_log_prefix_fits_the_kernel_limit() -> None:
    longest = Profile(name="a" * 15, uids=(5,))
    for ln in lines(render([longest], V4, nflog=False)):
        if "--log-prefix" in ln:
            prefix = ln.split('--log-prefix "')[1].split('"')[0]
            assert len(prefix) <= 29 and prefix.startswith("egressd reject ")


def test_cidrs_of_the_family_only() -> None:
    v4 = render(PROFILES, V4)
    v6 = render(PROFILES, V6)
    assert "fd00::/8" not in v4 and "2001:db8::/32" not in v4
    assert "10.0.0.0/8" not in v6 and "192.168.1.0/24" not in v6
    assert "-A EGRESSD-P-agent -d fd00::/8 -j EGRESSD-A-agent" in lines(v6)
    assert "egressd-agent-v6" not in v4 and "egressd-agent-v4" not in v6
    assert "127.0.0.1" not in v6 and "::1/128" not in v4
    assert "icmp6" not in v4 and "icmp-admin" not in v6


def test_port_grants_match_address_and_port_of_the_port_set() -> None:
    for fam, set_name in ((V4, "egressd-agent-p4"), (V6, "egressd-agent-p6")):
        text = render(PROFILES, fam)
        assert f"-A EGRESSD-P-agent -m set --match-set {set_name} dst,dst -j EGRESSD-A-agent" in (
            lines(text)
        )
        assert "multiport" not in text  # the profile's ports are applied per grant now


def test_missing_jumps_insert_at_the_top() -> None:
    text = render(PROFILES, V4, missing_jumps=ALL_JUMPS)
    assert table(text, "filter")[7] == f"-I OUTPUT 1 -j {FILTER_CHAIN}"
    assert table(text, "nat")[1] == f"-I OUTPUT 1 -j {NAT_CHAIN}"
    assert lines(text).count(f"-I OUTPUT 1 -j {FILTER_CHAIN}") == 1
    only_nat = render(PROFILES, V4, missing_jumps=(("nat", NAT_CHAIN),))
    assert f"-I OUTPUT 1 -j {FILTER_CHAIN}" not in only_nat
    assert f"-I OUTPUT 1 -j {NAT_CHAIN}" in only_nat
    assert "-I OUTPUT" not in render(PROFILES, V4)


def test_stale_jumps_are_replaced_by_one_at_the_top_in_one_transaction() -> None:
    text = render(PROFILES, V4, stale_jumps={("filter", FILTER_CHAIN): 2})
    filt = table(text, "filter")
    deletes = [i for i, ln in enumerate(filt) if ln == f"-D OUTPUT -j {FILTER_CHAIN}"]
    insert = filt.index(f"-I OUTPUT 1 -j {FILTER_CHAIN}")
    # Both copies deleted, then one inserted, all in the filter table's one transaction.
    assert len(deletes) == 2 and max(deletes) < insert
    assert "-D OUTPUT" not in "\n".join(table(text, "nat"))


def test_rule_counts_of_a_render_and_of_iptables_save_agree() -> None:
    text = render(PROFILES, V4, missing_jumps=ALL_JUMPS)
    counts = rules.rule_counts(text)
    assert set(counts) == {FILTER_CHAIN, NAT_CHAIN} | {
        f"EGRESSD-{kind}-{p.name}" for p in PROFILES for kind in "PAR"
    }
    owners = sum(len(p.uids) + len(p.uid_ranges) for p in PROFILES)
    assert counts[FILTER_CHAIN] == owners
    assert counts[NAT_CHAIN] == 2 * owners
    # OUTPUT's own rules and foreign chains are not egressd's to count.
    saved = "-A OUTPUT -j EGRESSD-OUTPUT\n-A DOCKER -j RETURN\n-A EGRESSD-DNS -j RETURN\n"
    assert rules.rule_counts(saved) == {"EGRESSD-DNS": 1}


def test_no_log_rule_without_log_rejects() -> None:
    for fam in (V4, V6):
        quiet = render(PROFILES, fam, log_rejects=False)
        assert " LOG " not in quiet and " NFLOG " not in quiet
        assert " NFLOG " in render(PROFILES, fam) and " LOG " not in render(PROFILES, fam)


def test_rejects_go_to_the_profiles_nflog_group_before_the_rejects() -> None:
    for fam in (V4, V6):
        text = render(PROFILES, fam)
        for p, group in ((AGENT, 16391), (BUILD, 16639)):
            r = chain_rules(text, rules.reject_chain(p))
            assert r[0].endswith(f"-j NFLOG --nflog-group {group}") and "-m limit" in r[0]
            assert all("REJECT" in ln for ln in r[1:]) and len(r) == 3
    assert rules.nflog_groups(PROFILES) == {16391: "agent", 16639: "build"}


def test_nflog_groups_are_16_bit_else_the_kernel_log() -> None:
    wide = Profile(name="wide", uids=(5,), mark_id=65536 - rules.NFLOG_BASE)
    widest = Profile(name="widest", uids=(6,), mark_id=65535 - rules.NFLOG_BASE)
    assert rules.nflog_group(wide) is None
    assert rules.nflog_group(widest) == 65535
    assert rules.nflog_groups([wide, widest]) == {65535: "widest"}
    text = render([wide, widest], V4)
    assert chain_rules(text, "EGRESSD-R-wide")[0].startswith(
        "-A EGRESSD-R-wide -m limit --limit 10/second --limit-burst 20 -j LOG --log-prefix"
    )
    assert chain_rules(text, "EGRESSD-R-widest")[0].endswith("-j NFLOG --nflog-group 65535")


def test_without_nflog_the_kernel_log_as_before() -> None:
    log = '-m limit --limit 10/second --limit-burst 20 -j LOG --log-prefix "egressd reject'
    r = chain_rules(render(PROFILES, V4, nflog=False), "EGRESSD-R-agent")
    assert r[0] == f'-A EGRESSD-R-agent {log} agent: " --log-uid'
    assert " NFLOG " not in render(PROFILES, V4, nflog=False)


def test_no_profiles() -> None:
    text = render((), V4)
    assert text == (
        f"*filter\n:{FILTER_CHAIN} - [0:0]\nCOMMIT\n*nat\n:{NAT_CHAIN} - [0:0]\nCOMMIT\n"
    )


def test_chains() -> None:
    assert chains(PROFILES) == {
        "filter": {FILTER_CHAIN}
        | {f"EGRESSD-{kind}-{name}" for kind in "PAR" for name in ("agent", "build")},
        "nat": {NAT_CHAIN},
    }
    assert chains(()) == {"filter": {FILTER_CHAIN}, "nat": {NAT_CHAIN}}
    assert profile_chain(AGENT) == "EGRESSD-P-agent"
    assert JUMPS == (("filter", FILTER_CHAIN), ("nat", NAT_CHAIN))
    # every chain name fits iptables' 28-character limit for the longest profile name
    longest = Profile(name="a" * 15, uids=(5,))
    assert all(len(c) <= 28 for c in chains([longest])["filter"])
    assert all(
        name.startswith(rules.CHAIN_PREFIX) for t in chains([longest]).values() for name in t
    )


def test_every_declared_chain_is_in_chains() -> None:
    for fam in (V4, V6):
        text = render(PROFILES, fam)
        declared = {ln[1:].split()[0] for ln in lines(text) if ln.startswith(":")}
        assert declared == chains(PROFILES)["filter"] | chains(PROFILES)["nat"]


@pytest.mark.parametrize("fam", [V4, V6])
def test_lock_rejects_every_owner_of_every_profile(fam: Family) -> None:
    text = rules.render_lock(PROFILES, fam, add_jump=True)
    assert lines(text)[:2] == ["*filter", f":{FILTER_CHAIN} - [0:0]"]
    assert lines(text)[-2:] == [f"-I OUTPUT 1 -j {FILTER_CHAIN}", "COMMIT"]
    assert "*nat" not in text
    rejects = [ln for ln in lines(text) if ln.startswith("-A")]
    owners = ["1000", "1001", "100000-165535", "1002"]
    assert rejects == [
        f"-A {FILTER_CHAIN} {rest}"
        for o in owners
        for rest in (
            f"-p tcp -m owner --uid-owner {o} -j REJECT --reject-with tcp-reset",
            f"-m owner --uid-owner {o} -j REJECT --reject-with {fam.reject}",
        )
    ]
    assert "-I OUTPUT" not in rules.render_lock(PROFILES, fam, add_jump=False)


def test_restricted_state_lists_uids_and_ranges() -> None:
    text = rules.restricted(PROFILES)
    assert [ln for ln in lines(text) if not ln.startswith("#")] == [
        "1000",
        "1001",
        "100000-165535",
        "1002",
    ]
