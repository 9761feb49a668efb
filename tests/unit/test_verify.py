"""verify's comparisons (egressd.firewall.iptables_ipset): printed rules against the
snapshot the last apply left, and the jump-first check."""

from __future__ import annotations

import asyncio

import pytest

from egressd.config import Config, DaemonSettings, GrantSettings, Profile, Upstream
from egressd.firewall.iptables_ipset import IptablesIpset, drift, jump_problems, own_rules
from egressd.policy import Policy

SAVED = """\
-P INPUT ACCEPT
-P FORWARD ACCEPT
-P OUTPUT ACCEPT
-N EGRESSD-OUTPUT
-N EGRESSD-P-agent
-N FOREIGN
-A OUTPUT -j EGRESSD-OUTPUT
-A OUTPUT -p tcp -m tcp --dport 9 -j DROP
-A OUTPUT -j FOREIGN
-A EGRESSD-OUTPUT -m owner --uid-owner 64123 -j EGRESSD-P-agent
-A EGRESSD-P-agent -m set --match-set egressd-agent-v4 dst -j ACCEPT
-A EGRESSD-P-agent -p tcp -j REJECT --reject-with tcp-reset
-A EGRESSD-P-agent -j REJECT --reject-with icmp-admin-prohibited
-A FOREIGN -j ACCEPT
"""


def test_own_rules_are_egressds_chains_rules_and_the_jumps_into_them() -> None:
    assert own_rules(SAVED) == (
        "-N EGRESSD-OUTPUT",
        "-N EGRESSD-P-agent",
        "-A OUTPUT -j EGRESSD-OUTPUT",
        "-A EGRESSD-OUTPUT -m owner --uid-owner 64123 -j EGRESSD-P-agent",
        "-A EGRESSD-P-agent -m set --match-set egressd-agent-v4 dst -j ACCEPT",
        "-A EGRESSD-P-agent -p tcp -j REJECT --reject-with tcp-reset",
        "-A EGRESSD-P-agent -j REJECT --reject-with icmp-admin-prohibited",
    )


def test_same_content_no_drift_and_foreign_changes_do_not_count() -> None:
    before = own_rules(SAVED)
    assert drift("IPv4 filter", before, before) == []
    foreign = SAVED.replace("-A FOREIGN -j ACCEPT", "-A FOREIGN -j DROP") + "-A OUTPUT -j LOG\n"
    assert drift("IPv4 filter", before, own_rules(foreign)) == []


def test_a_rule_replaced_in_place_same_count_is_drift() -> None:
    before = own_rules(SAVED)
    after = own_rules(
        SAVED.replace(
            "-A EGRESSD-P-agent -p tcp -j REJECT --reject-with tcp-reset",
            "-A EGRESSD-P-agent -p tcp -j ACCEPT",
        )
    )
    assert len(after) == len(before)
    assert drift("IPv4 filter", before, after) == [
        "IPv4 filter chain EGRESSD-P-agent: 1 rule(s) missing "
        "(-A EGRESSD-P-agent -p tcp -j REJECT --reject-with tcp-reset), "
        "1 unexpected (-A EGRESSD-P-agent -p tcp -j ACCEPT)"
    ]


def test_reordered_rules_are_drift() -> None:
    lines = SAVED.splitlines()
    i = lines.index("-A EGRESSD-P-agent -m set --match-set egressd-agent-v4 dst -j ACCEPT")
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    assert drift("IPv4 filter", own_rules(SAVED), own_rules("\n".join(lines))) == [
        "IPv4 filter chain EGRESSD-P-agent: rules reordered"
    ]


def test_a_flushed_ruleset_says_which_chains_are_gone() -> None:
    after = own_rules("-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n")
    assert drift("IPv4 filter", own_rules(SAVED), after) == [
        "IPv4 filter chain EGRESSD-OUTPUT missing",
        "IPv4 filter chain EGRESSD-P-agent missing",
        "IPv4 filter chain OUTPUT: 1 rule(s) missing (-A OUTPUT -j EGRESSD-OUTPUT)",
    ]


def test_a_foreign_rule_inside_egressds_chain_is_drift() -> None:
    after = SAVED.replace(
        "-A EGRESSD-OUTPUT -m owner",
        "-A EGRESSD-OUTPUT -j ACCEPT\n-A EGRESSD-OUTPUT -m owner",
    )
    assert drift("IPv4 filter", own_rules(SAVED), own_rules(after)) == [
        "IPv4 filter chain EGRESSD-OUTPUT: 1 unexpected (-A EGRESSD-OUTPUT -j ACCEPT)"
    ]


def test_the_jump_must_be_first_and_unique() -> None:
    assert jump_problems("IPv4 filter", "EGRESSD-OUTPUT", SAVED) == []
    above = SAVED.replace(
        "-A OUTPUT -j EGRESSD-OUTPUT", "-A OUTPUT -j ACCEPT\n-A OUTPUT -j EGRESSD-OUTPUT"
    )
    assert jump_problems("IPv4 filter", "EGRESSD-OUTPUT", above) == [
        "IPv4 filter OUTPUT jump to EGRESSD-OUTPUT not first"
    ]
    twice = SAVED + "-A OUTPUT -j EGRESSD-OUTPUT\n"
    assert jump_problems("IPv4 filter", "EGRESSD-OUTPUT", twice) == [
        "IPv4 filter OUTPUT jump to EGRESSD-OUTPUT not first"
    ]
    gone = SAVED.replace("-A OUTPUT -j EGRESSD-OUTPUT\n", "")
    assert jump_problems("IPv4 filter", "EGRESSD-OUTPUT", gone) == [
        "IPv4 filter OUTPUT jump to EGRESSD-OUTPUT missing"
    ]


def test_a_set_destroyed_while_a_repair_runs_is_reported_re_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`iptables -F` then `ipset destroy`: the set can go between verify's check (present)
    and the install that repairs the rules (which creates it again, empty). The daemon
    writes grants again only for a "set ..." problem, so verify must say so."""
    fw = IptablesIpset()
    fw.families = (4,)
    policy = Policy(
        Config(
            path="x",
            daemon=DaemonSettings(upstreams=(Upstream("192.0.2.53"),)),
            grants=GrantSettings(),
            profiles=(Profile(name="agent", uids=(1000,), port=153),),
        )
    )
    names = ["egressd-agent-v4", "egressd-agent-v6", "egressd-agent-p4", "egressd-agent-p6"]
    destroyed: list[str] = []

    async def rule_problems(policy: Policy, family: int) -> list[str]:
        return ["IPv4 filter chain EGRESSD-P-agent: 13 rule(s) missing"]

    async def set_names() -> list[str]:
        return names  # all there when verify looks

    async def inspect(name: str, family: int) -> None:
        return None  # ...and one gone when the install looks (the others: see below)

    async def create(name: str, stype: str, family: int, maxelem: int) -> None:
        destroyed.append(name)

    async def rest(*args: object, **kwargs: object) -> dict[int, object]:
        return {}

    monkeypatch.setattr(fw, "_rule_problems", rule_problems)
    monkeypatch.setattr(fw, "_set_names", set_names)
    monkeypatch.setattr(fw, "_inspect", inspect)
    monkeypatch.setattr(fw, "_create", create)
    monkeypatch.setattr(fw, "_lock_unguarded", rest)
    monkeypatch.setattr(fw, "_apply", rest)
    problems = asyncio.run(fw.verify(policy, sets=False))
    assert destroyed == names  # the install created them (the fake says none was there)
    assert problems[0].startswith("IPv4 filter chain")
    assert problems[1:] == [f"set {n} re-created" for n in names]

    # Positive twin: nothing created, nothing said about sets.
    async def present(
        name: str, family: int
    ) -> tuple[tuple[str, int, int, bool, bool], list[object]]:
        stype = "hash:ip,port" if name.endswith(("p4", "p6")) else "hash:ip"
        fam = 10 if name.endswith("6") else 2
        return (stype, fam, GrantSettings().maxelem, True, True), []

    monkeypatch.setattr(fw, "_inspect", present)
    assert asyncio.run(fw.verify(policy, sets=False)) == [
        "IPv4 filter chain EGRESSD-P-agent: 13 rule(s) missing"
    ]
