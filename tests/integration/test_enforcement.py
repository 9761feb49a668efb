"""Admitted flows only: the agent continues a connection only if its own profile's chain
admitted it (conntrack mark), never a flow another uid, egressd itself or an outside host
opened. Real daemon, iptables, conntrack, in the lab's namespaces (see lab.py).

Each negative check has a positive twin: the conntrack entry's packet counter shows that
the agent's packet did meet the foreign flow (so the test exercised the hijack, not a
socket error), and the owner of the flow continuing it gets through.
"""

from __future__ import annotations

import re
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from lab import HOST_V4, HOST_V6, INET_V4, ROGUE_V4, ROGUE_V6, Lab, poll
from test_egressd import AGENT, BASIC, OTHER, events, start, write_config

pytestmark = pytest.mark.netns

BUILD = 64125  # a second restricted uid, in profile "build"
ECHO_UDP = 9999


def mangle_output(lab: Lab, *rule: str) -> None:
    """A foreign rule in the host's mangle OUTPUT chain (another tool's)."""
    lab.netns_exec("host", ["iptables", "-t", "mangle", "-A", "OUTPUT", *rule])


def enable_ct_accounting(lab: Lab) -> None:
    # Per-namespace; only flows created after this carry packet counters.
    lab.netns_exec("host", ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_acct=1"])


def conntrack(lab: Lab, proto: str, dst: str, dport: int, *extra: str) -> list[str]:
    """The host's conntrack entries of proto to dst:dport (original direction)."""
    out = lab.netns_exec(
        "host",
        ["conntrack", "-L", "-p", proto, "--orig-dst", dst, "--orig-port-dst", str(dport), *extra],
        check=False,
    ).stdout
    return [line for line in out.splitlines() if line.startswith(proto)]


def flow(lab: Lab, proto: str, dst: str, dport: int, sport: int) -> dict[str, Any] | None:
    """The conntrack entry of (sport -> dst:dport), original direction: its packet count
    and mark, or None."""
    for line in conntrack(lab, proto, dst, dport):
        if re.search(rf"\bsport={sport}\b", line):
            packets = re.search(r"packets=(\d+)", line)
            mark = re.search(r"mark=(\d+)", line)
            return {
                "packets": int(packets.group(1)) if packets else None,
                "mark": int(mark.group(1)) if mark else None,
                "line": line,
            }
    return None


def free_port() -> int:
    return 20000 + secrets.randbelow(20000)


def uids_in(state: Path) -> list[str]:
    text = state.read_text(encoding="utf-8")
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def two_profile_config(lab: Lab, allow: list[str], extra: str = "") -> Any:
    return write_config(
        lab,
        allow,
        profile=f"""{extra}
[profiles.build]
users = [{BUILD}]
allowlists = ["egressd.toml.allow.txt"]
port = 154
""",
    )


# --- another uid's flow -------------------------------------------------------------------


@pytest.mark.parametrize("rogue", [ROGUE_V4, ROGUE_V6])
def test_the_agent_cannot_continue_a_dns_flow_another_uid_opened(lab: Lab, rogue: str) -> None:
    lab.dns.set(BASIC)
    # A foreign CONNMARK rule outside egressd's bits (kube-proxy style) changes nothing.
    mangle_output(lab, "-j", "CONNMARK", "--set-xmark", "0x4000/0x4000")
    start(lab, write_config(lab, ["ok.test"]))
    enable_ct_accounting(lab)
    sport = free_port()

    # An unrestricted user asks the rogue resolver directly, from a fixed port.
    other = lab.agent(
        "dnsq", rogue, 53, "other-user.test", "A", "udp", f"--sport={sport}", uid=OTHER
    )
    assert other["ok"], other
    assert lab.rogue.queries(qname="other-user.test.")  # the observation point works
    before = flow(lab, "udp", rogue, 53, sport)
    assert before is not None and before["packets"] == 1, before

    # The agent binds the same port and talks to the same resolver: not NEW, so the nat
    # REDIRECT never sees it; only the filter chain can stop it.
    secret = f"secret-{secrets.token_hex(4)}.blocked.test"
    r = lab.agent("dnsq", rogue, 53, secret, "A", "udp", f"--sport={sport}", "--timeout=2")
    assert not r["ok"], r
    after = flow(lab, "udp", rogue, 53, sport)
    assert after is not None and after["packets"] == 2, (before, after)  # it met the flow
    time.sleep(0.3)
    assert lab.rogue.queries(qname=f"{secret}.") == []

    # The positive twin: the flow's owner continues it.
    again = lab.agent(
        "dnsq", rogue, 53, "other-again.test", "A", "udp", f"--sport={sport}", uid=OTHER
    )
    assert again["ok"], again
    assert lab.rogue.queries(qname="other-again.test.")


def test_the_agent_cannot_continue_egressds_own_upstream_query(lab: Lab) -> None:
    lab.dns.set({**BASIC, "fresh.test.": [["A", "203.0.113.11", 300]]})
    start(lab, write_config(lab, ["ok.test", "fresh.test"]))
    enable_ct_accounting(lab)

    assert lab.agent("resolve", "fresh.test", "4")["ok"]
    out = "\n".join(conntrack(lab, "udp", INET_V4, 53, "--orig-src", HOST_V4))
    ports = [int(m) for m in re.findall(r"src=\S+ dst=\S+ sport=(\d+) dport=53 ", out)]
    assert ports, f"egressd's upstream flow is not in conntrack:\n{out}"
    sport = ports[0]
    before = flow(lab, "udp", INET_V4, 53, sport)
    assert before is not None and before["mark"] == 0, before  # root's flow: no profile id

    secret = f"exfil-{secrets.token_hex(4)}.blocked.test"
    r = lab.agent("dnsq", INET_V4, 53, secret, "A", "udp", f"--sport={sport}", "--timeout=2")
    assert not r["ok"], r
    after = flow(lab, "udp", INET_V4, 53, sport)
    assert after is not None and after["packets"] == before["packets"] + 1, (before, after)
    time.sleep(0.3)
    assert lab.dns.queries(qname=f"{secret}.") == []
    # Positive twin: the fake DNS logs what does reach it (egressd's own query).
    assert lab.dns.queries(qname="fresh.test.")
    # And an ordinary lookup of the same name by the agent is redirected and blocked.
    blocked = lab.agent("dnsq", INET_V4, 53, secret, "A", "udp")
    assert blocked["ok"] and blocked["rcode"] == "NXDOMAIN", blocked
    assert lab.dns.queries(qname=f"{secret}.") == []


def test_dns_that_escaped_the_redirect_is_rejected_even_to_a_cidr(lab: Lab) -> None:
    """An unanswered UDP flow another uid opened to a resolver is still "NEW" for its later
    packets, but nat saw only its first one: the agent's packet from the same port goes
    to the real resolver un-redirected. With that resolver's address in `cidrs`, only the
    port-53 rule stops it."""
    lab.dns.set({**BASIC, "__drop__": ["unanswered.test."]})
    start(lab, write_config(lab, ["ok.test"], profile=f'cidrs = ["{INET_V4}/32"]'))
    enable_ct_accounting(lab)
    sport = free_port()
    other = lab.agent(
        "dnsq",
        INET_V4,
        53,
        "unanswered.test",
        "A",
        "udp",
        f"--sport={sport}",
        "--timeout=0.5",
        uid=OTHER,
    )
    assert not other["ok"] and other["error"] == "timeout", other  # never answered
    assert lab.dns.queries(qname="unanswered.test.")  # but it arrived: the log works
    before = flow(lab, "udp", INET_V4, 53, sport)
    assert before is not None and "UNREPLIED" in before["line"], before

    secret = f"escaped-{secrets.token_hex(4)}.blocked.test"
    r = lab.agent("dnsq", INET_V4, 53, secret, "A", "udp", f"--sport={sport}", "--timeout=2")
    assert not r["ok"], r
    after = flow(lab, "udp", INET_V4, 53, sport)
    assert after is not None and after["packets"] == before["packets"] + 1, (before, after)
    time.sleep(0.3)
    assert lab.dns.queries(qname=f"{secret}.") == []
    # Positive twin: the CIDR itself is reachable for the agent on another port (the lab's
    # UDP echo server also answers on INET_V4).
    assert lab.agent("udp", INET_V4, ECHO_UDP)["ok"]


def test_two_profiles_never_continue_each_others_flows(lab: Lab) -> None:
    lab.dns.set(BASIC)
    start(lab, two_profile_config(lab, ["ok.test"]))
    enable_ct_accounting(lab)
    for uid in (AGENT, BUILD):  # the destination is granted to both
        assert lab.agent("resolve", "ok.test", "4", uid=uid)["ok"]

    for owner, intruder in ((AGENT, BUILD), (BUILD, AGENT)):
        sport = free_port()
        opened = lab.agent("udpfrom", sport, "203.0.113.10", ECHO_UDP, "mine", uid=owner)
        assert opened["ok"], opened
        f = flow(lab, "udp", "203.0.113.10", ECHO_UDP, sport)
        assert f is not None and f["mark"] not in (0, None), f  # marked by owner's chain

        r = lab.agent("udpfrom", sport, "203.0.113.10", ECHO_UDP, "theirs", "1", uid=intruder)
        assert not r["ok"], r
        after = flow(lab, "udp", "203.0.113.10", ECHO_UDP, sport)
        assert after is not None and after["packets"] == f["packets"] + 1, (f, after)
        time.sleep(0.2)
        assert len(lab.echo.connections(event="datagram", sport=sport)) == 1

        # The positive twin: the owner continues its own flow.
        mine = lab.agent("udpfrom", sport, "203.0.113.10", ECHO_UDP, "mine2", uid=owner)
        assert mine["ok"], mine
        assert len(lab.echo.connections(event="datagram", sport=sport)) == 2


# --- connections from outside -------------------------------------------------------------


INBOUND_CLIENT = r"""
import json, socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(2)
out = {"connected": False, "data": ""}
try:
    s.bind((src, 0))
    s.connect((dst, port))
    out["connected"] = True
    out["data"] = s.recv(100).decode()
except OSError as e:
    out["error"] = repr(e)
print(json.dumps(out))
"""


def inbound(lab: Lab, ns: str, src: str, dst: str, port: int) -> dict[str, Any]:
    import json

    r = lab.netns_exec(ns, [sys.executable, "-c", INBOUND_CLIENT, src, dst, str(port)])
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def serving(lab: Lab, uid: int, port: int, seconds: float) -> tuple[threading.Thread, dict]:
    result: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: result.update(lab.agent("serve", port, seconds, uid=uid, timeout=60))
    )
    t.start()
    listening = poll(lambda: f":{port} " in lab.netns_exec("host", ["ss", "-ltnH"]).stdout, 10)
    assert listening, "the test server did not start listening"
    return t, result


def test_connections_from_outside_get_nothing_back(lab: Lab) -> None:
    lab.dns.set(BASIC)
    start(lab, write_config(lab, ["ok.test"]))
    assert lab.agent("resolve", "ok.test", "any")["ok"]  # 203.0.113.10 is granted now
    port = free_port()

    t, served = serving(lab, AGENT, port, 10)
    # A local client (another uid, over loopback) does get the agent's dev server's answer.
    local = inbound(lab, "host", "127.0.0.1", "127.0.0.1", port)
    assert local["data"] == "hello\n", local
    # From a blocked and from a granted address of the fake internet, v4 and v6: the
    # handshake reaches the agent's server, its replies never leave.
    for src, dst in (
        ("203.0.113.66", HOST_V4),
        ("203.0.113.10", HOST_V4),
        ("2001:db8:113::10", HOST_V6),
    ):
        got = inbound(lab, "inet", src, dst, port)
        assert got["data"] == "", (src, got)
    t.join(60)
    assert served.get("ok"), served

    # The positive twin: the same server as an unrestricted user answers the outside.
    t, served = serving(lab, OTHER, port + 1, 3)
    got = inbound(lab, "inet", "203.0.113.66", HOST_V4, port + 1)
    assert got["data"] == "hello\n", got
    t.join(60)


def test_the_hosts_own_addresses_are_not_egress(lab: Lab) -> None:
    lab.dns.set(BASIC)
    config = write_config(lab, ["ok.test"])
    start(lab, config)
    port = free_port()
    t, served = serving(lab, OTHER, port, 4)
    for ip in (HOST_V4, HOST_V6, "127.0.0.1"):
        r = lab.agent("connect", ip, port, 3)
        assert not r["ok"] and "echo" not in r, r
        assert r["error"] in ("refused", "reset", "unreachable"), r
    # Positive twin: the server is there, and answers an unrestricted user.
    assert lab.agent("connect", HOST_V4, port, 3, uid=OTHER).get("echo") == "hello\n"
    t.join(60)
    assert served["accepted"] == [f"::ffff:{HOST_V4}"], served  # never one of the agent's


def test_allow_loopback_opens_the_hosts_own_services_and_nothing_more(lab: Lab) -> None:
    lab.dns.set(BASIC)
    start(lab, write_config(lab, ["ok.test"], profile="allow_loopback = true"))
    port = free_port()
    t, served = serving(lab, OTHER, port, 6)
    for ip in ("127.0.0.1", HOST_V4, HOST_V6):
        assert lab.agent("connect", ip, port, 3).get("echo") == "hello\n", ip
    # The outside stays closed: a never-resolved address is still rejected.
    assert not lab.agent("connect", "203.0.113.66", 80, 3)["ok"]
    t.join(60)
    assert len(served["accepted"]) == 3, served


# --- live connections ---------------------------------------------------------------------


def test_live_connections_survive_reload_and_restart(lab: Lab) -> None:
    lab.dns.set(BASIC)
    config = write_config(lab, ["ok.test"])
    d = start(lab, config)
    assert lab.agent("resolve", "ok.test", "any")["ok"]
    held: dict[str, dict[str, Any]] = {}
    holders = [
        threading.Thread(
            target=lambda ip=ip: held.update({ip: lab.agent("hold", ip, 80, 6, timeout=30)})
        )
        for ip in ("203.0.113.10", "2001:db8:113::10")
    ]
    for h in holders:
        h.start()
    time.sleep(1)  # both connections are open

    d.signal(signal.SIGHUP)
    assert poll(lambda: events(d, "Reloaded"), 10)
    assert d.stop() == 0
    start(lab, config)  # the same profile id after a restart: the flows are still its own
    for h in holders:
        h.join(30)
    assert all(r.get("ok") for r in held.values()) and len(held) == 2, held


# --- a foreign mark writer ----------------------------------------------------------------


def test_a_foreign_rule_writing_egressds_mark_bits_stops_the_start_closed(lab: Lab) -> None:
    lab.dns.set(BASIC)
    # Another tool that keeps its own ids in the same conntrack mark bits.
    mangle_output(lab, "-p", "udp", "-j", "CONNMARK", "--set-xmark", "0x1000000/0xff000000")
    config = write_config(lab, ["ok.test"])
    d = lab.start_daemon(["run", "--config", str(config), "--log", "json"])
    assert d.wait(20) == 1
    errors = " ".join(e.get("message", "") for e in events(d, "Error"))
    assert "--set-xmark 0x1000000/0xff000000" in errors and "ct_mask" in errors, errors
    # Closed: the users are denied everything, DNS included.
    assert not lab.agent("connect", "203.0.113.10", 80, 3)["ok"]
    assert not lab.agent("dnsq", ROGUE_V4, 53, "ok.test", "A", "udp", "--timeout=2")["ok"]
    assert lab.rogue.queries() == []
    # Positive twins: an unrestricted user does get there, and the rogue's log shows it.
    assert lab.agent("connect", "203.0.113.10", 80, 3, uid=OTHER)["ok"]
    assert lab.agent("dnsq", ROGUE_V4, 53, "ok.test", "A", "udp", uid=OTHER)["ok"]
    assert lab.rogue.queries(qname="ok.test.")

    # With a mask clear of that rule, egressd starts and the agent works.
    fixed = write_config(lab, ["ok.test"], daemon="ct_mask = 0x00f00000")
    start(lab, fixed)
    assert lab.agent("resolve", "ok.test", "4")["ok"]
    assert lab.agent("connect", "203.0.113.10", 80)["ok"]


# --- conntrack exhaustion -----------------------------------------------------------------


FLOOD = r"""
import socket, sys
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sent = 0
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"x", (ip, port))  # a new source port, a new conntrack entry each
        sent += 1
    except OSError:
        pass
    s.close()
print(sent)
"""


def udp_flows(lab: Lab) -> int:
    return len(conntrack(lab, "udp", "203.0.113.10", ECHO_UDP))


def flood(lab: Lab, uid: int, n: int) -> int:
    """UDP datagrams from n fresh source ports to a granted echo address, as uid: how many
    conntrack entries they made (a rejected packet never confirms its entry)."""
    before = udp_flows(lab)
    lab.netns_exec(
        "host",
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "/usr/bin/python3",
            "-I",
            "-c",
            FLOOD,
            "203.0.113.10",
            str(ECHO_UDP),
            str(n),
        ],
    )
    return udp_flows(lab) - before


N = 600


def test_new_flows_per_second_are_bounded(lab: Lab) -> None:
    lab.dns.set(BASIC)
    profile = "conn_rate = 20\nconn_burst = 50\nconn_max = 100000"
    d = start(lab, write_config(lab, ["ok.test"], profile=profile))
    assert lab.agent("resolve", "ok.test", "4")["ok"]

    through = flood(lab, AGENT, N)
    # burst 50 plus 20/s for the second or so the flood takes, with room for a slow machine
    assert 0 < through <= 150, through
    # Positive twin: an unrestricted user's identical flood all gets there.
    assert flood(lab, OTHER, N) >= 580
    # A reload that raises the rate takes effect (the kernel keeps a hashlimit table's
    # parameters by name, so the name carries them).
    write_config(lab, ["ok.test"], profile="conn_rate = 100000\nconn_burst = 100000")
    d.signal(signal.SIGHUP)
    assert poll(lambda: events(d, "Reloaded"), 10)
    # (Not all 600: a new source port that happens to equal one of the unrestricted user's
    # flows to the same echo server of a moment ago is that user's flow, and rejected.)
    assert flood(lab, AGENT, N) >= 540


def test_a_reload_that_removes_a_profile_removes_its_three_chains(lab: Lab) -> None:
    lab.dns.set(BASIC)
    config = two_profile_config(lab, ["ok.test"])
    d = start(lab, config)
    assert not lab.agent("connect", "203.0.113.66", 80, 3, uid=BUILD)["ok"]
    saved = lab.netns_exec("host", ["iptables-save", "-t", "filter"]).stdout
    assert all(f":EGRESSD-{k}-build " in saved for k in "PAR"), saved
    # The boot-time lockdown's list of restricted uids follows every good install.
    state = lab.tmpdir / "state" / "restricted"
    assert uids_in(state) == [str(AGENT), str(BUILD)]

    write_config(lab, ["ok.test"])  # the same file, now with the agent profile only
    d.signal(signal.SIGHUP)
    assert poll(lambda: events(d, "Reloaded"), 10), d.stderr_text()[-3000:]
    for tool in ("iptables-save", "ip6tables-save"):
        saved = lab.netns_exec("host", [tool, "-t", "filter"]).stdout
        assert "-build" not in saved, saved
        assert ":EGRESSD-P-agent " in saved
    assert uids_in(state) == [str(AGENT)]
    # A reload that fails keeps the last good list.
    (lab.tmpdir / "egressd.toml").write_text("[profiles.agent\n", encoding="utf-8")
    d.signal(signal.SIGHUP)
    assert poll(lambda: events(d, "ReloadFailed"), 10)
    assert uids_in(state) == [str(AGENT)]
    # The removed profile's user is no longer restricted; the agent still is.
    assert lab.agent("connect", "203.0.113.66", 80, 3, uid=BUILD)["ok"]
    assert not lab.agent("connect", "203.0.113.66", 80, 3)["ok"]


def test_live_flows_are_capped(lab: Lab) -> None:
    lab.dns.set(BASIC)
    profile = "conn_rate = 100000\nconn_burst = 100000\nconn_max = 30"
    start(lab, write_config(lab, ["ok.test"], profile=profile))
    assert lab.agent("resolve", "ok.test", "4")["ok"]  # a DNS flow: one of the 30

    through = flood(lab, AGENT, 100)  # each datagram a new flow that lives on for 30 s
    assert 20 <= through <= 30, through
    assert flood(lab, OTHER, 100) >= 95  # positive twin: no cap for an unrestricted user


def test_a_mark_writer_added_later_is_reported(lab: Lab) -> None:
    lab.dns.set(BASIC)
    d = start(lab, write_config(lab, ["ok.test"], verify_interval=1.0))
    time.sleep(1.5)
    assert not [e for e in events(d, "Error") if "conntrack mark" in e.get("message", "")]
    mangle_output(lab, "-j", "CONNMARK", "--set-xmark", "0x2000000/0xff000000")
    said = poll(
        lambda: [e for e in events(d, "Error") if "now writes the conntrack mark" in e["message"]],
        10,
    )
    assert said and "--set-xmark 0x2000000/0xff000000" in said[0]["message"], said
    time.sleep(2.5)  # said once, not every verify
    assert len([e for e in events(d, "Error") if "now writes" in e["message"]]) == 1
