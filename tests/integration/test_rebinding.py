"""The rebinding guard end to end: allowed names that answer with loopback, RFC 1918, cloud
metadata, ULA, IPv4-mapped and the host's own addresses get none of them granted, and each
removal is logged; `private_answers` (a CIDR, a name pattern) and `--allow-private` make
exactly their addresses reachable.

The "internal" targets are real: the inet namespace owns 10.77.0.0/16, 169.254.169.254 and
fd77::/64 (AnyIP local routes) and the host namespace routes them there, so the echo server
(bound to the wildcard address) answers on them. Root in the host namespace reaching them
is the positive twin of every "the agent cannot".
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from lab import HOST_V4, HOST_V6, INET_V4, INET_V6, ROGUE_V4, Lab
from test_egressd import AGENT, events, ipset_members, start, write_config

pytestmark = pytest.mark.netns

SET4 = "egressd-agent-v4"
SET6 = "egressd-agent-v6"
INTERNAL_V4 = ("10.77.0.0/16", "169.254.169.254/32")
INTERNAL_V6 = ("fd77::/64",)

# name -> (type, address): every one of these must be removed from the answer.
BAD: dict[str, tuple[str, str]] = {
    "lo.test.": ("A", "127.0.0.1"),
    "rfc1918.test.": ("A", "10.77.0.5"),
    "meta.test.": ("A", "169.254.169.254"),
    "lo6.test.": ("AAAA", "::1"),
    "mapped.test.": ("AAAA", "::ffff:10.77.0.5"),
    "ula.test.": ("AAAA", "fd77::5"),
    "own4.test.": ("A", HOST_V4),
    "own6.test.": ("AAAA", HOST_V6),
}
# Addresses the lab routes to the echo server: the agent must not reach them, root does.
ROUTED = ("10.77.0.5", "169.254.169.254", "fd77::5", "::ffff:10.77.0.5")


def route_internal(lab: Lab) -> None:
    """Make the 'internal' ranges real: local in inet, routed there from the host."""
    for cidr in INTERNAL_V4:
        lab.netns_exec("inet", ["ip", "route", "add", "local", cidr, "dev", "lo"])
        lab.netns_exec("host", ["ip", "route", "add", cidr, "via", INET_V4])
    for cidr in INTERNAL_V6:
        lab.netns_exec("inet", ["ip", "-6", "route", "add", "local", cidr, "dev", "lo"])
        lab.netns_exec("host", ["ip", "-6", "route", "add", cidr, "via", INET_V6])


def root_connect(lab: Lab, ip: str, port: int = 80) -> bool:
    """Root in the host ns (not restricted): the positive twin that the target answers."""
    code = (
        "import socket,sys\n"
        f"s = socket.create_connection(({ip!r}, {port}), timeout=5)\n"
        "s.sendall(b'ping\\n'); sys.exit(0 if s.recv(5) == b'ping\\n' else 1)\n"
    )
    return lab.netns_exec("host", ["python3", "-c", code], check=False).returncode == 0


def ask(lab: Lab, name: str, qtype: str) -> dict[str, Any]:
    r = lab.agent("dnsq", ROGUE_V4, 53, name, qtype, "udp")  # redirected to egressd
    assert r.get("rcode"), r
    return r


def answered(r: dict[str, Any]) -> list[str]:
    return [a[2] for a in r["answers"] if a[1] in ("A", "AAAA")]


def refused(lab: Lab, ip: str) -> None:
    c = lab.agent("connect", ip, 80, 5)
    assert not c["ok"] and c["error"] in ("refused", "reset", "unreachable"), (ip, c)


def test_private_and_own_addresses_are_never_granted_and_each_is_logged(lab: Lab) -> None:
    route_internal(lab)
    # dnslib (the fake DNS) parses no dotted tail in AAAA: give it the exploded form.
    records: dict[str, Any] = {
        name: [[t, ipaddress.ip_address(ip).exploded, 300]] for name, (t, ip) in BAD.items()
    }
    records["mixed.test."] = [
        ["A", "203.0.113.30", 300],
        ["A", "10.77.0.5", 300],
        ["AAAA", "2001:db8:113::30", 300],
        ["AAAA", "fd77::5", 300],
    ]
    records["chain.test."] = [["CNAME", "meta.test.", 300]]
    lab.dns.set(records)
    d = start(lab, write_config(lab, ["**.test"]))

    for name, (qtype, _ip) in BAD.items():
        r = ask(lab, name, qtype)
        assert r["rcode"] == "NOERROR" and r["answers"] == [], (name, r)
    r = ask(lab, "chain.test", "A")  # through a CNAME: the same
    assert r["rcode"] == "NOERROR" and r["answers"] == [], r
    r = lab.agent("resolve", "meta.test", "4")
    assert not r["ok"] and "169.254.169.254" not in r["addrs"], r

    # The mixed answer keeps (and grants) its public addresses only.
    r4, r6 = ask(lab, "mixed.test", "A"), ask(lab, "mixed.test", "AAAA")
    assert answered(r4) == ["203.0.113.30"] and answered(r6) == ["2001:db8:113::30"], (r4, r6)
    assert lab.agent("connect", "203.0.113.30", 80)["ok"]
    assert lab.agent("connect", "2001:db8:113::30", 80)["ok"]

    members = {**ipset_members(lab, SET4), **ipset_members(lab, SET6)}
    assert set(members) == {"203.0.113.30", "2001:db8:113::30"}, members
    for _, ip in BAD.values():
        assert ip not in members

    # The agent is rejected, and nothing reached the targets; then root reaches every one
    # of them (so they are there, and the echo log would have shown the agent's attempt).
    for ip in ROUTED:
        refused(lab, ip)
    internal = {"10.77.0.5", "169.254.169.254", "fd77::5"}
    reached = [c for c in lab.echo.connections(event="accept") if c["dst"] in internal]
    assert reached == []
    for ip in ROUTED:
        assert root_connect(lab, ip), f"root cannot reach {ip}: the lab routes are broken"
    assert {c["dst"] for c in lab.echo.connections(event="accept")} >= internal

    logged = {e["EGRESSD_QNAME"]: e for e in events(d, "AnswerFiltered")}
    for name, (qtype, ip) in BAD.items():
        e = logged[name.rstrip(".")]
        assert e["EGRESSD_DROPPED"] == ip and e["EGRESSD_QTYPE"] == qtype, e
        assert e["EGRESSD_KEPT"] == "0" and e["EGRESSD_PROFILE"] == "agent", e
    assert logged["own4.test"]["EGRESSD_RULES"] == "own-address"
    assert logged["meta.test"]["EGRESSD_RULES"] == "169.254.0.0/16"
    assert logged["mapped.test"]["EGRESSD_RULES"] == "10.0.0.0/8 via ::ffff:0:0/96"
    assert logged["chain.test"]["EGRESSD_DROPPED"] == "169.254.169.254"
    mixed = [e for e in events(d, "AnswerFiltered") if e["EGRESSD_QNAME"] == "mixed.test"]
    assert {e["EGRESSD_DROPPED"] for e in mixed} == {"10.77.0.5", "fd77::5"}
    assert {e["EGRESSD_KEPT"] for e in mixed} == {"1"}


def test_private_answers_exceptions_make_exactly_their_addresses_reachable(lab: Lab) -> None:
    route_internal(lab)
    lab.dns.set(
        {
            "rfc1918.test.": [["A", "10.77.0.5", 300]],  # in the CIDR exception
            "app.corp.test.": [["A", "10.77.1.5", 300]],  # by the name exception
            "lo.corp.test.": [["A", "127.0.0.1", 300], ["A", "10.77.1.7", 300]],
            "other.test.": [["A", "10.77.1.6", 300]],  # neither
            "meta.test.": [["A", "169.254.169.254", 300]],
        }
    )
    cfg = write_config(
        lab,
        ["**.test"],
        profile='private_answers = ["10.77.0.0/24", "**.corp.test"]',
        daemon='rebind_rcode = "nxdomain"',
    )
    d = start(lab, cfg)

    assert answered(ask(lab, "rfc1918.test", "A")) == ["10.77.0.5"]
    assert answered(ask(lab, "app.corp.test", "A")) == ["10.77.1.5"]
    # a name exception does not lift loopback
    assert answered(ask(lab, "lo.corp.test", "A")) == ["10.77.1.7"]
    for name in ("other.test", "meta.test"):
        r = ask(lab, name, "A")
        assert r["rcode"] == "NXDOMAIN" and r["answers"] == [], r  # rebind_rcode

    members = ipset_members(lab, SET4)
    assert set(members) == {"10.77.0.5", "10.77.1.5", "10.77.1.7"}, members
    for ip in ("10.77.0.5", "10.77.1.5"):
        c = lab.agent("connect", ip, 80)
        assert c["ok"], (ip, c)
    assert lab.echo.connections(dst="10.77.1.5")
    for ip in ("10.77.1.6", "169.254.169.254"):
        assert root_connect(lab, ip)
        refused(lab, ip)
    dropped = {e["EGRESSD_QNAME"]: e["EGRESSD_DROPPED"] for e in events(d, "AnswerFiltered")}
    assert dropped == {
        "lo.corp.test": "127.0.0.1",
        "other.test": "10.77.1.6",
        "meta.test": "169.254.169.254",
    }
    assert d.stop() == 0

    # The one-line form: --allow-private for a private test zone (benchmarks).
    one = lab.start_daemon(
        [
            "run",
            "--user",
            str(AGENT),
            "--allow",
            "**.test",
            "--upstream",
            INET_V4,
            "--listen",
            "153",
            "--allow-private",
            "10.77.1.0/24",
            "--log",
            "json",
        ]
    )
    one.wait_ready()
    assert answered(ask(lab, "other.test", "A")) == ["10.77.1.6"]
    assert lab.agent("connect", "10.77.1.6", 80)["ok"]
    r = ask(lab, "meta.test", "A")
    assert r["rcode"] == "NOERROR" and r["answers"] == [], r
    refused(lab, "169.254.169.254")
    assert [e["EGRESSD_DROPPED"] for e in events(one, "AnswerFiltered")] == ["169.254.169.254"]
