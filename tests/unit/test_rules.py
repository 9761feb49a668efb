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
    MULTIPORT_MAX,
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
)
BUILD = Profile(
    name="build",
    uids=(1002,),
    port=154,
    cidrs=(ipaddress.ip_network("2001:db8::/32"),),
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
    assert table(text, "filter")[:3] == [
        f":{FILTER_CHAIN} - [0:0]",
        ":EGRESSD-P-agent - [0:0]",
        ":EGRESSD-P-build - [0:0]",
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
    for uid, port in ((1000, 153), (1001, 153), (1002, 154)):
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
        f"-A {FILTER_CHAIN} -m owner --uid-owner 1002 -j EGRESSD-P-build",
    ]


def chain_rules(text: str, chain: str) -> list[str]:
    return [ln for ln in table(text, "filter") if ln.startswith(f"-A {chain} ")]


def test_agent_chain_v4_order() -> None:
    r = chain_rules(render(PROFILES, V4), "EGRESSD-P-agent")
    c = "-A EGRESSD-P-agent"
    set4 = "-m set --match-set egressd-agent-v4 dst -j ACCEPT"
    log = '-m limit --limit 10/second --limit-burst 20 -j LOG --log-prefix "egressd reject'
    first = ",".join(map(str, AGENT_PORTS[:15]))
    rest = ",".join(map(str, AGENT_PORTS[15:]))
    assert r == [
        f"{c} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"{c} -d 127.0.0.1/32 -p udp -m udp --dport 153 -j ACCEPT",
        f"{c} -d 127.0.0.1/32 -p tcp -m tcp --dport 153 -j ACCEPT",
        f"{c} -o lo -j ACCEPT",
        f"{c} -p tcp -m multiport --dports {first} {set4}",
        f"{c} -p tcp -m multiport --dports {rest} {set4}",
        f"{c} -p udp -m multiport --dports {first} {set4}",
        f"{c} -p udp -m multiport --dports {rest} {set4}",
        f"{c} -d 10.0.0.0/8 -j ACCEPT",
        f"{c} -d 192.168.1.0/24 -j ACCEPT",
        f'{c} {log} agent: " --log-uid',
        f"{c} -p tcp -j REJECT --reject-with tcp-reset",
        f"{c} -j REJECT --reject-with icmp-admin-prohibited",
    ]


def test_build_chain_v6_order() -> None:
    r = chain_rules(render(PROFILES, V6), "EGRESSD-P-build")
    c = "-A EGRESSD-P-build"
    log = '-m limit --limit 10/second --limit-burst 20 -j LOG --log-prefix "egressd reject'
    assert r == [
        f"{c} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"{c} -d ::1/128 -p udp -m udp --dport 154 -j ACCEPT",
        f"{c} -d ::1/128 -p tcp -m tcp --dport 154 -j ACCEPT",
        f"{c} -m set --match-set egressd-build-v6 dst -j ACCEPT",
        f"{c} -d 2001:db8::/32 -j ACCEPT",
        f'{c} {log} build: " --log-uid',
        f"{c} -p tcp -j REJECT --reject-with tcp-reset",
        f"{c} -j REJECT --reject-with icmp6-adm-prohibited",
    ]


def test_cidrs_of_the_family_only() -> None:
    v4 = render(PROFILES, V4)
    v6 = render(PROFILES, V6)
    assert "fd00::/8" not in v4 and "2001:db8::/32" not in v4
    assert "10.0.0.0/8" not in v6 and "192.168.1.0/24" not in v6
    assert "-A EGRESSD-P-agent -d fd00::/8 -j ACCEPT" in lines(v6)
    assert "egressd-agent-v6" not in v4 and "egressd-agent-v4" not in v6
    assert "127.0.0.1" not in v6 and "::1/128" not in v4
    assert "icmp6" not in v4 and "icmp-admin" not in v6


def test_multiport_chunks_never_exceed_the_limit() -> None:
    many = Profile(name="many", uids=(5,), ports=tuple(range(1000, 1031)))  # 31 ports
    text = render([many], V4)
    dports = [ln.split("--dports ")[1].split()[0] for ln in lines(text) if "--dports" in ln]
    assert len(dports) == 6  # 3 chunks x tcp, udp
    for chunk in dports:
        assert 1 <= len(chunk.split(",")) <= MULTIPORT_MAX
    assert sorted(int(p) for c in dports[:3] for p in c.split(",")) == list(range(1000, 1031))
    exactly = Profile(name="fifteen", uids=(5,), ports=tuple(range(1, 16)))
    assert sum("--dports" in ln for ln in lines(render([exactly], V4))) == 2


def test_missing_jumps_insert_at_the_top() -> None:
    text = render(PROFILES, V4, missing_jumps=ALL_JUMPS)
    assert table(text, "filter")[3] == f"-I OUTPUT 1 -j {FILTER_CHAIN}"
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
    assert set(counts) == {FILTER_CHAIN, NAT_CHAIN, *(f"EGRESSD-P-{p.name}" for p in PROFILES)}
    assert counts[FILTER_CHAIN] == sum(len(p.uids) for p in PROFILES)
    assert counts[NAT_CHAIN] == 2 * sum(len(p.uids) for p in PROFILES)
    # OUTPUT's own rules and foreign chains are not egressd's to count.
    saved = "-A OUTPUT -j EGRESSD-OUTPUT\n-A DOCKER -j RETURN\n-A EGRESSD-DNS -j RETURN\n"
    assert rules.rule_counts(saved) == {"EGRESSD-DNS": 1}


def test_no_log_rule_without_log_rejects() -> None:
    assert " LOG " not in render(PROFILES, V4, log_rejects=False)
    assert " LOG " in render(PROFILES, V4)


def test_no_profiles() -> None:
    text = render((), V4)
    assert text == (
        f"*filter\n:{FILTER_CHAIN} - [0:0]\nCOMMIT\n*nat\n:{NAT_CHAIN} - [0:0]\nCOMMIT\n"
    )


def test_chains() -> None:
    assert chains(PROFILES) == {
        "filter": {FILTER_CHAIN, "EGRESSD-P-agent", "EGRESSD-P-build"},
        "nat": {NAT_CHAIN},
    }
    assert chains(()) == {"filter": {FILTER_CHAIN}, "nat": {NAT_CHAIN}}
    assert profile_chain(AGENT) == "EGRESSD-P-agent"
    assert JUMPS == (("filter", FILTER_CHAIN), ("nat", NAT_CHAIN))
    # every chain name fits iptables' 28-character limit for the longest profile name
    longest = Profile(name="a" * 15, uids=(5,))
    assert len(profile_chain(longest)) <= 28
    assert all(
        name.startswith(rules.CHAIN_PREFIX) for t in chains([longest]).values() for name in t
    )


def test_every_declared_chain_is_in_chains() -> None:
    for fam in (V4, V6):
        text = render(PROFILES, fam)
        declared = {ln[1:].split()[0] for ln in lines(text) if ln.startswith(":")}
        assert declared == chains(PROFILES)["filter"] | chains(PROFILES)["nat"]
