"""``egressd doctor``: the host's ways around egressd, each with its fix.

egressd restricts the agent's own sockets (an owner match on its uids) and its port-53
DNS. Whatever acts for the agent under another uid, or answers names without port 53, is
outside that: a resolver daemon reached over a unix socket, a root-equivalent group, sudo,
a setuid network tool, a local proxy when loopback is allowed, a firewall reload that
flushes everything, an unfiltered IPv6, a listener port anyone may bind.

File checks read below ``root`` (so tests plant problems in a directory tree); the socket,
sysctl and iptables checks look at the current network namespace. The parsers are pure
functions; the ``check_*`` functions do the reading. A check never changes anything.
"""

from __future__ import annotations

import contextlib
import glob
import grp
import ipaddress
import os
import pwd
import re
import shlex
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .config import Config
from .errors import ConfigError
from .firewall.rules import FILTER_CHAIN
from .sources import Sources, load

LEAK = "leak"  # the agent can get data or connections past egressd
WARNING = "warning"  # egressd's guarantees weaken (a window, a start failure, a condition)
INFO = "info"  # a small covert channel or a hazard nobody triggers by default
SEVERITIES = (LEAK, WARNING, INFO)


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # the check that found it (a name of CHECKS)
    severity: str  # LEAK | WARNING | INFO
    what: str  # what was found and why it matters
    evidence: str  # where: file:line, a socket path, a group, a port
    fix: str


@dataclass(frozen=True, slots=True)
class Agent:
    """A restricted user as doctor sees it: uid, passwd name (if any) and profiles."""

    uid: int
    name: str | None
    gid: int | None
    profiles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    gid: int
    evidence: str  # file:line of the membership, or where it came from


@dataclass(frozen=True)
class Host:
    """Where the checks look. ``root`` is for files; /proc and iptables are the namespace's."""

    root: str = "/"
    proc: str = "/proc"
    # argv -> (returncode, stdout, stderr); returncode 127 when the program is missing.
    run: Callable[[Sequence[str]], tuple[int, str, str]] = field(
        default_factory=lambda: _run_program
    )

    def path(self, absolute: str) -> str:
        """``absolute`` below the root ("/etc/group" -> "<root>/etc/group")."""
        if self.root in ("", "/"):
            return absolute
        return os.path.join(self.root, absolute.lstrip("/"))

    def show(self, path: str) -> str:
        """A path below the root as the host knows it (for evidence): "/etc/group"."""
        if self.root in ("", "/"):
            return path
        rel = os.path.relpath(path, self.root)
        return "/" + rel if not rel.startswith("..") else path


def _run_program(argv: Sequence[str]) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as err:
        return 127, "", str(err)
    except (OSError, subprocess.TimeoutExpired) as err:
        return 126, "", str(err)
    return proc.returncode, proc.stdout, proc.stderr


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


# --- config and users ------------------------------------------------------------------------


def parse_passwd(text: str) -> dict[int, tuple[str, int, int]]:
    """uid -> (name, primary gid, line number); the first entry of a uid wins (as getpwuid)."""
    out: dict[int, tuple[str, int, int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split(":")
        if len(parts) < 4 or line.startswith(("#", "+", "-")):
            continue
        with contextlib.suppress(ValueError):
            uid, gid = int(parts[2]), int(parts[3])
            out.setdefault(uid, (parts[0], gid, n))
    return out


def parse_group(text: str) -> list[tuple[str, int, tuple[str, ...], int]]:
    """(name, gid, members, line number) per line of an /etc/group."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split(":")
        if len(parts) < 4 or line.startswith(("#", "+", "-")):
            continue
        with contextlib.suppress(ValueError):
            members = tuple(m.strip() for m in parts[3].split(",") if m.strip())
            out.append((parts[0], int(parts[2]), members, n))
    return out


class UserDb:
    """passwd and group below the root; for the real root ("/") also NSS (LDAP, sssd),
    as egressd itself looks users up through NSS."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.nss = host.root in ("", "/")
        self.passwd_path = host.path("/etc/passwd")
        self.group_path = host.path("/etc/group")
        self.passwd = parse_passwd(_read(self.passwd_path) or "")
        self.groups = parse_group(_read(self.group_path) or "")

    def lookup_user(self, name: str) -> int:
        for uid, (n, _, _) in self.passwd.items():
            if n == name:
                return uid
        if self.nss:
            return pwd.getpwnam(name).pw_uid
        raise KeyError(name)

    def lookup_name(self, uid: int) -> str | None:
        entry = self.user(uid)
        return entry[0] if entry else None

    def user(self, uid: int) -> tuple[str, int] | None:
        """(name, primary gid) of a uid, or None."""
        if uid in self.passwd:
            name, gid, _ = self.passwd[uid]
            return name, gid
        if self.nss:
            with contextlib.suppress(KeyError):
                pw = pwd.getpwuid(uid)
                return pw.pw_name, pw.pw_gid
        return None

    def groups_of(self, agent: Agent) -> list[Group]:
        """The agent's groups: the primary one, every group line naming it, and (real root)
        what NSS adds."""
        out: dict[int, Group] = {}
        shown = self.host.show(self.group_path)
        for name, gid, members, n in self.groups:
            if agent.gid == gid and gid not in out:
                out[gid] = Group(name, gid, f"{shown}:{n} (primary group)")
            elif agent.name is not None and agent.name in members and gid not in out:
                out[gid] = Group(name, gid, f"{shown}:{n}")
        if self.nss and agent.name is not None and agent.gid is not None:
            with contextlib.suppress(KeyError, OSError):
                for gid in os.getgrouplist(agent.name, agent.gid):
                    if gid not in out:
                        with contextlib.suppress(KeyError):
                            out[gid] = Group(grp.getgrgid(gid).gr_name, gid, "group database (NSS)")
        return sorted(out.values(), key=lambda g: g.gid)


def load_config(path: str, users: UserDb) -> Config:
    """egressd's config, its users looked up in the root's passwd (ConfigError if it fails)."""
    host = users.host
    sources = Sources(
        lookup_user=users.lookup_user,
        lookup_name=users.lookup_name,
        resolv_conf=host.path("/etc/resolv.conf"),
        subuid_file=host.path("/etc/subuid"),
        host_path=host.path,
    )
    return load(path, sources)


def agents_of(config: Config, users: UserDb) -> list[Agent]:
    agents: dict[int, Agent] = {}
    for p in config.profiles:
        for uid in p.uids:
            entry = users.user(uid)
            prev = agents.get(uid)
            profiles = (*prev.profiles, p.name) if prev else (p.name,)
            agents[uid] = Agent(
                uid, entry[0] if entry else None, entry[1] if entry else None, profiles
            )
    return list(agents.values())


def _who(agent: Agent) -> str:
    name = f"{agent.name} (uid {agent.uid})" if agent.name else f"uid {agent.uid}"
    return f"{name}, profile {', '.join(agent.profiles)}"


# --- resolver: nss-resolve, systemd-resolved's API, nscd -------------------------------------

RESOLVED_VARLINK = "/run/systemd/resolve/io.systemd.Resolve"
NSCD_SOCKETS = ("/var/run/nscd/socket", "/run/nscd/socket")


def nsswitch_hosts(text: str) -> tuple[int, str, tuple[str, ...]] | None:
    """The ``hosts:`` line of an nsswitch.conf: (line number, the line, its services).

    Action items (``[!UNAVAIL=return]``) are not services. The last hosts line wins, as
    in glibc."""
    found = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        key, sep, rest = line.partition(":")
        if not sep or key.strip() != "hosts":
            continue
        services = tuple(re.sub(r"\[[^\]]*\]", " ", rest).split())
        found = (n, line, services)
    return found


def nscd_hosts_cache(text: str) -> tuple[bool, int | None]:
    """Whether nscd caches hosts (``enable-cache hosts yes``; nscd's default is no) and
    the deciding line."""
    enabled, line = False, None
    for n, raw in enumerate(text.splitlines(), 1):
        parts = raw.split("#", 1)[0].split()
        if len(parts) >= 3 and parts[0] == "enable-cache" and parts[1] == "hosts":
            enabled, line = parts[2].lower() == "yes", n
    return enabled, line


def socket_answers(path: str) -> bool:
    """Something accepts connections on this unix socket (not just a stale file)."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(path)
        return True
    except OSError:
        return False


_NOT_GRANTED = (
    "The addresses of such an answer are still not granted (connections to them are "
    "rejected), but the name itself leaves the host in the resolver's own query: "
    "`<secret>.attacker.example` is a DNS exfiltration path egressd never sees."
)


def check_resolver(host: Host) -> list[Finding]:
    findings = []
    varlink = host.path(RESOLVED_VARLINK)
    resolved_up = socket_answers(varlink)
    nss_path = host.path("/etc/nsswitch.conf")
    hosts = nsswitch_hosts(_read(nss_path) or "")
    if hosts and "resolve" in hosts[2]:
        n, line, _ = hosts
        state = (
            "systemd-resolved answers on its varlink socket now"
            if resolved_up
            else "systemd-resolved does not answer now; glibc falls back to the next service "
            "until it runs"
        )
        findings.append(
            Finding(
                "resolver",
                LEAK if resolved_up else WARNING,
                "glibc resolves host names through nss-resolve: systemd-resolved's varlink API "
                f"({RESOLVED_VARLINK}), not port 53, so egressd's redirect never sees these "
                f"lookups ({state}). {_NOT_GRANTED}",
                f"{host.show(nss_path)}:{n}: {line}",
                "drop `resolve` from the hosts: line (e.g. `hosts: files dns`), so glibc "
                "sends port-53 queries that egressd answers",
            )
        )
    if resolved_up:
        findings.append(
            Finding(
                "resolver",
                LEAK,
                "systemd-resolved answers every local user on its varlink socket (and on "
                "D-Bus, org.freedesktop.resolve1): the agent can ask it directly "
                f"(`resolvectl query NAME`), whatever nsswitch.conf says. {_NOT_GRANTED}",
                f"{RESOLVED_VARLINK} (listening)",
                "stop and mask systemd-resolved on a host with a restricted agent "
                "(`systemctl disable --now systemd-resolved; systemctl mask systemd-resolved`) "
                "and list real nameservers in /etc/resolv.conf",
            )
        )
    conf_path = host.path("/etc/nscd.conf")
    cache, cache_line = nscd_hosts_cache(_read(conf_path) or "")
    for sock in NSCD_SOCKETS:
        if not socket_answers(host.path(sock)):
            continue
        if not cache:
            break  # nscd runs but does not resolve hosts: glibc asks DNS itself
        where = (
            f"; {host.show(conf_path)}:{cache_line} enables its hosts cache" if cache_line else ""
        )
        findings.append(
            Finding(
                "resolver",
                LEAK,
                "nscd caches host names: glibc asks it over a unix socket, and nscd resolves "
                f"as its own user, past egressd's port-53 redirect. {_NOT_GRANTED}",
                f"{sock} (listening){where}",
                "disable nscd's hosts cache (`enable-cache hosts no` in /etc/nscd.conf, then "
                "restart nscd), or stop and mask nscd",
            )
        )
        break
    return findings


# --- groups and sudo -------------------------------------------------------------------------

# Groups that make their members root, or let them start something that runs as another
# uid with its own network (an unrestricted container or VM). Why, per group:
RISKY_GROUPS = {
    "docker": "root-equivalent: `docker run` starts containers whose traffic is forwarded, "
    "never the agent's own, and `--net=host --privileged` is root on the host",
    "lxd": "root-equivalent: LXD containers (and privileged ones) run with their own network, "
    "outside the agent's uid",
    "incus-admin": "root-equivalent: Incus containers run with their own network, outside "
    "the agent's uid",
    "libvirt": "root-equivalent: manages the system libvirtd (qemu:///system), whose VMs' "
    "traffic is not the agent's",
    "disk": "raw read and write access to block devices: any file, root's included, can be "
    "read or rewritten, which is root",
    "lpadmin": "can add a printer whose device URI is any host: cupsd (not the agent) "
    "then sends the agent's print jobs there",
}
# Administrators by convention: sudoers usually grants them everything (%sudo, %wheel,
# %admin) and polkit takes them as admins (pkexec). The sudo check reports the sudoers
# line; without one, the membership alone is reported.
ADMIN_GROUPS = ("sudo", "wheel", "admin")


def check_groups(agents: Sequence[Agent], users: UserDb, sudo_groups: set[str]) -> list[Finding]:
    findings = []
    for agent in agents:
        for g in users.groups_of(agent):
            if g.name in RISKY_GROUPS:
                findings.append(
                    Finding(
                        "groups",
                        LEAK,
                        f"{_who(agent)} is in group {g.name}: {RISKY_GROUPS[g.name]}",
                        g.evidence,
                        f"remove the user from it: `gpasswd -d {agent.name or agent.uid} {g.name}`",
                    )
                )
            elif g.name in ADMIN_GROUPS and g.name not in sudo_groups:
                findings.append(
                    Finding(
                        "groups",
                        WARNING,
                        f"{_who(agent)} is in group {g.name}, an administrators' group: polkit "
                        "(pkexec) and a %-line in sudoers make it root given the user's password",
                        g.evidence,
                        f"remove the user from it: `gpasswd -d {agent.name or agent.uid} {g.name}`",
                    )
                )
    return findings


@dataclass(frozen=True, slots=True)
class SudoLine:
    where: str  # file:line
    text: str  # the line, continuation lines joined
    users: tuple[str, ...]  # the User_List items as written ("alice", "%sudo", "#1000", "!bob")
    nopasswd: bool


@dataclass(frozen=True, slots=True)
class Sudoers:
    lines: tuple[SudoLine, ...]
    aliases: dict[str, tuple[str, ...]]  # User_Alias NAME -> items
    problems: tuple[str, ...]  # includes that could not be read


_INCLUDE = re.compile(r"^[#@](include|includedir)\s+(.+?)\s*$")
_DIRECTIVE = ("Defaults", "Host_Alias", "Runas_Alias", "Cmnd_Alias", "Cmd_Alias")


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines with backslash continuations joined, numbered by their first line."""
    buf, first = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        if not buf:
            first = n
        if raw.endswith("\\"):
            buf += raw[:-1] + " "
            continue
        yield first, buf + raw
        buf = ""
    if buf:
        yield first, buf


def _strip_comment(line: str) -> str:
    # `#` starts a comment except as a uid (`#1000`) or gid (`%#1000`) in a user list.
    return re.sub(r"(^|[\s,=(:!])#(?!\d).*$", r"\1", line).strip()


def _split_users(spec: str) -> tuple[tuple[str, ...], str]:
    """A user spec's User_List (comma-separated, spaces allowed around commas) and the rest."""
    m = re.match(r"\s*([^\s,]+(?:\s*,\s*[^\s,]+)*)\s+(.*)$", spec)
    if not m:
        return (), spec
    return tuple(i.strip() for i in m.group(1).split(",")), m.group(2)


def parse_sudoers(
    path: str, read: Callable[[str], str | None], listdir: Callable[[str], list[str]]
) -> Sudoers:
    """Every user specification of a sudoers file and what it includes (sudo's rules:
    relative includes are relative to the including file; an includedir skips names with
    a dot or ending in ``~``). Paths are the host's; ``read`` and ``listdir`` find them."""
    lines: list[SudoLine] = []
    aliases: dict[str, tuple[str, ...]] = {}
    problems: list[str] = []

    def visit(file: str, depth: int) -> None:
        text = read(file)
        if text is None:
            problems.append(f"cannot read {file}")
            return
        for n, raw in _logical_lines(text):
            stripped = raw.strip()
            inc = _INCLUDE.match(stripped)
            if inc:
                target = inc.group(2).strip('"')
                if not os.path.isabs(target):
                    target = os.path.join(os.path.dirname(file), target)
                if depth >= 128:
                    problems.append(f"{file}:{n}: includes nested too deep")
                elif inc.group(1) == "include":
                    visit(target, depth + 1)
                else:
                    with contextlib.suppress(OSError):
                        for name in sorted(listdir(target)):
                            if "." not in name and not name.endswith("~"):
                                visit(os.path.join(target, name), depth + 1)
                continue
            line = _strip_comment(stripped)
            if not line or line.split()[0] in _DIRECTIVE or line.startswith("Defaults"):
                continue
            if line.startswith("User_Alias"):
                for part in line[len("User_Alias") :].split(":"):
                    name, sep, items = part.partition("=")
                    if sep:
                        aliases[name.strip()] = tuple(
                            i.strip() for i in items.split(",") if i.strip()
                        )
                continue
            if "=" not in line:
                continue
            users, _ = _split_users(line.split("=", 1)[0])
            if users:
                where = f"{file}:{n}"
                lines.append(SudoLine(where, stripped, users, "NOPASSWD" in line))

    visit(path, 0)
    return Sudoers(tuple(lines), aliases, tuple(problems))


def sudo_matches(
    items: Sequence[str],
    agent: Agent,
    groups: Sequence[Group],
    aliases: dict[str, tuple[str, ...]],
    depth: int = 0,
) -> str | None:
    """The item of a User_List that gives the agent the line (None: it does not).

    Items are read in order and a later match wins, so ``ALL, !agent`` excludes it."""
    names = {g.name for g in groups}
    gids = {g.gid for g in groups}
    result: str | None = None
    for raw in items:
        neg = raw.startswith("!")
        item = raw.lstrip("!").strip()
        hit = False
        if item == "ALL":
            hit = True
        elif item.startswith("%#"):
            hit = item[2:].isdigit() and int(item[2:]) in gids
        elif item.startswith("%:"):
            hit = False  # a non-Unix group (sssd plugin): not known here
        elif item.startswith("%"):
            hit = item[1:] in names
        elif item.startswith("#"):
            hit = item[1:].isdigit() and int(item[1:]) == agent.uid
        elif item in aliases and depth < 16:
            hit = sudo_matches(aliases[item], agent, groups, aliases, depth + 1) is not None
        else:
            hit = agent.name is not None and item == agent.name
        if hit:
            result = None if neg else raw
    return result


def check_sudo(
    host: Host, agents: Sequence[Agent], users: UserDb
) -> tuple[list[Finding], set[str]]:
    """Findings, and the groups whose sudoers lines were reported (for check_groups)."""
    if not os.path.exists(host.path("/etc/sudoers")):
        return [], set()
    sudoers = parse_sudoers(
        "/etc/sudoers", lambda p: _read(host.path(p)), lambda p: os.listdir(host.path(p))
    )
    findings = []
    groups_reported: set[str] = set()
    for agent in agents:
        groups = users.groups_of(agent)
        for line in sudoers.lines:
            item = sudo_matches(line.users, agent, groups, sudoers.aliases)
            if item is None:
                continue
            via = f" (as {item})" if item != agent.name else ""
            if item.startswith("%"):
                groups_reported.add(item[1:])
            fix = (
                f"remove the user from group {item[1:]} (`gpasswd -d {agent.name or agent.uid} "
                f"{item[1:]}`)"
                if item.startswith("%") and not item.startswith("%#")
                else "remove or narrow the line (`visudo -f FILE`)"
            )
            if line.nopasswd:
                what = (
                    f"{_who(agent)} may run commands through sudo without a password{via}: "
                    "they run as another user (root), whose traffic egressd does not restrict"
                )
                severity = LEAK
            else:
                what = (
                    f"{_who(agent)} has sudo rights{via}, with a password: a way out as soon "
                    "as the agent learns it (a locked account has none)"
                )
                severity = WARNING
            findings.append(Finding("sudo", severity, what, f"{line.where}: {line.text}", fix))
    for problem in sudoers.problems:
        findings.append(
            Finding(
                "sudo",
                WARNING,
                "a sudoers include could not be read, so sudo rights were not fully checked",
                problem,
                "check the file's permissions, or remove the include",
            )
        )
    return findings, groups_reported


# --- setuid helpers --------------------------------------------------------------------------

BIN_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin", "/usr/local/sbin")
# Helper directories one level down (/usr/lib/openssh/ssh-keysign, ...): cheap to list.
HELPER_DIRS = ("/usr/lib", "/usr/libexec", "/usr/local/lib")

# Mail submission helpers: setgid ones (postfix's postdrop) hand mail to the MTA's daemon.
MTA_HELPERS = r"(sendmail|exim|exim4|postdrop|postqueue|smtpctl|dma|mail\.local)"
# A setuid file's sockets belong to its owner, not to the agent who runs it: egressd's owner
# match does not see them. Known network-capable helpers, by name: (pattern, severity, why).
NETWORK_HELPERS: tuple[tuple[str, str, str], ...] = (
    (
        r"(curl|wget|nc|netcat|ncat|nc\.openbsd|nc\.traditional|socat|ssh|scp|sftp|rsync|"
        r"telnet|ftp|nmap|hping3|python[0-9.]*|perl[0-9.]*|ruby[0-9.]*|node|busybox)",
        LEAK,
        "a general network tool (or interpreter) that connects wherever the agent asks, as "
        "the file's owner",
    ),
    (
        MTA_HELPERS,
        WARNING,
        "a mail transfer agent's submission helper: mail the agent submits is delivered by "
        "the MTA as its own user, a leak if the MTA relays mail off this host",
    ),
    (
        r"(mount\.nfs|mount\.nfs4|mount\.cifs|mount\.smb3|umount\.nfs)",
        WARNING,
        "a network file system mount helper: it connects as root, to the servers of the "
        "/etc/fstab lines marked `user`/`users`",
    ),
    (
        r"(pppd)",
        WARNING,
        "brings up a network link as root for the members of its group",
    ),
    (
        r"(ping|ping4|ping6|arping|clockdiff|traceroute|traceroute6|traceroute6\.iputils|"
        r"tracepath|mtr-packet)",
        INFO,
        "its ICMP/UDP probes belong to root, not the agent: it can send them to any address "
        "with a chosen payload pattern (a small covert channel; no connection)",
    ),
)


@dataclass(frozen=True, slots=True)
class Special:
    path: str
    mode: int
    uid: int
    gid: int


def special_files(host: Host) -> list[Special]:
    """setuid and setgid regular files in the usual bin dirs (and one level of helpers)."""
    dirs = [host.path(d) for d in BIN_DIRS]
    for d in HELPER_DIRS:
        base = host.path(d)
        with contextlib.suppress(OSError):
            dirs += [e.path for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
    seen: set[tuple[int, int]] = set()
    out = []
    for d in dirs:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                continue
            if (st.st_dev, st.st_ino) in seen:  # /bin -> /usr/bin on merged-/usr systems
                continue
            seen.add((st.st_dev, st.st_ino))
            out.append(Special(e.path, st.st_mode, st.st_uid, st.st_gid))
    return sorted(out, key=lambda s: s.path)


def classify_helper(name: str) -> tuple[str, str] | None:
    for pattern, severity, why in NETWORK_HELPERS:
        if re.fullmatch(pattern, name):
            return severity, why
    return None


def check_setuid(host: Host, restricted: set[int]) -> list[Finding]:
    findings = []
    for f in special_files(host):
        name = os.path.basename(f.path)
        known = classify_helper(name)
        if known is None:
            continue
        severity, why = known
        setuid = bool(f.mode & stat.S_ISUID) and f.uid not in restricted
        # A setgid MTA helper hands mail to the MTA's daemon: the same way out.
        setgid_mta = bool(f.mode & stat.S_ISGID) and re.fullmatch(MTA_HELPERS, name) is not None
        if not (setuid or setgid_mta):
            continue
        owner = _name_of(f.uid, host) if setuid else None
        bit = f"setuid {owner}" if setuid else f"setgid {_group_of(f.gid, host)}"
        fix = (
            f"remove the bit (`chmod u-s {host.show(f.path)}`); ping and traceroute work "
            "without it through file capabilities (cap_net_raw) or ICMP datagram sockets "
            "(net.ipv4.ping_group_range), whose packets stay the agent's"
            if severity == INFO
            else f"remove the bit (`chmod {'u' if setuid else 'g'}-s {host.show(f.path)}`) or "
            "the package, or make sure the agent cannot run it (`chmod o-x`)"
        )
        findings.append(
            Finding(
                "setuid",
                severity,
                f"{host.show(f.path)} is {bit}: {why}",
                f"{host.show(f.path)} mode {stat.filemode(f.mode)} {bit}",
                fix,
            )
        )
    return findings


def _name_of(uid: int, host: Host) -> str:
    if uid == 0:
        return "root"
    entry = parse_passwd(_read(host.path("/etc/passwd")) or "").get(uid)
    return entry[0] if entry else f"uid {uid}"


def _group_of(gid: int, host: Host) -> str:
    for name, g, _, _ in parse_group(_read(host.path("/etc/group")) or ""):
        if g == gid:
            return name
    return f"gid {gid}"


# --- loopback listeners ----------------------------------------------------------------------

TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"
# Not a way out: the agent's port-53 traffic to any address, loopback included, is
# redirected to egressd, so a DNS forwarder on :53 only ever sees egressd's queries.
REDIRECTED = frozenset({53})
KNOWN_PORTS = {
    853: "DNS over TLS",
    5353: "mDNS",
    5300: "a DNS forwarder",
    5335: "a DNS forwarder (unbound)",
    8053: "a DNS forwarder",
    1080: "a SOCKS proxy",
    3128: "an HTTP proxy (squid)",
    3129: "an HTTP proxy (squid)",
    8080: "an HTTP proxy",
    8118: "an HTTP proxy (privoxy)",
    8123: "an HTTP proxy (polipo)",
    8888: "an HTTP proxy (tinyproxy)",
    9050: "a SOCKS proxy (tor)",
    9150: "a SOCKS proxy (Tor Browser)",
}


@dataclass(frozen=True, slots=True)
class Listener:
    proto: str  # "tcp" | "udp"
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    uid: int
    inode: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.proto} {host}:{self.port}"


def _hex_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # The kernel prints each 32-bit word in host byte order.
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def parse_proc_net(text: str, proto: str) -> list[Listener]:
    """Listening sockets of a /proc/net/{tcp,tcp6,udp,udp6}: TCP in LISTEN, UDP bound and
    unconnected (remote port 0)."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        local, remote, state = f[1], f[2], f[3]
        want = TCP_LISTEN if proto == "tcp" else UDP_UNCONNECTED
        if state != want or (proto == "udp" and not remote.endswith(":0000")):
            continue
        addr, _, port = local.partition(":")
        try:
            out.append(Listener(proto, _hex_address(addr), int(port, 16), int(f[7]), int(f[9])))
        except ValueError:
            continue
    return out


def listeners(host: Host) -> list[Listener]:
    out: list[Listener] = []
    for name, proto in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        text = _read(os.path.join(host.proc, "net", name))
        if text:
            out += parse_proc_net(text, proto)
    return out


def socket_owners(proc: str, inodes: set[int]) -> dict[int, str]:
    """socket inode -> "pid N (comm)" of a process holding it (best effort)."""
    out: dict[int, str] = {}
    if not inodes:
        return out
    pids: list[str] = []
    with contextlib.suppress(OSError):
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    for pid in pids:
        try:
            fds = os.listdir(os.path.join(proc, pid, "fd"))
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(proc, pid, "fd", fd))
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m and int(m.group(1)) in inodes and int(m.group(1)) not in out:
                comm = (_read(os.path.join(proc, pid, "comm")) or "?").strip()
                out[int(m.group(1))] = f"pid {pid} ({comm})"
    return out


def reachable_listeners(
    found: Iterable[Listener], own_ports: set[int], restricted: set[int]
) -> list[Listener]:
    """Listeners an agent with allow_loopback reaches (its `-o lo` accept covers loopback and
    the host's own addresses), minus egressd's own, the agent's own and port 53."""
    out = []
    seen: set[tuple[str, str, int]] = set()
    for s in found:
        if s.port in REDIRECTED or s.port in own_ports or s.uid in restricted:
            continue
        key = (s.proto, str(s.address), s.port)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return sorted(out, key=lambda s: (s.port, s.proto, str(s.address)))


def check_loopback(host: Host, config: Config, restricted: set[int]) -> list[Finding]:
    profiles = [p.name for p in config.profiles if p.allow_loopback]
    if not profiles:
        return []  # egressd rejects the agents' traffic to local addresses
    own = {p.port for p in config.profiles}
    if config.daemon.metrics:
        with contextlib.suppress(ValueError):
            own.add(int(config.daemon.metrics.rpartition(":")[2]))
    found = reachable_listeners(listeners(host), own, restricted)
    owners = socket_owners(host.proc, {s.inode for s in found})
    findings = []
    for s in found:
        label = KNOWN_PORTS.get(s.port)
        who = owners.get(s.inode, "owner process not found")
        prof = f"profile{'s' if len(profiles) > 1 else ''} {', '.join(profiles)}"
        if label:
            what = (
                f"a listener on port {s.port}, the usual port of {label}, which {prof} may reach "
                "(allow_loopback): if it is a proxy or forwarder, it connects or resolves for "
                "the agent as its own user, past egressd"
            )
            severity = LEAK
        else:
            what = (
                f"a local service on port {s.port} which {prof} may reach (allow_loopback): "
                "whatever it does for a client (fetch a URL, resolve a name), it does as its "
                "own user, past egressd"
            )
            severity = WARNING
        findings.append(
            Finding(
                "loopback",
                severity,
                what,
                f"{s} uid {s.uid}, {who}",
                "set allow_loopback = false (then only egressd's DNS port is reachable), or "
                "stop the service, or bind it where the agent cannot reach it",
            )
        )
    return findings


# --- nftables.service ------------------------------------------------------------------------

UNIT_DIRS = (
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
)


def nft_flushes(text: str) -> list[tuple[int, str]]:
    """Lines of an nft script that flush the whole ruleset (every table, egressd's too)."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        for stmt in line.split(";"):
            if stmt.split() == ["flush", "ruleset"] or stmt.split()[:2] == ["flush", "ruleset"]:
                out.append((n, raw.strip()))
                break
    return out


def nft_includes(text: str) -> list[str]:
    return re.findall(r'^\s*include\s+"([^"]+)"', text, re.MULTILINE)


def unit_nft_files(text: str) -> list[str]:
    """The files ``nft -f FILE`` reads in a unit's ExecStart=/ExecReload= lines."""
    out = []
    for raw in text.splitlines():
        key, sep, value = raw.strip().partition("=")
        if not sep or key.strip() not in ("ExecStart", "ExecReload"):
            continue
        try:
            argv = shlex.split(value.lstrip("-@:+!"))
        except ValueError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg in ("-f", "--file"):
                out.append(argv[i + 1])
        out += [a[len("--file=") :] for a in argv if a.startswith("--file=")]
    return out


def _unit(host: Host, name: str) -> tuple[str | None, list[str]]:
    """A unit's file (the first in systemd's search order) and its drop-ins."""
    main = None
    drops: list[str] = []
    for d in UNIT_DIRS:
        path = host.path(f"{d}/{name}")
        if main is None and os.path.isfile(path):
            main = path
        drops += sorted(glob.glob(host.path(f"{d}/{name}.d/*.conf")))
    return main, drops


def check_nftables(host: Host) -> list[Finding]:
    unit, drops = _unit(host, "nftables.service")
    if unit is None:
        return []  # nothing on this host runs an nft script at start or reload
    files: list[str] = []
    for path in [unit, *drops]:
        files += unit_nft_files(_read(path) or "")
    files = list(dict.fromkeys(files)) or ["/etc/nftables.conf"]
    enabled = any(
        os.path.exists(p)
        for p in glob.glob(host.path("/etc/systemd/system/*.wants/nftables.service"))
    )
    findings = []
    todo, seen = list(files), set()
    while todo:
        file = todo.pop(0)
        if file in seen:
            continue
        seen.add(file)
        text = _read(host.path(file))
        if text is None:
            continue
        for inc in nft_includes(text):
            base = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(file), inc)
            todo += [host.show(p) for p in sorted(glob.glob(host.path(base)))]
        for n, line in nft_flushes(text):
            state = "enabled" if enabled else "installed, not enabled"
            findings.append(
                Finding(
                    "nftables",
                    WARNING if enabled else INFO,
                    "nftables.service loads a script that flushes the whole ruleset: a "
                    "`systemctl restart nftables` (or reload) removes egressd's rules too. "
                    "egressd notices and puts them back within about 0.1 s (0.5 s with the "
                    "legacy iptables backend); in between the agent is not restricted",
                    f"{file}:{n}: {line} (nftables.service {state})",
                    "flush only the tables the script defines (e.g. `flush table inet filter`) "
                    "instead of `flush ruleset`",
                )
            )
    return findings


# --- IPv6 and egressd's jumps ----------------------------------------------------------------


def has_jump(rules: str, chain: str = FILTER_CHAIN) -> bool:
    """Whether ``iptables -S OUTPUT`` output jumps to ``chain``."""
    return any(line.split() == ["-A", "OUTPUT", "-j", chain] for line in rules.splitlines())


def ipv6_in_use(proc: str) -> bool:
    disabled = (_read(os.path.join(proc, "sys/net/ipv6/conf/all/disable_ipv6")) or "1").strip()
    return disabled == "0" and bool((_read(os.path.join(proc, "net/if_inet6")) or "").strip())


def check_firewall(host: Host, configured: bool) -> list[Finding]:
    results = {}
    for family, tool in ((4, "iptables"), (6, "ip6tables")):
        rc, out, err = host.run([tool, "-w", "-t", "filter", "-S", "OUTPUT"])
        results[family] = (rc, out, err.strip())
    v6 = ipv6_in_use(host.proc)
    rc4, out4, _ = results[4]
    rc6, out6, err6 = results[6]
    jump4 = rc4 == 0 and has_jump(out4)
    jump6 = rc6 == 0 and has_jump(out6)
    findings = []
    if v6 and jump4 and not jump6:
        evidence = (
            f"`ip6tables -S OUTPUT` has no `-j {FILTER_CHAIN}` (iptables has it)"
            if rc6 == 0
            else f"`ip6tables -S OUTPUT` failed: {err6 or rc6}"
        )
        findings.append(
            Finding(
                "firewall",
                LEAK,
                "IPv6 is enabled but egressd's IPv6 rules are not in place: the agent's IPv6 "
                "traffic goes anywhere",
                evidence,
                "find what removed the jump (another firewall tool) and restart egressd, "
                "which installs both families; egressd's repair puts back what it installed",
            )
        )
    elif configured and not jump4 and not jump6 and rc4 == 0:
        findings.append(
            Finding(
                "firewall",
                LEAK,
                "egressd's rules are not in place (no OUTPUT jump to its chain in either "
                "family): the restricted users are not restricted at all",
                f"`iptables -S OUTPUT` has no `-j {FILTER_CHAIN}`",
                "start egressd (`systemctl start egressd`); egressd-lockdown.service keeps the "
                "users closed from boot until it runs",
            )
        )
    return findings


# --- ports ---------------------------------------------------------------------------------


def check_ports(host: Host, config: Config) -> list[Finding]:
    text = _read(os.path.join(host.proc, "sys/net/ipv4/ip_unprivileged_port_start"))
    try:
        start = int((text or "").strip())
    except ValueError:
        return []
    findings = []
    for p in config.profiles:
        if p.port >= start:
            findings.append(
                Finding(
                    "ports",
                    WARNING,
                    f"profile {p.name}'s DNS port {p.port} is not privileged here "
                    f"(net.ipv4.ip_unprivileged_port_start = {start}): any user could bind it "
                    "while egressd is down and answer the agent's redirected DNS, so egressd "
                    "refuses to start",
                    f"/proc/sys/net/ipv4/ip_unprivileged_port_start = {start}, port {p.port}",
                    f"use a port below {start} (`port = 153`, the default), or set "
                    f"net.ipv4.ip_unprivileged_port_start back above {p.port} "
                    "(1024 is the kernel's default) in /etc/sysctl.d/",
                )
            )
    return findings


# --- all together ----------------------------------------------------------------------------

CHECKS = ("resolver", "groups", "sudo", "setuid", "loopback", "nftables", "firewall", "ports")
# What each check needs the config for (the others run without it).
NEEDS_CONFIG = ("groups", "sudo", "loopback", "ports")


@dataclass(frozen=True, slots=True)
class Report:
    findings: tuple[Finding, ...]
    checks: tuple[str, ...]  # the checks that ran
    skipped: tuple[tuple[str, str], ...]  # (check, why it did not run)
    config: str
    config_error: str | None


def examine(host: Host, config_path: str, only: Sequence[str] = CHECKS) -> Report:
    users = UserDb(host)
    config: Config | None = None
    error = None
    try:
        config = load_config(config_path, users)
    except ConfigError as err:
        error = str(err)
    agents = agents_of(config, users) if config else []
    restricted = {a.uid for a in agents}
    findings: list[Finding] = []
    ran: list[str] = []
    skipped: list[tuple[str, str]] = []
    sudo_groups: set[str] = set()
    for name in CHECKS:
        if name not in only:
            continue
        if name in NEEDS_CONFIG and config is None:
            skipped.append((name, "needs the restricted users from egressd's config"))
            continue
        ran.append(name)
        if name == "resolver":
            findings += check_resolver(host)
        elif name == "sudo":
            found, sudo_groups = check_sudo(host, agents, users)
            findings += found
        elif name == "setuid":
            findings += check_setuid(host, restricted)
        elif name == "loopback" and config is not None:
            findings += check_loopback(host, config, restricted)
        elif name == "nftables":
            findings += check_nftables(host)
        elif name == "firewall":
            findings += check_firewall(host, config is not None)
        elif name == "ports" and config is not None:
            findings += check_ports(host, config)
    if "groups" in ran:  # after sudo: a group whose sudoers line sudo reported is not repeated
        findings += check_groups(agents, users, sudo_groups)
    order = {c: i for i, c in enumerate(CHECKS)}
    findings.sort(key=lambda f: (SEVERITIES.index(f.severity), order[f.check]))
    return Report(tuple(findings), tuple(ran), tuple(skipped), config_path, error)
