"""The agent's subordinate uids are restricted like the agent (issue 5, "other uids").

useradd gives a new user a subordinate range (/etc/subuid); with uidmap installed,
`unshare --map-auto` runs the user's processes as those uids, whose sockets the owner match
on the user's own uid does not see. The lab's host namespace gets its own /etc/passwd,
/etc/group, /etc/subuid and /etc/subgid (lab.host_users), seen by the agent, newuidmap and
egressd alike: all run through `ip netns exec`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lab import AGENT_PYTHON, AGENT_SOURCE, INET_V4, ROGUE_V4, Daemon, Lab, LabError
from test_egressd import start, write_config

pytestmark = pytest.mark.netns

AGENT, AGENT_NAME, AGENT_SUB = 64123, "egdagent", (200000, 65536)
CONTROL, CONTROL_NAME, CONTROL_SUB = 64999, "egdcontrol", (300000, 65536)
INNER = 1000  # the uid switched to inside the user namespace
RECORDS = {"ok.test.": [["A", "203.0.113.10", 300]]}
AGENT_DST, AGENT_DST6 = "203.0.113.77", "2001:db8:113::77"
CONTROL_DST, CONTROL_DST6 = "203.0.113.66", "2001:db8:113::66"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/"}


def userns_argv(lab: Lab, uid: int, *cmd: str) -> list[str]:
    """CMD as `uid`, inside a user namespace with its subordinate range mapped, as uid
    INNER there. util-linux 2.38 (Debian 12): --map-root-user maps 0 to the caller,
    --map-auto maps 1.. to the caller's first /etc/subuid range (through the setuid
    newuidmap, which checks the range against /etc/subuid by the caller's name)."""
    return [
        "ip",
        "netns",
        "exec",
        lab.host,
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "unshare",
        "--user",
        "--map-root-user",
        "--map-auto",
        "setpriv",
        f"--reuid={INNER}",
        f"--regid={INNER}",
        "--clear-groups",
        *cmd,
    ]


def as_subordinate(lab: Lab, uid: int, *args: object, timeout: float = 30) -> dict[str, Any]:
    """agent.py ARGS as a subordinate uid of `uid`; returns its JSON."""
    argv = userns_argv(lab, uid, AGENT_PYTHON, "-I", "-c", AGENT_SOURCE, *map(str, args))
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=ENV, cwd="/", check=False
    )
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise LabError(
            f"{args!r} as a subordinate uid of {uid} exited {proc.returncode} without JSON:\n"
            f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
        ) from None
    return result


def outer_uid(lab: Lab, uid: int) -> int:
    """The uid INNER is outside the namespace, read from the namespace's own uid_map."""
    proc = subprocess.run(
        userns_argv(lab, uid, "cat", "/proc/self/uid_map"),
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
        cwd="/",
        check=False,
    )
    assert proc.returncode == 0, f"unshare --map-auto as {uid} failed: {proc.stderr}"
    for line in proc.stdout.splitlines():
        inside, outside, count = map(int, line.split())
        if inside <= INNER < inside + count:
            return outside + INNER - inside
    raise AssertionError(f"uid {INNER} is not mapped: {proc.stdout!r}")


def counters(lab: Lab, table: str, pattern: str) -> int:
    """Packets counted by the rules of `table` (IPv4) whose text matches `pattern`."""
    out = lab.netns_exec("host", ["iptables-save", "-c", "-t", table]).stdout
    total = 0
    for line in out.splitlines():
        m = re.match(r"^\[(\d+):\d+\] (.*)$", line)
        if m and re.search(pattern, m.group(2)):
            total += int(m.group(1))
    return total


def count_owner(lab: Lab, uid: int) -> None:
    """A counting rule of the test's own (raw table, which egressd leaves alone): proves
    the kernel sees a socket's owner as `uid`, whatever egressd's rules do."""
    lab.netns_exec(
        "host", ["iptables", "-t", "raw", "-A", "OUTPUT", "-m", "owner", "--uid-owner", str(uid)]
    )


def start_egressd(lab: Lab) -> tuple[Daemon, Path]:
    config = write_config(lab, ["ok.test"], users=(AGENT_NAME,))
    return start(lab, config), config


@pytest.fixture
def sublab(lab: Lab) -> Lab:
    """The lab with named agent and control users, each with a subordinate range."""
    lab.host_users(
        {AGENT_NAME: AGENT, CONTROL_NAME: CONTROL},
        {
            AGENT_NAME: [f"{AGENT_SUB[0]}:{AGENT_SUB[1]}"],
            CONTROL_NAME: [f"{CONTROL_SUB[0]}:{CONTROL_SUB[1]}"],
        },
    )
    lab.dns.set(RECORDS)
    return lab


def test_egressd_sees_the_lab_users_and_ranges(sublab: Lab) -> None:
    lab = sublab
    first, count = AGENT_SUB
    _, config = start_egressd(lab)  # the profile names the user: egressd found it in passwd
    filter_rules = lab.netns_exec("host", ["iptables", "-S", "EGRESSD-OUTPUT"]).stdout
    assert f"--uid-owner {AGENT}" in filter_rules
    assert f"--uid-owner {first}-{first + count - 1}" in filter_rules, filter_rules
    assert f"{CONTROL_SUB[0]}-" not in filter_rules  # the control user is not restricted
    nat_rules = lab.netns_exec("host", ["iptables", "-t", "nat", "-S", "EGRESSD-DNS"]).stdout
    assert f"--uid-owner {first}-{first + count - 1}" in nat_rules, nat_rules
    # check-config (and its getsubids, the NSS source) reads the same files
    check = lab.netns_exec(
        "host", [sys.executable, "-m", "egressd", "check-config", "--config", str(config)]
    )
    assert f"subordinate uids {first}-{first + count - 1}" in check.stdout, check.stdout
    got = lab.netns_exec("host", ["getsubids", AGENT_NAME]).stdout
    assert got.split() == ["0:", AGENT_NAME, str(first), str(count)]


def test_subordinate_uids_of_the_agent_are_restricted_and_the_control_user_is_not(
    sublab: Lab,
) -> None:
    lab = sublab
    start_egressd(lab)
    agent_sub = outer_uid(lab, AGENT)
    control_sub = outer_uid(lab, CONTROL)
    assert AGENT_SUB[0] <= agent_sub < AGENT_SUB[0] + AGENT_SUB[1]
    assert CONTROL_SUB[0] <= control_sub < CONTROL_SUB[0] + CONTROL_SUB[1]
    who = as_subordinate(lab, AGENT, "whoami")
    assert who["uid"] == INNER and who["capeff"] == "0000000000000000"
    count_owner(lab, agent_sub)
    count_owner(lab, control_sub)

    # Positive twin: the control user, as its subordinate uid, gets out on every path.
    assert as_subordinate(lab, CONTROL, "connect", CONTROL_DST, 80)["ok"]
    assert as_subordinate(lab, CONTROL, "connect", CONTROL_DST6, 443)["ok"]
    assert as_subordinate(lab, CONTROL, "udp", CONTROL_DST, 9999)["ok"]
    assert lab.echo.connections(dst=CONTROL_DST, proto="tcp")
    assert lab.echo.connections(dst=CONTROL_DST6, proto="tcp")
    assert lab.echo.connections(dst=CONTROL_DST, proto="udp")
    for server, log in ((ROGUE_V4, lab.rogue), (INET_V4, lab.dns)):
        for proto in ("udp", "tcp"):
            name = f"control-{proto}.blocked.test"
            r = as_subordinate(lab, CONTROL, "dnsq", server, 53, name, "A", proto)
            assert r["ok"], r
            assert log.queries(qname=f"{name}."), f"{name} did not reach {server}"
    assert counters(lab, "raw", rf"--uid-owner {control_sub}\b") > 0  # its owner, seen

    # The agent, as its subordinate uid: nothing gets out.
    tcp = as_subordinate(lab, AGENT, "connect", AGENT_DST, 80, 5)
    assert not tcp["ok"] and tcp["error"] in ("reset", "refused"), tcp
    tcp6 = as_subordinate(lab, AGENT, "connect", AGENT_DST6, 443, 5)
    assert not tcp6["ok"] and tcp6["error"] in ("reset", "refused"), tcp6
    udp = as_subordinate(lab, AGENT, "udp", AGENT_DST, 9999, 3)
    assert not udp["ok"], udp
    for server in (ROGUE_V4, INET_V4):
        for proto in ("udp", "tcp"):
            name = f"agent-{proto}.blocked.test"
            r = as_subordinate(lab, AGENT, "dnsq", server, 53, name, "A", proto, "--edns")
            # answered by egressd (REDIRECT), not by the server the agent asked
            assert r["ok"] and r["rcode"] == "NXDOMAIN" and r["answers"] == [], r
    assert lab.echo.connections(dst=AGENT_DST) == []
    assert lab.echo.connections(dst=AGENT_DST6) == []
    for log in (lab.rogue, lab.dns):
        assert [q for q in log.queries() if str(q.get("qname", "")).startswith("agent-")] == []
    # The packets were the subordinate uid's, and egressd's range rules are what caught them.
    first, last = AGENT_SUB[0], AGENT_SUB[0] + AGENT_SUB[1] - 1
    assert counters(lab, "raw", rf"--uid-owner {agent_sub}\b") > 0
    assert counters(lab, "filter", rf"-A EGRESSD-OUTPUT .*--uid-owner {first}-{last} ") > 0
    assert counters(lab, "nat", rf"-A EGRESSD-DNS .*--uid-owner {first}-{last} ") >= 4

    # Restricted, not cut off: an allowed name resolves through egressd and connects.
    res = as_subordinate(lab, AGENT, "resolve", "ok.test", "4")
    assert res["addrs"] == ["203.0.113.10"], res
    assert as_subordinate(lab, AGENT, "connect", "203.0.113.10", 80)["ok"]
