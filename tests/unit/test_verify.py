"""verify's comparisons (egressd.firewall.iptables_ipset): printed rules against the
snapshot the last apply left, and the jump-first check."""

from __future__ import annotations

from egressd.firewall.iptables_ipset import drift, jump_problems, own_rules

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
