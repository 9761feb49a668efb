"""Blocked connections, attributed: the reject chain's NFLOG read back by egressd, one
journal record per blocked connection with uid, profile, destination, port, protocol and
what egressd knows of the address (issue 8). The real daemon, iptables and a private
journald in the lab's namespaces (see lab.py)."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import pytest
from lab import Lab, poll
from test_egressd import AGENT, OTHER, start, write_config

from egressd.config import DEFAULT_CT_MASK, default_mark_id, mark_ids
from egressd.firewall import rules

pytestmark = pytest.mark.netns

BLOCKED_ID = "1a7aa55f80fe4e08b2acaedf958be9ea"  # events.ConnectionBlocked.MESSAGE_ID
RELOADED_ID = "31a9cbc6ae2445239609e229566cf0ad"  # events.Reloaded.MESSAGE_ID
NEVER = "never resolved through egressd"

RECORDS = {
    "ok.test.": [["A", "203.0.113.10", 300], ["AAAA", "2001:db8:113::10", 300]],
    "api.test.": [["A", "203.0.113.20", 300]],
    "short.test.": [["A", "203.0.113.30", 1]],
    "blocked.test.": [["A", "203.0.113.66", 300], ["AAAA", "2001:db8:113::66", 300]],
}


def blocked_records(lab: Lab, destination: str, count: int = 1) -> list[dict[str, Any]]:
    return lab.journal_wait(
        f"MESSAGE_ID={BLOCKED_ID}", f"EGRESSD_DESTINATION={destination}", count=count
    )


def only_record(lab: Lab, destination: str) -> dict[str, Any]:
    records = blocked_records(lab, destination)
    assert records, f"no ConnectionBlocked record for {destination}"
    time.sleep(0.5)  # a second record for the same connection would be there by now
    records = lab.journal_query(f"MESSAGE_ID={BLOCKED_ID}", f"EGRESSD_DESTINATION={destination}")
    assert len(records) == 1, records
    return records[0]


def assert_record(
    rec: dict[str, Any], destination: str, port: int, protocol: str, known: str
) -> None:
    assert rec["EGRESSD_PROFILE"] == "agent"
    assert rec["EGRESSD_UID"] == str(AGENT)
    assert rec["EGRESSD_DESTINATION"] == destination
    assert rec["EGRESSD_PORT"] == str(port)
    assert rec["EGRESSD_PROTOCOL"] == protocol
    assert rec["EGRESSD_KNOWN"].startswith(known), rec["EGRESSD_KNOWN"]
    assert rec["SYSLOG_IDENTIFIER"] == "egressd"
    assert rec["PRIORITY"] == "5"
    assert f"from uid {AGENT} (profile agent) to " in rec["MESSAGE"]


def test_hard_coded_address_is_never_resolved_through_egressd(lab: Lab) -> None:
    lab.dns.set(RECORDS)
    start(lab, write_config(lab, ["ok.test"]), journald=True)

    # Positive twin first: an allowed name's address on its port works, and logs nothing.
    assert lab.agent("resolve", "ok.test", "any")["ok"]
    assert lab.agent("connect", "203.0.113.10", 80)["ok"]
    assert lab.agent("connect", "2001:db8:113::10", 443)["ok"]
    # The hard-coded addresses are reachable: another uid gets through to them.
    assert lab.agent("connect", "203.0.113.50", 80, uid=OTHER)["ok"]

    r = lab.agent("connect", "203.0.113.50", 80)
    assert not r["ok"] and r["errname"] == "ECONNREFUSED", r
    rec = only_record(lab, "203.0.113.50")
    assert_record(rec, "203.0.113.50", 80, "tcp", NEVER)
    assert rec["EGRESSD_KNOWN"] == NEVER and "EGRESSD_NAMES" not in rec
    assert rec["MESSAGE"] == (
        f"blocked tcp connection from uid {AGENT} (profile agent) to 203.0.113.50:80: {NEVER}"
    )

    assert not lab.agent("connect", "2001:db8:113::50", 443)["ok"]
    assert_record(only_record(lab, "2001:db8:113::50"), "2001:db8:113::50", 443, "tcp", NEVER)

    # The allowed connections left no record (the observation above works).
    for ip in ("203.0.113.10", "2001:db8:113::10"):
        assert lab.journal_query(f"MESSAGE_ID={BLOCKED_ID}", f"EGRESSD_DESTINATION={ip}") == []
    # Another uid's connection is not the agent's: no record either.
    assert lab.journal_query(f"MESSAGE_ID={BLOCKED_ID}", f"EGRESSD_UID={OTHER}") == []


def test_address_of_a_blocked_name_is_attributed_without_resolving_it(lab: Lab) -> None:
    lab.dns.set(RECORDS)
    start(lab, write_config(lab, ["ok.test"]), journald=True)

    assert lab.agent("resolve", "blocked.test", "4")["gaierror"] == "EAI_NONAME"
    assert lab.journal_wait("EGRESSD_QNAME=blocked.test"), "the blocked query was not logged"
    # The agent knows the address anyway (a cache, a hard-coded list) and connects.
    assert not lab.agent("connect", "203.0.113.66", 443)["ok"]
    rec = only_record(lab, "203.0.113.66")
    assert_record(rec, "203.0.113.66", 443, "tcp", NEVER)

    # Attribution asked nobody: the upstream never saw the blocked name...
    assert lab.dns.queries(qname="blocked.test.") == []
    # ...while it does see the names egressd resolves (the log works).
    assert lab.agent("resolve", "ok.test", "4")["ok"]
    assert lab.dns.wait_query(qname="ok.test.")
    assert lab.dns.queries(qname="blocked.test.") == []


def test_port_not_on_the_line_names_the_name(lab: Lab) -> None:
    lab.dns.set(RECORDS)
    start(lab, write_config(lab, ["api.test ports=443"]), journald=True)

    assert lab.agent("resolve", "api.test", "4")["addrs"] == ["203.0.113.20"]
    assert lab.agent("connect", "203.0.113.20", 443)["ok"]  # the line's port: fine
    r = lab.agent("connect", "203.0.113.20", 8080)
    assert not r["ok"] and r["errname"] == "ECONNREFUSED", r
    rec = only_record(lab, "203.0.113.20")
    assert_record(rec, "203.0.113.20", 8080, "tcp", "resolved from api.test for ")
    assert rec["EGRESSD_KNOWN"].endswith(
        "on ports 443 only: port 8080 is not on the line's ports (443)"
    )
    assert rec["EGRESSD_NAMES"] == "api.test"
    # Only the connection to 8080 was logged: the one to 443 went through.
    assert lab.journal_query(f"MESSAGE_ID={BLOCKED_ID}", "EGRESSD_PORT=443") == []


def test_udp_and_an_expired_grant(lab: Lab) -> None:
    lab.dns.set(RECORDS)
    config = write_config(
        lab, ["ok.test", "short.test"], grants="floor = 1\nceiling = 1\ngrace = 0"
    )
    start(lab, config, journald=True)

    assert lab.agent("resolve", "ok.test", "4")["ok"]
    assert lab.agent("udp", "203.0.113.10", 9999)["ok"]  # allowed: echoed, no record
    r = lab.agent("udp", "203.0.113.77", 9999, 2)
    assert not r["ok"], r
    assert_record(only_record(lab, "203.0.113.77"), "203.0.113.77", 9999, "udp", NEVER)

    # A grant that ran out: the agent connects with an address it resolved earlier.
    assert lab.agent("resolve", "short.test", "4")["addrs"] == ["203.0.113.30"]
    time.sleep(2.5)
    assert not lab.agent("connect", "203.0.113.30", 80)["ok"]
    rec = only_record(lab, "203.0.113.30")
    assert_record(rec, "203.0.113.30", 80, "tcp", "resolved from short.test, but the grant")
    assert " expired " in rec["EGRESSD_KNOWN"] and rec["EGRESSD_NAMES"] == "short.test"
    assert lab.journal_query(f"MESSAGE_ID={BLOCKED_ID}", "EGRESSD_DESTINATION=203.0.113.10") == []


BLOCKER = """
import socket, sys, time
from egressd.firewall import nflog
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nflog.NETLINK_NETFILTER)
s.bind((0, 0))
s.send(nflog.config_message(int(sys.argv[1]), nflog.NFULNL_CFG_CMD_BIND, 1))
print("bound", list(nflog.parse(s.recv(65536))), flush=True)
while True:
    for msg in nflog.parse(s.recv(65536)):
        if isinstance(msg, nflog.Blocked):
            print("got", msg.destination, msg.port, flush=True)
"""


def test_a_group_taken_by_another_program_is_one_error_and_still_blocks(lab: Lab) -> None:
    lab.dns.set(RECORDS)
    group = rules.NFLOG_BASE + default_mark_id("agent", mark_ids(DEFAULT_CT_MASK))
    blocker = lab.start_process([sys.executable, "-c", BLOCKER, str(group)], name="blocker")
    assert poll(lambda: "bound [Ack(seq=1, error=0)]" in blocker.stdout_text(), 10)
    start(lab, write_config(lab, ["ok.test"]), journald=True)

    errors = lab.journal_wait("EGRESSD_WHERE=blocked connections")
    assert len(errors) == 1, errors
    assert (
        "another program has bound it" in errors[0]["EGRESSD_ERROR"]
        and str(group) in errors[0]["EGRESSD_ERROR"]
    )
    assert errors[0]["EGRESSD_ERROR"].endswith("blocked connections are not attributed")

    # Still enforcing and serving: the connection is rejected (the other program's copy
    # of the group shows the packet was logged), the allowed name works.
    assert not lab.agent("connect", "203.0.113.50", 80)["ok"]
    assert poll(lambda: "got 203.0.113.50 80" in blocker.stdout_text(), 10)
    assert lab.agent("resolve", "ok.test", "4")["ok"]
    assert lab.agent("connect", "203.0.113.10", 80)["ok"]
    assert lab.journal_query(f"MESSAGE_ID={BLOCKED_ID}") == []


def test_a_profile_added_by_a_reload_is_attributed(lab: Lab) -> None:
    lab.dns.set(RECORDS)
    config = write_config(lab, ["ok.test"])
    d = start(lab, config, journald=True)
    # Before the reload, OTHER is nobody's user: it gets through, and nothing is logged.
    assert lab.agent("connect", "203.0.113.51", 80, uid=OTHER)["ok"]

    other_list = lab.tmpdir / "build.allow.txt"
    other_list.write_text("api.test\n", encoding="utf-8")
    with config.open("a", encoding="utf-8") as fh:
        fh.write(f'\n[profiles.build]\nusers = [{OTHER}]\nallowlists = ["{other_list.name}"]\n')
        fh.write("port = 154\n")
    d.signal(signal.SIGHUP)
    assert lab.journal_wait("MESSAGE_ID=" + RELOADED_ID), "no reload"

    # The new profile's group is bound: its user's blocked connection is attributed, to
    # it, with the agent profile's name for the address when the agent resolved it.
    assert lab.agent("resolve", "ok.test", "4")["ok"]
    assert not lab.agent("connect", "203.0.113.10", 80, uid=OTHER)["ok"]
    rec = only_record(lab, "203.0.113.10")
    assert (rec["EGRESSD_PROFILE"], rec["EGRESSD_UID"]) == ("build", str(OTHER))
    assert rec["EGRESSD_KNOWN"] == (
        "resolved from ok.test for profile agent only (live); never granted to profile build"
    )
    # ...and the agent's still is, to its own profile.
    assert not lab.agent("connect", "203.0.113.51", 80)["ok"]
    assert_record(only_record(lab, "203.0.113.51"), "203.0.113.51", 80, "tcp", NEVER)
