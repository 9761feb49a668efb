"""egressd doctor's checks (egressd.doctor) against files planted in temporary root trees and
fake /proc directories; iptables is a recorded fake. No root needed."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from egressd.commands import doctor as command
from egressd.doctor import (
    INFO,
    LEAK,
    WARNING,
    Agent,
    Host,
    Listener,
    UserDb,
    check_firewall,
    check_groups,
    check_nftables,
    check_ports,
    check_resolver,
    check_setuid,
    check_sudo,
    classify_helper,
    examine,
    has_jump,
    nft_flushes,
    nft_includes,
    nscd_hosts_cache,
    nsswitch_hosts,
    parse_group,
    parse_passwd,
    parse_proc_net,
    parse_sudoers,
    reachable_listeners,
    sudo_matches,
    unit_nft_files,
)
from egressd.firewall.rules import FILTER_CHAIN

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
agent:x:1000:1000::/home/agent:/bin/bash
other:x:1001:1001::/home/other:/bin/bash
"""
GROUP = """\
root:x:0:
agent:x:1000:
other:x:1001:
"""
AGENT = Agent(1000, "agent", 1000, ("agent",))


def plant(root: Path, path: str, text: str, mode: int = 0o644) -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    target.chmod(mode)
    return target


@pytest.fixture
def root() -> Iterator[Path]:
    # Short: unix socket paths (below it) must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="egd-doc-", dir="/tmp"))
    plant(path, "/etc/passwd", PASSWD)
    plant(path, "/etc/group", GROUP)
    yield path
    shutil.rmtree(path)


@contextlib.contextmanager
def listening(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen(1)
        yield
    path.unlink()


def host_at(root: Path, proc: Path | None = None, iptables: dict[int, str] | None = None) -> Host:
    out = iptables or {}

    def run(argv: Sequence[str]) -> tuple[int, str, str]:
        family = 6 if argv[0] == "ip6tables" else 4
        if family not in out:
            return 127, "", f"{argv[0]}: not found"
        return 0, out[family], ""

    return Host(root=str(root), proc=str(proc or root / "proc"), run=run)


# --- resolver ----------------------------------------------------------------------------


def test_nsswitch_hosts_line_services_without_actions_last_line_wins() -> None:
    text = (
        "# hosts: resolve in a comment\n"
        "passwd: files\n"
        "hosts: files dns\n"
        "hosts:   files mymachines resolve [!UNAVAIL=return] dns myhostname  # ubuntu\n"
    )
    n, line, services = nsswitch_hosts(text) or (0, "", ())
    assert n == 4
    assert services == ("files", "mymachines", "resolve", "dns", "myhostname")
    assert line.startswith("hosts:")
    assert nsswitch_hosts("passwd: files\n") is None
    assert "resolve" not in nsswitch_hosts("hosts: files dns # resolve\n")[2]  # type: ignore[index]


def test_nscd_hosts_cache() -> None:
    assert nscd_hosts_cache("enable-cache passwd yes\nenable-cache hosts yes\n") == (True, 2)
    assert nscd_hosts_cache("enable-cache\thosts\tno # off\n") == (False, 1)
    assert nscd_hosts_cache("# enable-cache hosts yes\n") == (False, None)


def test_resolver_clean_tree_finds_nothing(root: Path) -> None:
    plant(root, "/etc/nsswitch.conf", "hosts: files dns\n")
    plant(root, "/etc/nscd.conf", "enable-cache hosts yes\n")
    assert check_resolver(host_at(root)) == []


def test_nss_resolve_without_resolved_running_is_a_warning(root: Path) -> None:
    plant(root, "/etc/nsswitch.conf", "passwd: files\nhosts: files resolve dns\n")
    # A stale socket file (nobody listens) is not a running resolved.
    (root / "run/systemd/resolve").mkdir(parents=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "run/systemd/resolve/io.systemd.Resolve"))
    s.close()
    (f,) = check_resolver(host_at(root))
    assert f.severity == WARNING and f.check == "resolver"
    assert f.evidence == "/etc/nsswitch.conf:2: hosts: files resolve dns"
    assert "not granted" in f.what and "`resolve`" in f.fix


def test_nss_resolve_with_resolved_listening_is_two_leaks(root: Path) -> None:
    plant(root, "/etc/nsswitch.conf", "hosts: files resolve [!UNAVAIL=return] dns\n")
    with listening(root / "run/systemd/resolve/io.systemd.Resolve"):
        found = check_resolver(host_at(root))
    assert [f.severity for f in found] == [LEAK, LEAK]
    assert found[0].evidence.startswith("/etc/nsswitch.conf:1:")
    assert found[1].evidence == "/run/systemd/resolve/io.systemd.Resolve (listening)"
    assert "mask systemd-resolved" in found[1].fix


def test_nscd_socket_with_hosts_cache_is_a_leak_without_it_nothing(root: Path) -> None:
    plant(root, "/etc/nsswitch.conf", "hosts: files dns\n")
    conf = plant(root, "/etc/nscd.conf", "# nscd\nenable-cache hosts yes\n")
    with listening(root / "var/run/nscd/socket"):
        (f,) = check_resolver(host_at(root))
        assert f.severity == LEAK
        assert (
            f.evidence
            == "/var/run/nscd/socket (listening); /etc/nscd.conf:2 enables its hosts cache"
        )
        conf.write_text("enable-cache hosts no\n")
        assert check_resolver(host_at(root)) == []


# --- users, groups, sudo -------------------------------------------------------------------


def test_parse_passwd_and_group() -> None:
    assert parse_passwd(PASSWD + "+nis\nbad line\n")[1000] == ("agent", 1000, 2)
    groups = parse_group("docker:x:999:other, agent\n#c:x:1:\nsudo:x:27:\n")
    assert groups == [("docker", 999, ("other", "agent"), 1), ("sudo", 27, (), 3)]


def test_groups_of_primary_and_member(root: Path) -> None:
    plant(root, "/etc/group", GROUP + "docker:x:999:other,agent\nstaff:x:50:agent\n")
    plant(root, "/etc/passwd", PASSWD.replace("agent:x:1000:1000", "agent:x:1000:50"))
    users = UserDb(host_at(root))
    agent = Agent(1000, "agent", 50, ("agent",))
    groups = {g.name: g.evidence for g in users.groups_of(agent)}
    assert groups == {"staff": "/etc/group:5 (primary group)", "docker": "/etc/group:4"}
    assert users.user(1000) == ("agent", 50)
    assert users.user(4242) is None  # a numeric uid without passwd entry: no groups, no name


def test_check_groups_risky_and_admin(root: Path) -> None:
    plant(root, "/etc/group", GROUP + "docker:x:999:agent\nsudo:x:27:agent\nadm:x:4:agent\n")
    users = UserDb(host_at(root))
    found = check_groups([AGENT], users, set())
    # by gid: sudo (27) before docker (999); adm is not a way around egressd
    assert [(f.severity, f.evidence) for f in found] == [
        (WARNING, "/etc/group:5"),
        (LEAK, "/etc/group:4"),
    ]
    assert "docker" in found[1].what and "gpasswd -d agent docker" in found[1].fix
    # sudo already reported the %sudo line: not again
    assert [f.evidence for f in check_groups([AGENT], users, {"sudo"})] == ["/etc/group:4"]
    plant(root, "/etc/group", GROUP + "docker:x:999:other\n")
    assert check_groups([AGENT], UserDb(host_at(root)), set()) == []


def test_parse_sudoers_lines_continuations_uid_specs_aliases_includes(root: Path) -> None:
    plant(
        root,
        "/etc/sudoers",
        "Defaults env_reset\n"
        "# a comment naming agent\n"
        "root ALL=(ALL:ALL) ALL\n"
        "User_Alias BOTS = agent, %robots : OTHERS = other\n"
        "Cmnd_Alias X = /bin/true\n"
        "%sudo   ALL=(ALL:ALL) ALL\n"
        "#1000 ALL=(ALL) NOPASSWD: ALL\n"
        "alice, bob host1, host2 = \\\n    NOPASSWD: /usr/bin/apt\n"
        "#include extra\n"
        "@includedir /etc/sudoers.d\n",
    )
    plant(root, "/etc/extra", "BOTS ALL = /usr/bin/id  # why\n")
    plant(root, "/etc/sudoers.d/agent", "agent ALL=(root) NOPASSWD: ALL\n")
    plant(root, "/etc/sudoers.d/skipped.conf", "agent ALL=(ALL) ALL\n")
    plant(root, "/etc/sudoers.d/backup~", "agent ALL=(ALL) ALL\n")
    host = host_at(root)

    def read(path: str) -> str | None:
        try:
            return Path(host.path(path)).read_text()
        except OSError:
            return None

    s = parse_sudoers("/etc/sudoers", read, lambda p: os.listdir(host.path(p)))
    assert [(line.where, line.users, line.nopasswd) for line in s.lines] == [
        ("/etc/sudoers:3", ("root",), False),
        ("/etc/sudoers:6", ("%sudo",), False),
        ("/etc/sudoers:7", ("#1000",), True),
        ("/etc/sudoers:8", ("alice", "bob"), True),
        ("/etc/extra:1", ("BOTS",), False),
        ("/etc/sudoers.d/agent:1", ("agent",), True),
    ]
    assert s.aliases == {"BOTS": ("agent", "%robots"), "OTHERS": ("other",)}
    assert s.problems == ()


def test_sudo_matches_items() -> None:
    from egressd.doctor import Group

    groups = [Group("agent", 1000, ""), Group("robots", 700, "")]
    aliases = {"BOTS": ("%robots",), "NOBODY": ("nobody",)}
    assert sudo_matches(["agent"], AGENT, groups, aliases) == "agent"
    assert sudo_matches(["%robots"], AGENT, groups, aliases) == "%robots"
    assert sudo_matches(["%#700"], AGENT, groups, aliases) == "%#700"
    assert sudo_matches(["#1000"], AGENT, groups, aliases) == "#1000"
    assert sudo_matches(["BOTS"], AGENT, groups, aliases) == "BOTS"
    assert sudo_matches(["ALL"], AGENT, groups, aliases) == "ALL"
    assert sudo_matches(["ALL", "!agent"], AGENT, groups, aliases) is None
    assert (
        sudo_matches(["%sudo", "other", "NOBODY", "#1001", "%#27"], AGENT, groups, aliases) is None
    )


def test_check_sudo_reports_lines_and_groups(root: Path) -> None:
    plant(root, "/etc/group", GROUP + "sudo:x:27:agent\n")
    plant(
        root,
        "/etc/sudoers",
        "root ALL=(ALL:ALL) ALL\n%sudo ALL=(ALL:ALL) ALL\n@includedir /etc/sudoers.d\n",
        0o440,
    )
    plant(root, "/etc/sudoers.d/agent", "agent ALL=(root) NOPASSWD: /usr/bin/apt-get\n", 0o440)
    users = UserDb(host_at(root))
    found, groups = check_sudo(host_at(root), [AGENT], users)
    assert groups == {"sudo"}
    assert [(f.severity, f.evidence) for f in found] == [
        (WARNING, "/etc/sudoers:2: %sudo ALL=(ALL:ALL) ALL"),
        (LEAK, "/etc/sudoers.d/agent:1: agent ALL=(root) NOPASSWD: /usr/bin/apt-get"),
    ]
    assert "gpasswd -d agent sudo" in found[0].fix
    # An include that cannot be read is said, not ignored.
    plant(root, "/etc/sudoers", "#include /etc/missing\n")
    found, _ = check_sudo(host_at(root), [AGENT], users)
    assert [(f.severity, f.evidence) for f in found] == [(WARNING, "cannot read /etc/missing")]
    os.unlink(root / "etc/sudoers")
    assert check_sudo(host_at(root), [AGENT], users) == ([], set())


# --- setuid --------------------------------------------------------------------------------


def test_classify_helper() -> None:
    assert classify_helper("curl")[0] == LEAK  # type: ignore[index]
    assert classify_helper("python3.11")[0] == LEAK  # type: ignore[index]
    assert classify_helper("exim4")[0] == WARNING  # type: ignore[index]
    assert classify_helper("mount.nfs")[0] == WARNING  # type: ignore[index]
    assert classify_helper("ping")[0] == INFO  # type: ignore[index]
    assert classify_helper("passwd") is None
    assert classify_helper("curling") is None


def test_check_setuid_flags_known_network_helpers_only(root: Path) -> None:
    plant(root, "/usr/bin/curl", "x", 0o4755)
    plant(root, "/usr/bin/ping", "x", 0o4755)
    plant(root, "/usr/bin/passwd", "x", 0o4755)  # setuid, not a network tool
    plant(root, "/usr/bin/wget", "x", 0o755)  # a network tool, not setuid
    plant(root, "/usr/lib/openssh/ssh-keysign", "x", 0o4755)
    plant(root, "/usr/lib/foo/nc", "x", 0o4755)  # helper dirs, one level down
    os.symlink("/usr/bin/curl", root / "usr/bin/curl2")  # symlinks are not followed
    found = check_setuid(host_at(root), set())
    assert [(f.severity, f.evidence.split()[0]) for f in found] == [
        (LEAK, "/usr/bin/curl"),
        (INFO, "/usr/bin/ping"),
        (LEAK, "/usr/lib/foo/nc"),
    ]
    assert "-rwsr-xr-x" in found[0].evidence
    assert "cap_net_raw" in found[1].fix
    # A file setuid to a restricted uid gives nothing the agent lacks.
    assert len(check_setuid(host_at(root), {os.getuid()})) == 0


def test_setgid_mta_helper(root: Path) -> None:
    plant(root, "/usr/sbin/postdrop", "x", 0o2555)
    plant(root, "/usr/bin/ping", "x", 0o2755)  # setgid ping: nothing
    (f,) = check_setuid(host_at(root), set())
    assert f.severity == WARNING and "setgid" in f.what and "relays" in f.what


# --- loopback listeners --------------------------------------------------------------------

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0C38 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0
   1: 3500007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000   991        0 1002 1 0
   2: 0100007F:9C40 0100007F:0C38 01 00000000:00000000 00:00000000 00000000  1000        0 1003 1 0
   3: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1004 1 0
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0099 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0
   1: B80D0120000000000000000002000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   33        0 2002 1 0
"""  # noqa: E501
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 0100007F:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000   105        0 3001 2 0 0
  101: 0100007F:A1B2 08080808:0035 01 00000000:00000000 00:00000000 00000000     0        0 3002 2 0 0
"""  # noqa: E501


def test_parse_proc_net() -> None:
    tcp = parse_proc_net(TCP, "tcp")
    assert [(str(s), s.uid, s.inode) for s in tcp] == [
        ("tcp 127.0.0.1:3128", 0, 1001),
        ("tcp 127.0.0.53:53", 991, 1002),
        ("tcp 0.0.0.0:8080", 1000, 1004),
    ]
    assert [str(s) for s in parse_proc_net(TCP6, "tcp")] == [
        "tcp [::1]:153",
        "tcp [2001:db8::2]:8080",
    ]
    # Unconnected UDP only: the connected client socket is not a listener.
    assert [str(s) for s in parse_proc_net(UDP, "udp")] == ["udp 127.0.0.1:5353"]


def test_reachable_listeners_skip_port_53_egressd_and_the_agents_own() -> None:
    found = parse_proc_net(TCP, "tcp") + parse_proc_net(TCP6, "tcp") + parse_proc_net(UDP, "udp")
    got = reachable_listeners(found, own_ports={153}, restricted={1000})
    assert [str(s) for s in got] == [
        "tcp 127.0.0.1:3128",
        "udp 127.0.0.1:5353",
        "tcp [2001:db8::2]:8080",
    ]
    dup = Listener("tcp", ipaddress.ip_address("127.0.0.1"), 3128, 0, 9)
    assert len(reachable_listeners([*found, dup], {153}, {1000})) == 3


# --- nftables ------------------------------------------------------------------------------


def test_nft_flushes_and_includes() -> None:
    text = (
        "#!/usr/sbin/nft -f\n"
        "# flush ruleset (commented)\n"
        "flush ruleset\n"
        "flush table inet filter\n"
        'include "/etc/nftables.d/*.nft"\n'
        "table inet t { }; flush ruleset\n"
    )
    assert nft_flushes(text) == [(3, "flush ruleset"), (6, "table inet t { }; flush ruleset")]
    assert nft_includes(text) == ["/etc/nftables.d/*.nft"]


def test_unit_nft_files() -> None:
    unit = (
        "[Service]\n"
        "ExecStart=/usr/sbin/nft -f /etc/nftables.conf\n"
        "ExecReload=-/usr/sbin/nft --file=/etc/other.nft\n"
        "ExecStop=/usr/sbin/nft flush ruleset\n"
    )
    assert unit_nft_files(unit) == ["/etc/nftables.conf", "/etc/other.nft"]


def test_check_nftables(root: Path) -> None:
    host = host_at(root)
    plant(root, "/etc/nftables.conf", "flush ruleset\n")
    assert check_nftables(host) == []  # no unit runs it
    plant(
        root,
        "/lib/systemd/system/nftables.service",
        "ExecStart=/usr/sbin/nft -f /etc/nftables.conf\n",
    )
    (f,) = check_nftables(host)
    assert f.severity == INFO and f.evidence == (
        "/etc/nftables.conf:1: flush ruleset (nftables.service installed, not enabled)"
    )
    wants = root / "etc/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True)
    os.symlink(root / "lib/systemd/system/nftables.service", wants / "nftables.service")
    (f,) = check_nftables(host)
    assert f.severity == WARNING and "enabled)" in f.evidence and "flush table" in f.fix
    # A drop-in pointing at another script, which includes the flush.
    plant(root, "/etc/nftables.conf", "flush table inet filter\n")
    assert check_nftables(host) == []
    plant(
        root,
        "/etc/systemd/system/nftables.service.d/x.conf",
        "[Service]\nExecReload=\nExecReload=/usr/sbin/nft -f /etc/fw/main.nft\n",
    )
    plant(root, "/etc/fw/main.nft", 'include "parts/*.nft"\n')
    plant(root, "/etc/fw/parts/a.nft", "table ip x {}\n\nflush ruleset\n")
    assert [f.evidence.split(" (")[0] for f in check_nftables(host)] == [
        "/etc/fw/parts/a.nft:3: flush ruleset"
    ]


# --- firewall, ports -----------------------------------------------------------------------

JUMP = f"-P OUTPUT ACCEPT\n-A OUTPUT -j {FILTER_CHAIN}\n"


def fake_proc(root: Path, *, ipv6: bool = True, port_start: int = 1024) -> Path:
    proc = root / "proc"
    plant(proc, "/sys/net/ipv6/conf/all/disable_ipv6", "0\n" if ipv6 else "1\n")
    plant(proc, "/net/if_inet6", "00000000000000000000000000000001 01 80 10 80       lo\n")
    plant(proc, "/sys/net/ipv4/ip_unprivileged_port_start", f"{port_start}\n")
    return proc


def test_has_jump() -> None:
    assert has_jump(JUMP)
    assert not has_jump(f"-A OUTPUT -o lo -j {FILTER_CHAIN}\n-A OUTPUT -j {FILTER_CHAIN}X\n")


def test_check_firewall(root: Path) -> None:
    proc = fake_proc(root)
    both = host_at(root, proc, {4: JUMP, 6: JUMP})
    assert check_firewall(both, configured=True) == []
    v4_only = host_at(root, proc, {4: JUMP, 6: "-P OUTPUT ACCEPT\n"})
    (f,) = check_firewall(v4_only, configured=True)
    assert f.severity == LEAK and "IPv6" in f.what and "ip6tables -S OUTPUT" in f.evidence
    no_ip6tables = host_at(root, proc, {4: JUMP})
    assert "failed" in check_firewall(no_ip6tables, configured=True)[0].evidence
    # IPv6 disabled: nothing to filter.
    assert check_firewall(host_at(root, fake_proc(root, ipv6=False), {4: JUMP, 6: ""}), True) == []
    # Neither family: egressd is not in place (said only when a config names restricted users).
    neither = host_at(root, proc, {4: "-P OUTPUT ACCEPT\n", 6: "-P OUTPUT ACCEPT\n"})
    assert [f.severity for f in check_firewall(neither, configured=True)] == [LEAK]
    assert check_firewall(neither, configured=False) == []


CONFIG = """\
[daemon]
upstreams = ["192.0.2.1"]
{daemon}

[profiles.agent]
users = ["agent"]
allow = ["example.com"]
port = 153
{profile}
"""


def write_config(root: Path, profile: str = "", daemon: str = "") -> Path:
    return plant(root, "/etc/egressd/egressd.toml", CONFIG.format(profile=profile, daemon=daemon))


def test_check_ports(root: Path) -> None:
    write_config(root)
    host = host_at(root, fake_proc(root, port_start=100))
    report = examine(host, str(root / "etc/egressd/egressd.toml"), ["ports"])
    (f,) = report.findings
    assert f.severity == WARNING and "= 100" in f.evidence and "port 153" in f.evidence
    host = host_at(root, fake_proc(root, port_start=154))
    assert examine(host, str(root / "etc/egressd/egressd.toml"), ["ports"]).findings == ()
    from egressd.doctor import load_config

    config = load_config(str(root / "etc/egressd/egressd.toml"), UserDb(host))
    assert check_ports(host_at(root, fake_proc(root, port_start=153)), config)


def test_loopback_listeners_only_with_allow_loopback(root: Path) -> None:
    proc = fake_proc(root)
    plant(proc, "/net/tcp", TCP)
    plant(proc, "/net/udp", UDP)
    config = str(write_config(root, profile="allow_loopback = true"))
    found = examine(host_at(root, proc), config, ["loopback"]).findings
    # 3128 (squid's port): leak; 5353: leak (a DNS port); the agent's own :8080 and :53: nothing.
    assert [(f.severity, f.evidence.split(" uid")[0]) for f in found] == [
        (LEAK, "tcp 127.0.0.1:3128"),
        (LEAK, "udp 127.0.0.1:5353"),
    ]
    assert "allow_loopback = false" in found[0].fix
    plant(proc, "/net/tcp", TCP.replace(":0C38 00000000:0000 0A", ":1A0A 00000000:0000 0A"))
    found = examine(host_at(root, proc), config, ["loopback"]).findings
    assert [(f.severity, f.evidence.split(" uid")[0]) for f in found] == [
        (LEAK, "udp 127.0.0.1:5353"),
        (WARNING, "tcp 127.0.0.1:6666"),
    ]
    assert "owner process not found" in found[1].evidence
    config = str(write_config(root, profile="allow_loopback = false"))
    assert examine(host_at(root, proc), config, ["loopback"]).findings == ()


# --- the whole report and the command ------------------------------------------------------


def run_command(root: Path, *extra: str) -> tuple[int, str]:
    import io
    from contextlib import redirect_stdout

    ns = argparse.Namespace(root=str(root), config=None, check=None, json="--json" in extra)
    if "--check" in extra:
        ns.check = [extra[extra.index("--check") + 1]]
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = command.run(ns)
    return rc, buf.getvalue()


def test_command_config_missing_says_so_and_runs_the_rest(root: Path) -> None:
    plant(root, "/etc/nsswitch.conf", "hosts: files resolve dns\n")
    rc, out = run_command(root, "--check", "resolver")
    assert rc == 1
    assert out.startswith("config not loaded: ") and "cannot read" in out
    assert "WARNING [resolver]" in out and out.endswith("1 finding (1 warning)\n")
    plant(root, "/etc/nsswitch.conf", "hosts: files dns\n")
    rc, out = run_command(root, "--check", "resolver")
    assert rc == 2 and out.endswith("no findings\n")
    rc, out = run_command(root, "--json")
    data = json.loads(out)
    assert data["config_error"] and {s["check"] for s in data["skipped"]} == {
        "groups",
        "sudo",
        "loopback",
        "ports",
    }


def test_command_json_and_exit_codes_with_config(root: Path) -> None:
    write_config(root)
    plant(root, "/etc/group", GROUP + "docker:x:999:agent\n")
    rc, out = run_command(root, "--json", "--check", "groups")
    data = json.loads(out)
    assert rc == 1 and data["count"] == 1 and data["config_error"] is None
    assert data["findings"][0] | {"what": ""} == {
        "check": "groups",
        "severity": "leak",
        "what": "",
        "evidence": "/etc/group:4",
        "fix": "remove the user from it: `gpasswd -d agent docker`",
    }
    plant(root, "/etc/group", GROUP)
    rc, out = run_command(root, "--check", "groups")
    assert rc == 0 and out == "checked: groups\nno findings\n"


def test_command_usage_error_on_missing_root(tmp_path: Path) -> None:
    ns = argparse.Namespace(root=str(tmp_path / "nope"), config=None, check=None, json=False)
    assert command.run(ns) == 2


def test_add_parser() -> None:
    ap = argparse.ArgumentParser()
    command.add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(
        ["doctor", "--root", "/x", "--check", "sudo", "--check", "setuid", "--json"]
    )
    assert (args.root, args.check, args.json, args.config) == ("/x", ["sudo", "setuid"], True, None)
    with pytest.raises(SystemExit):
        ap.parse_args(["doctor", "--check", "nope"])


def test_setuid_mode_bits_survive_plant(root: Path) -> None:
    # The planted setuid files above rely on the owner being allowed to set the bit.
    f = plant(root, "/usr/bin/x", "x", 0o4755)
    assert f.stat().st_mode & stat.S_ISUID


def test_an_info_is_shown_but_does_not_fail_the_command(root: Path) -> None:
    config = '[daemon]\nupstreams = ["192.0.2.53"]\n[profiles.agent]\nusers = [64123]\n'
    plant(root, "/etc/egressd/egressd.toml", config)
    plant(root, "/etc/nftables.conf", "flush ruleset\n")
    unit = "ExecStart=/usr/sbin/nft -f /etc/nftables.conf\n"
    plant(root, "/lib/systemd/system/nftables.service", unit)
    rc, out = run_command(root, "--check", "nftables")
    assert rc == 0 and "INFO [nftables]" in out, out
    wants = root / "etc/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True)
    os.symlink(root / "lib/systemd/system/nftables.service", wants / "nftables.service")
    rc, out = run_command(root, "--check", "nftables")  # the twin: enabled, a warning
    assert rc == 1 and "WARNING [nftables]" in out, out
