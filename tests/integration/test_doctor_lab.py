"""``egressd doctor`` in the lab: each planted problem is found, a clean host gives nothing.

File checks read a root tree built per test (``--root``); the socket, sysctl and iptables
checks look at the lab's host namespace, where the real egressd runs.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from lab import INET_V4, Daemon, Lab, poll

pytestmark = pytest.mark.netns

AGENT = 64123
PORT = 153
DOCTOR = [sys.executable, "-m", "egressd", "doctor"]
ALL_CHECKS = ["resolver", "groups", "sudo", "setuid", "loopback", "nftables", "firewall", "ports"]
# What a check may legitimately skip: loopback only looks when a profile allows loopback.


def write_config(path: Path, users: list[int | str], *, allow_loopback: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "allow.txt").write_text("ok.test\n", encoding="utf-8")
    path.write_text(
        f"""
[daemon]
upstreams = ["{INET_V4}"]
upstream_timeout = 1.0
verify_interval = 1.0

[profiles.agent]
users = {json.dumps(users)}
allowlists = ["allow.txt"]
port = {PORT}
allow_loopback = {str(allow_loopback).lower()}
""",
        encoding="utf-8",
    )
    return path


def doctor(lab: Lab, *args: str) -> tuple[int, dict[str, Any]]:
    """Run doctor as root in the lab's host namespace; (exit code, its JSON report)."""
    r = lab.netns_exec("host", [*DOCTOR, *args, "--json"], check=False)
    assert r.returncode in (0, 1), f"doctor failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    report: dict[str, Any] = json.loads(r.stdout)
    return r.returncode, report


def start(lab: Lab, config: Path) -> Daemon:
    d = lab.start_daemon(["run", "--config", str(config), "--log", "json"])
    d.wait_ready()
    return d


@contextmanager
def unix_server(path: Path) -> Iterator[None]:
    """A listening unix socket (what doctor's resolver check connects to)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen(8)
        try:
            yield
        finally:
            path.unlink()


class Tree:
    """The root tree doctor's file checks read: a clean Debian-like /etc to begin with."""

    def __init__(self, lab: Lab) -> None:
        self.root = lab.tmpdir / "root"
        self.plant("/etc/passwd", Path("/etc/netns", lab.host, "passwd").read_text())
        self.plant("/etc/group", Path("/etc/netns", lab.host, "group").read_text())
        self.plant("/etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n")
        self.plant("/etc/nscd.conf", "enable-cache hosts yes\n")  # no nscd runs: fine
        self.plant("/etc/sudoers", "root ALL=(ALL:ALL) ALL\n@includedir /etc/sudoers.d\n")
        self.plant("/etc/sudoers.d/README", "# files here are read by sudo\n")
        self.plant("/etc/nftables.conf", "flush ruleset\n")  # no unit loads it: fine
        self.plant("/usr/bin/curl", "#!/bin/sh\n", 0o755)  # not setuid: fine
        self.plant("/usr/bin/passwd", "#!/bin/sh\n", 0o4755)  # setuid, no network: fine
        self.config = write_config(self.root / "etc/egressd/egressd.toml", ["agent"])

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def plant(self, p: str, text: str, mode: int = 0o644) -> Path:
        target = self.path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        target.chmod(mode)
        return target

    def append(self, p: str, text: str) -> Callable[[], None]:
        """Append; returns the undo."""
        before = self.path(p).read_text()
        self.path(p).write_text(before + text)
        return lambda: self.path(p).write_text(before)


def findings(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(f["check"], f["severity"], f["evidence"]) for f in report["findings"]]


def assert_clean(lab: Lab, *args: str) -> None:
    rc, report = doctor(lab, *args)
    assert (rc, findings(report)) == (0, []), report
    assert report["config_error"] is None and report["skipped"] == []


def test_each_planted_problem_is_found_and_a_clean_host_gives_nothing(lab: Lab) -> None:
    lab.host_users({"agent": AGENT})
    tree = Tree(lab)
    d = start(lab, tree.config)
    root = ["--root", str(tree.root)]

    # Clean: every check runs, nothing found (egressd's rules are in place for both families).
    rc, report = doctor(lab, *root)
    assert (rc, findings(report)) == (0, []), report
    assert report["checks"] == ALL_CHECKS and report["skipped"] == []

    # glibc through nss-resolve, with systemd-resolved answering on its varlink socket.
    undo = tree.append("/etc/nsswitch.conf", "hosts: files resolve [!UNAVAIL=return] dns\n")
    with unix_server(tree.path("/run/systemd/resolve/io.systemd.Resolve")):
        rc, report = doctor(lab, *root)
    undo()
    assert rc == 1 and findings(report) == [
        ("resolver", "leak", "/etc/nsswitch.conf:4: hosts: files resolve [!UNAVAIL=return] dns"),
        ("resolver", "leak", "/run/systemd/resolve/io.systemd.Resolve (listening)"),
    ]

    # nscd answering, its hosts cache on.
    with unix_server(tree.path("/var/run/nscd/socket")):
        rc, report = doctor(lab, *root)
    assert rc == 1 and findings(report) == [
        (
            "resolver",
            "leak",
            "/var/run/nscd/socket (listening); /etc/nscd.conf:1 enables its hosts cache",
        )
    ]

    # The agent in the docker group.
    line = len(tree.path("/etc/group").read_text().splitlines()) + 1
    undo = tree.append("/etc/group", "docker:x:998:someone,agent\n")
    rc, report = doctor(lab, *root)
    undo()
    assert rc == 1 and findings(report) == [("groups", "leak", f"/etc/group:{line}")]

    # Passwordless sudo through an included file, naming the agent by uid.
    drop = tree.plant("/etc/sudoers.d/agent", f"#{AGENT} ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    rc, report = doctor(lab, *root)
    drop.unlink()
    assert rc == 1 and findings(report) == [
        ("sudo", "leak", f"/etc/sudoers.d/agent:1: #{AGENT} ALL=(ALL) NOPASSWD: ALL")
    ]

    # A setuid-root network tool.
    tree.path("/usr/bin/curl").chmod(0o4755)
    rc, report = doctor(lab, *root)
    tree.path("/usr/bin/curl").chmod(0o755)
    assert rc == 1 and findings(report) == [
        ("setuid", "leak", "/usr/bin/curl mode -rwsr-xr-x setuid root")
    ]

    # nftables.service, enabled, loading a script that flushes the ruleset.
    unit = tree.plant(
        "/lib/systemd/system/nftables.service",
        "[Service]\nExecStart=/usr/sbin/nft -f /etc/nftables.conf\n",
    )
    wants = tree.path("/etc/systemd/system/sysinit.target.wants")
    wants.mkdir(parents=True)
    (wants / "nftables.service").symlink_to("/lib/systemd/system/nftables.service")
    rc, report = doctor(lab, *root)
    shutil.rmtree(wants)
    unit.unlink()
    assert rc == 1 and findings(report) == [
        ("nftables", "warning", "/etc/nftables.conf:1: flush ruleset (nftables.service enabled)")
    ]

    # The listener port unprivileged in this namespace (the sysctl is per network namespace).
    sysctl = "net.ipv4.ip_unprivileged_port_start"
    lab.netns_exec("host", ["sysctl", "-q", "-w", f"{sysctl}={PORT}"])
    rc, report = doctor(lab, *root)
    lab.netns_exec("host", ["sysctl", "-q", "-w", f"{sysctl}=1024"])
    assert rc == 1 and findings(report) == [
        ("ports", "warning", f"/proc/sys/net/ipv4/ip_unprivileged_port_start = {PORT}, port {PORT}")
    ]

    # Every plant undone: clean again.
    assert_clean(lab, *root)

    # IPv6: egressd stopped leaves its rules in place (fail closed): still clean. Then only
    # the ip6tables jump goes (egressd, stopped, does not repair it).
    assert d.stop() == 0
    assert_clean(lab, *root, "--check", "firewall")
    lab.netns_exec("host", ["ip6tables", "-w", "-D", "OUTPUT", "-j", "EGRESSD-OUTPUT"])
    rc, report = doctor(lab, *root, "--check", "firewall")
    assert rc == 1 and findings(report) == [
        (
            "firewall",
            "leak",
            "`ip6tables -S OUTPUT` has no `-j EGRESSD-OUTPUT` (iptables has it)",
        )
    ]


LISTENER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 3128))
s.listen(8)
open(sys.argv[1], "w").close()
while True:  # echo one line per connection (agent.py connect checks the echo)
    c, _ = s.accept()
    c.settimeout(5)
    try:
        c.sendall(c.recv(64))
    except OSError:
        pass
    c.close()
"""


def test_loopback_listener_is_found_only_when_the_agent_can_reach_it(lab: Lab) -> None:
    reach = write_config(lab.tmpdir / "reach/egressd.toml", [AGENT], allow_loopback=True)
    closed = write_config(lab.tmpdir / "closed/egressd.toml", [AGENT], allow_loopback=False)
    checks = ["--check", "loopback", "--check", "firewall", "--check", "ports"]
    d = start(lab, reach)

    # No listener but egressd's own (port 153): nothing.
    assert_clean(lab, "--config", str(reach), *checks)

    ready = lab.tmpdir / "listener.ready"
    server = lab.start_process([sys.executable, "-c", LISTENER, str(ready)], name="proxy")
    assert poll(ready.exists, 10), server.stderr_text()
    # The claim is real: with allow_loopback the agent reaches it ...
    assert lab.agent("connect", "127.0.0.1", 3128)["ok"]
    rc, report = doctor(lab, "--config", str(reach), *checks)
    print(json.dumps(report, indent=2, sort_keys=True))  # docs/commands/doctor.md shows it
    assert rc == 1 and findings(report) == [
        (
            "loopback",
            "leak",
            f"tcp 127.0.0.1:3128 uid 0, pid {server.pid} ({Path(sys.executable).name[:15]})",
        )
    ]
    assert "HTTP proxy (squid)" in report["findings"][0]["what"]

    # ... and without it, it does not, and doctor says nothing.
    assert d.stop() == 0
    d = start(lab, closed)
    assert not lab.agent("connect", "127.0.0.1", 3128, 2)["ok"]
    assert_clean(lab, "--config", str(closed), *checks)

    # The listener gone: nothing with allow_loopback either.
    server.stop()
    assert_clean(lab, "--config", str(reach), *checks)


def test_human_output(lab: Lab) -> None:
    """The human form (docs/commands/doctor.md shows this run's output)."""
    lab.host_users({"agent": AGENT})
    tree = Tree(lab)
    start(lab, tree.config)
    tree.append("/etc/group", "docker:x:998:agent\n")
    tree.plant("/etc/nsswitch.conf", "hosts: files resolve [!UNAVAIL=return] dns\n")
    tree.path("/usr/bin/curl").chmod(0o4755)
    r = lab.netns_exec("host", [*DOCTOR, "--root", str(tree.root)], check=False)
    print(r.stdout)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert [line for line in lines if line and not line.startswith(" ")][:3] == [
        "LEAK [groups]",
        "LEAK [setuid]",
        "WARNING [resolver]",
    ]
    assert lines[-1] == "3 findings (2 leaks, 1 warning)"

    missing = lab.tmpdir / "missing.toml"
    r = lab.netns_exec(
        "host", [*DOCTOR, "--root", str(tree.root), "--config", str(missing)], check=False
    )
    print(r.stdout)
    assert r.returncode == 1
    assert r.stdout.startswith(f"config not loaded: {missing}: cannot read")
    assert "not checked: groups, sudo, loopback, ports" in r.stdout
