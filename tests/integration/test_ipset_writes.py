"""The hot path's set writes against the kernel: egressd's own ADD/DEL messages
(firewall/ipsetmsg.py, built by hand) sent by the backend's allow()/revoke() inside the
lab's host namespace, read back with the ipset tool.

The unit tests hold the encoder byte for byte to pyroute2; this holds it to the kernel:
every entry lands with its family, port, protocol, timeout and comment; a DEL takes out
exactly what it names; a full set and a wrong family are errors the caller sees.
"""

from __future__ import annotations

import re
import sys
import textwrap

from lab import Lab

SETS = (
    ("t4", "hash:ip family inet"),
    ("t6", "hash:ip family inet6"),
    ("tp4", "hash:ip,port family inet"),
    ("tp6", "hash:ip,port family inet6"),
    ("tiny", "hash:ip family inet maxelem 1"),
)

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from egressd.errors import FirewallError
    from egressd.firewall.base import TCP, UDP, Write
    from egressd.firewall.iptables_ipset import IptablesIpset

    async def main() -> None:
        fw = IptablesIpset()
        step = sys.argv[1]
        if step == "allow":
            await fw.allow([
                Write("t4", 4, "192.0.2.1", 300, comment="a.example"),
                Write("t4", 4, "192.0.2.2", 301, comment="b.example"),
                Write("t6", 6, "2001:db8::1", 400, comment="six.example"),
                Write("tp4", 4, "192.0.2.3", 500, TCP, 443, "ports.example"),
                Write("tp4", 4, "192.0.2.3", 500, UDP, 443, "ports.example"),
                Write("tp6", 6, "2001:db8::3", 600, TCP, 8443, "ports6.example"),
            ])
        elif step == "revoke":
            # One present, one already gone: the gone one is no error.
            await fw.revoke([
                Write("t4", 4, "192.0.2.1", 0),
                Write("t4", 4, "192.0.2.99", 0),
                Write("tp4", 4, "192.0.2.3", 0, UDP, 443),
            ])
        elif step == "full":
            try:
                await fw.allow([
                    Write("tiny", 4, "192.0.2.7", 300),
                    Write("tiny", 4, "192.0.2.8", 300),
                ])
            except FirewallError as err:
                print("ERROR", err)
        elif step == "family":
            try:
                await fw.allow([Write("t4", 4, "2001:db8::9", 300)])
            except FirewallError as err:
                print("ERROR", err)
        await fw.close()

    asyncio.run(main())
    """
)


def run_step(lab: Lab, step: str) -> str:
    return lab.netns_exec("host", [sys.executable, "-c", SCRIPT, step], timeout=60).stdout


def entries(lab: Lab, name: str) -> dict[str, tuple[int, str]]:
    """Members of a set: entry -> (timeout left, comment)."""
    out = lab.netns_exec("host", ["ipset", "list", name]).stdout
    members = out.split("Members:", 1)[1]
    got = {}
    for line in members.splitlines():
        m = re.match(r'(\S+) timeout (\d+)(?: comment "([^"]*)")?', line.strip())
        if m:
            got[m.group(1)] = (int(m.group(2)), m.group(3) or "")
    return got


def near(got: tuple[int, str], timeout: int, comment: str) -> bool:
    return timeout - 10 <= got[0] <= timeout and got[1] == comment


def test_allow_and_revoke_write_exactly_their_entries_in_the_kernel(lab: Lab) -> None:
    for name, kind in SETS:
        lab.netns_exec("host", f"ipset create {name} {kind} timeout 100 comment")
    # Positive twin of the read-back: an entry the ipset tool writes is read as written.
    lab.netns_exec("host", 'ipset add t4 198.51.100.1 timeout 50 comment "by-the-tool"')
    assert near(entries(lab, "t4")["198.51.100.1"], 50, "by-the-tool")

    run_step(lab, "allow")
    t4, t6 = entries(lab, "t4"), entries(lab, "t6")
    assert near(t4["192.0.2.1"], 300, "a.example") and near(t4["192.0.2.2"], 301, "b.example")
    assert near(t6["2001:db8::1"], 400, "six.example")
    tp4, tp6 = entries(lab, "tp4"), entries(lab, "tp6")
    assert set(tp4) == {"192.0.2.3,tcp:443", "192.0.2.3,udp:443"}
    assert all(near(v, 500, "ports.example") for v in tp4.values())
    assert set(tp6) == {"2001:db8::3,tcp:8443"}
    assert near(tp6["2001:db8::3,tcp:8443"], 600, "ports6.example")

    run_step(lab, "revoke")
    assert set(entries(lab, "t4")) == {"198.51.100.1", "192.0.2.2"}
    assert set(entries(lab, "tp4")) == {"192.0.2.3,tcp:443"}

    # A full set and an address of the wrong family: errors, and nothing half-written.
    full = run_step(lab, "full")
    assert "ERROR" in full and "set is full" in full, full
    assert len(entries(lab, "tiny")) == 1
    wrong = run_step(lab, "family")
    assert "ERROR" in wrong and "2001:db8::9" in wrong, wrong
    assert "2001:db8::9" not in entries(lab, "t4")
