"""Self-tests of the integration lab, without egressd: if these fail, egressd's
integration results mean nothing."""

from __future__ import annotations

import json
import os
import secrets
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import (
    AGENT_UID,
    HOST_V4,
    HOST_V6,
    INET_V4,
    INET_V6,
    ROGUE_ANSWER,
    ROGUE_V4,
    Daemon,
    Lab,
    LabError,
    LabWarning,
    netns_list,
)

pytestmark = pytest.mark.netns

# Stand-in for egressd: sd_notify chatter (more datagrams than the kernel's
# unix dgram queue holds, so a lab that does not drain would hang it), a native
# journal entry when a journal socket exists, STOPPING=1 on SIGTERM.
FAKE_DAEMON = r"""
import os, signal, socket, sys, time
def notify(msg):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(msg.encode(), os.environ["NOTIFY_SOCKET"])
def term(*_):
    notify("STOPPING=1")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
if os.path.exists("/run/systemd/journal/socket"):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(("MESSAGE=fake daemon up\nEGD_FAKE=%s\n" % sys.argv[1]).encode(),
                 "/run/systemd/journal/socket")
for i in range(40):
    notify("STATUS=starting %d" % i)
print("net-ns-inode %d" % os.stat("/proc/self/ns/net").st_ino, flush=True)
notify("READY=1\nSTATUS=up")
while True:
    time.sleep(1)
"""


def start_fake(lab: Lab, token: str, journald: bool = False) -> Daemon:
    return lab.start_process(
        [sys.executable, "-c", FAKE_DAEMON, token], journald=journald, name="fake"
    )


def _poll_text(read: Callable[[], str], timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while not (text := read().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return text


def _alive(pid: int) -> bool:
    """True unless the pid is gone or a zombie (orphans are reaped by pid 1 eventually)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


# --------------------------------------------------------------------------- basics


def test_agent_is_unprivileged(lab: Lab) -> None:
    who = lab.agent("whoami")
    assert who["uid"] == who["euid"] == who["gid"] == AGENT_UID
    assert who["groups"] == []
    assert int(who["capeff"], 16) == 0 and int(who["capprm"], 16) == 0


def test_topology(lab: Lab) -> None:
    assert lab.ns("host") == lab.host and lab.host.startswith("egd-")
    routes = lab.netns_exec("host", "ip route").stdout
    assert f"default via {INET_V4}" in routes
    assert f"default via {INET_V6}" in lab.netns_exec("host", "ip -6 route").stdout
    addrs = lab.netns_exec("host", ["ip", "-o", "addr"]).stdout
    assert HOST_V4 in addrs and HOST_V6 in addrs
    # The host ns firewall starts empty and is inspectable.
    assert "-P OUTPUT ACCEPT" in lab.netns_exec("host", "iptables -S").stdout
    assert "-P OUTPUT ACCEPT" in lab.netns_exec("host", "ip6tables -S").stdout
    assert lab.netns_exec("host", "ipset list").stdout == ""
    assert lab.netns_exec("host", "conntrack -L", check=False).returncode == 0


# --------------------------------------------------------------------------- DNS


def test_getaddrinfo_goes_to_rogue_resolver(lab: Lab) -> None:
    res = lab.agent("resolve", "Some.Where.test", "4")
    assert res["ok"] and res["addrs"] == [ROGUE_ANSWER], res
    qs = lab.rogue.queries(qname="some.where.test.", qtype="A")
    assert len(qs) == 1
    assert qs[0]["src"] == HOST_V4 and qs[0]["dst"] == ROGUE_V4 and qs[0]["transport"] == "udp"
    assert lab.dns.queries() == []  # the real upstream never saw it

    both = lab.agent("resolve", "other.test", "any")
    assert both["addrs"] == [ROGUE_ANSWER]  # rogue has no AAAA
    assert {q["qtype"] for q in lab.rogue.queries(qname="other.test.")} == {"A", "AAAA"}


def test_fake_dns_records_cname_and_aaaa(lab: Lab) -> None:
    lab.dns.set(
        {
            "www.example.test": [["CNAME", "edge.cdn.test.", 30]],
            "edge.cdn.test.": [["CNAME", "node7.cdn.test.", 40]],
            "NODE7.cdn.test": [["A", "203.0.113.7", 60], ["AAAA", "2001:db8:113::7", 70]],
            "txt.test": [["TXT", "hello world", 5]],
            "dangling.test": [["CNAME", "nowhere.test.", 30]],
        }
    )
    r = lab.agent("dnsq", INET_V4, 53, "WWW.example.test", "A", "udp")
    assert r["ok"] and r["rcode"] == "NOERROR" and r["id_match"] and not r["tc"]
    assert r["answers"] == [
        ["WWW.example.test.", "CNAME", "edge.cdn.test.", 30],
        ["edge.cdn.test.", "CNAME", "node7.cdn.test.", 40],
        ["node7.cdn.test.", "A", "203.0.113.7", 60],
    ]
    r6 = lab.agent("dnsq", INET_V6, 53, "www.example.test", "AAAA", "tcp")
    assert r6["answers"][-1] == ["node7.cdn.test.", "AAAA", "2001:db8:113::7", 70]
    assert lab.agent("dnsq", INET_V4, 53, "txt.test", "TXT", "udp")["answers"] == [
        ["txt.test.", "TXT", "hello world", 5]
    ]

    nx = lab.agent("dnsq", INET_V4, 53, "missing.test", "A", "udp")
    assert nx["rcode"] == "NXDOMAIN" and nx["answers"] == []
    assert [a[1] for a in nx["authority"]] == ["SOA"]
    dangling = lab.agent("dnsq", INET_V4, 53, "dangling.test", "A", "udp")
    assert dangling["rcode"] == "NXDOMAIN" and dangling["answers"][0][1] == "CNAME"
    nodata = lab.agent("dnsq", INET_V4, 53, "txt.test", "AAAA", "udp")
    assert nodata["rcode"] == "NOERROR" and nodata["answers"] == []
    assert nodata["authority"][0][1] == "SOA"

    # Changes apply to the very next query.
    lab.dns.set({"www.example.test": [["A", "203.0.113.99", 10]]})
    again = lab.agent("dnsq", INET_V4, 53, "www.example.test", "A", "udp")
    assert again["answers"] == [["www.example.test.", "A", "203.0.113.99", 10]]

    log = lab.dns.queries(qname="www.example.test.")
    assert [(q["qtype"], q["transport"], q["src"]) for q in log] == [
        ("A", "udp", HOST_V4),
        ("AAAA", "tcp", HOST_V6),
        ("A", "udp", HOST_V4),
    ]
    assert all(not q["has_edns"] and q["arcount"] == 0 for q in log)


def test_edns_is_logged_and_answered(lab: Lab) -> None:
    lab.dns.set({"e.test": [["A", "203.0.113.3", 60]]})
    cookie = "0102030405060708"
    r = lab.agent("dnsq", INET_V4, 53, "e.test", "A", "udp", "--edns", f"--opt=10:{cookie}")
    assert r["ok"] and r["edns"] is not None and r["edns"]["udp_size"] == 1232
    assert r["ede"] == []
    (q,) = lab.dns.queries(qname="e.test.")
    assert q["has_edns"] and q["arcount"] == 1 and q["edns_udp_size"] == 1232
    assert q["edns_options"] == [[10, cookie]]


def test_tc_forces_tcp_retry(lab: Lab) -> None:
    lab.dns.set({"big.test": [["A", "203.0.113.44", 60]], "__tc__": ["BIG.test."]})
    udp = lab.agent("dnsq", INET_V4, 53, "big.test", "A", "udp")
    assert udp["ok"] and udp["tc"] and udp["answers"] == []
    tcp = lab.agent("dnsq", INET_V4, 53, "big.test", "A", "tcp")
    assert not tcp["tc"] and tcp["answers"] == [["big.test.", "A", "203.0.113.44", 60]]
    assert [q["transport"] for q in lab.dns.queries(qname="big.test.")] == ["udp", "tcp"]
    # glibc itself retries over TCP after TC=1 (through the rogue this is not testable,
    # so only the fake server's behaviour is checked here).


def test_large_answer_truncates_over_udp(lab: Lab) -> None:
    lab.dns.set({"many.test": [["A", f"203.0.113.{i}", 60] for i in range(1, 60)]})
    udp = lab.agent("dnsq", INET_V4, 53, "many.test", "A", "udp")
    assert udp["tc"] and udp["answers"] == []
    tcp = lab.agent("dnsq", INET_V4, 53, "many.test", "A", "tcp")
    assert len(tcp["answers"]) == 59


def test_servfail_drop_and_raw(lab: Lab) -> None:
    lab.dns.set({"__servfail__": ["sf.test"], "__drop__": ["drop.test"]})
    assert lab.agent("dnsq", INET_V4, 53, "sf.test", "A", "udp")["rcode"] == "SERVFAIL"
    dropped = lab.agent("dnsq", INET_V4, 53, "drop.test", "A", "udp", "--timeout=1")
    assert not dropped["ok"] and dropped["error"] == "timeout"
    assert lab.dns.queries(qname="drop.test.")  # received, just not answered

    # Hand-made query for "raw.test" A with id 0x1234.
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    wire = header + b"\x03raw\x04test\x00" + struct.pack("!HH", 1, 1)
    raw = lab.agent("dnsraw", INET_V4, 53, wire.hex(), "tcp")
    assert raw["ok"] and raw["id"] == 0x1234 and raw["rcode"] == "NXDOMAIN"
    garbage = lab.agent("dnsraw", INET_V4, 53, "00ff", "udp", "--timeout=1")
    assert garbage["error"] == "timeout"
    assert any(q.get("error", "").startswith("parse") for q in lab.dns.queries())


# --------------------------------------------------------------------------- TCP / UDP


def test_tcp_echo_v4_v6_and_hold(lab: Lab) -> None:
    for ip, port in (
        ("203.0.113.7", 80),
        ("2001:db8:113::7", 80),
        ("203.0.113.200", 443),
        (INET_V4, 80),
    ):
        r = lab.agent("connect", ip, port)
        assert r["ok"] and r["echo"] == "ping\n", (ip, port, r)
    held = lab.agent("hold", "2001:db8:113::7", 80, 2)
    assert held["ok"] and held["elapsed"] >= 2
    closed = lab.agent("connect", "203.0.113.7", 81)
    assert not closed["ok"] and closed["error"] == "refused"
    accepted = lab.echo.connections(event="accept", dst="2001:db8:113::7", dport=80)
    assert len(accepted) == 2 and accepted[0]["src"] == HOST_V6
    assert lab.echo.connections(dst="203.0.113.200", dport=443)[0]["src"] == HOST_V4


def test_udp_echo(lab: Lab) -> None:
    for ip in ("203.0.113.8", "2001:db8:113::8", INET_V4):
        assert lab.agent("udp", ip, 9999)["ok"], ip
    assert lab.agent("udp", "203.0.113.8", 9998)["error"] == "refused"
    assert {c["dst"] for c in lab.echo.connections(event="datagram")} == {
        "203.0.113.8",
        "2001:db8:113::8",
        INET_V4,
    }


def test_many_resolve_and_connect(lab: Lab) -> None:
    names = [f"n{i}.race.test" for i in range(200)]
    r = lab.agent("many", "-", input=json.dumps(names), timeout=90)
    summary = {k: r[k] for k in ("n_ok", "elapsed")}
    assert r["ok"] and r["n_ok"] == 200 and r["elapsed"] < 60, summary
    assert [x["name"] for x in r["results"]] == names
    assert r["results"][0]["connect"]["ok"] and r["results"][0]["addrs"] == [ROGUE_ANSWER]
    assert len(lab.rogue.queries(qtype="A")) == 200


# --------------------------------------------------------------------------- daemons


def test_process_runner_notify_and_stop(lab: Lab) -> None:
    d = start_fake(lab, "plain")
    d.wait_ready(timeout=15)
    msgs = d.notifications()
    assert sum(m.startswith("STATUS=starting") for m in msgs) == 40
    assert "READY=1\nSTATUS=up" in msgs
    assert f"net-ns-inode {netns_inode(lab.host)}" in d.stdout_text()
    assert d.returncode is None
    assert d.stop() == 0
    assert "STOPPING=1" in d.notifications()


def test_process_runner_kill_and_early_exit(lab: Lab) -> None:
    d = start_fake(lab, "k")
    d.wait_ready()
    assert d.kill() == -signal.SIGKILL
    dead = lab.start_process(
        [sys.executable, "-c", "import sys; sys.stderr.write('boom: bad config\\n'); sys.exit(3)"]
    )
    with pytest.raises(LabError, match="boom: bad config"):
        dead.wait_ready(timeout=10)
    assert dead.returncode == 3


def test_journald_structured_field_roundtrip(lab: Lab) -> None:
    machine_had_socket = os.path.exists("/run/systemd/journal/socket")
    token = secrets.token_hex(6)
    send = (
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        f"s.sendto(b'MESSAGE=hello from test\\nTESTFIELD=abc-{token}\\nPRIORITY=5\\n',"
        " '/run/systemd/journal/socket')\n"
    )
    lab.journal_exec(["/usr/bin/python3", "-c", send])
    (entry,) = lab.journal_wait(f"TESTFIELD=abc-{token}")
    assert entry["MESSAGE"] == "hello from test" and entry["PRIORITY"] == "5"
    assert entry["_TRANSPORT"] == "journal"

    lab.journal_exec(["logger", "--journald"], input=f"MESSAGE=via logger\nTESTFIELD=lg-{token}\n")
    assert lab.journal_wait(f"TESTFIELD=lg-{token}")[0]["MESSAGE"] == "via logger"
    lab.journal_exec(["systemd-cat", "-t", f"egdcat-{token}", "echo", "via systemd-cat"])
    (cat,) = lab.journal_wait(f"SYSLOG_IDENTIFIER=egdcat-{token}")
    assert cat["MESSAGE"] == "via systemd-cat" and cat["_TRANSPORT"] == "stdout"
    assert lab.journal_query(f"TESTFIELD=nothing-{token}") == []

    # A daemon started with journald=True logs there and lives in the host net ns.
    d = start_fake(lab, f"jd-{token}", journald=True)
    d.wait_ready()
    (up,) = lab.journal_wait(f"EGD_FAKE=jd-{token}")
    assert int(up["_PID"]) == d.pid
    assert f"net-ns-inode {netns_inode(lab.host)}" in d.stdout_text()
    assert d.stop() == 0

    # The private journal is invisible to the machine.
    assert os.path.exists("/run/systemd/journal/socket") == machine_had_socket


def test_cleanup_leaves_nothing(netns_session: None) -> None:
    lab = Lab()
    try:
        names = {lab.host, lab.inet}
        assert names <= set(netns_list())
        assert lab.netns_dir.is_dir()
        plain = start_fake(lab, "a")
        jd = start_fake(lab, "b", journald=True)
        # A "daemon" that leaves an orphan behind when it is stopped.
        forker = lab.start_process(["/bin/sh", "-c", "sleep 300 & echo $!; wait"])
        plain.wait_ready()
        jd.wait_ready()
        mnt_ino = lab.journal.mount_ns_inode()
        pids = [p.pid for p in lab.processes()]
        assert len(pids) == 8  # 3 servers, 3 daemons, journald, mount-ns holder
        orphan = int(_poll_text(forker.stdout_text))
        pids.append(orphan)
        tmp = lab.tmpdir
    finally:
        with pytest.warns(LabWarning, match="leftover"):
            lab.close()
    assert lab.stray_pids == [orphan]
    assert not names & set(netns_list())
    assert not lab.netns_dir.exists() and not tmp.exists()
    for pid in pids:
        assert not _alive(pid), pid
    for ns_link in Path("/proc").glob("[0-9]*/ns/mnt"):
        try:
            assert os.stat(ns_link).st_ino != mnt_ino, f"{ns_link} still in the journal mount ns"
        except FileNotFoundError:
            continue
    lab.close()  # idempotent


HOLD = """
import os, time
from pathlib import Path

def test_hold(lab):
    Path(os.environ["HOLD_READY"]).write_text(lab.host + " " + str(lab.tmpdir))
    time.sleep(120)
"""


def test_a_terminated_test_run_removes_its_lab(netns_session: None, tmp_path: Path) -> None:
    """SIGTERM (a CI timeout, `kill`) to a test run: the lab of the test in progress is
    removed all the same (its namespaces, processes and temp dir), as on Ctrl-C."""
    (tmp_path / "test_hold.py").write_text(HOLD)
    ready = tmp_path / "ready"
    here = Path(__file__).resolve().parent
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest"]
        + ["--rootdir", str(tmp_path), str(tmp_path / "test_hold.py")],
        env={**os.environ, "PYTHONPATH": str(here), "HOLD_READY": str(ready)},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        host, tmpdir = ready.read_text().split()
        # The twin: the lab was there while the test ran.
        assert host in netns_list() and Path(tmpdir).is_dir()
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert "KeyboardInterrupt" in out, out
    assert host not in netns_list(), out
    assert not Path(tmpdir).exists() and not Path("/etc/netns", host).exists(), out
