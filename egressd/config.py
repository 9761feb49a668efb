"""Configuration: TOML file + allowlist files -> validated, frozen Config.

Every error names the file, the line and the key. The reading of files, the user database
and /etc/resolv.conf is injected (``Sources``) so that parsing stays testable without root.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import pwd
import re
import tomllib
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .allowlist import Rule, parse_lines, parse_pattern
from .errors import ConfigError
from .rebind import host_overlap

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORT = 153  # privileged, so no unprivileged user can squat it while egressd is down
# The conntrack mark bits egressd owns: each profile's chain writes its id there on the
# connections it admits, and continues only connections carrying that id. 0xff000000 stays
# clear of kube-proxy (0x4000, 0x8000), Cilium (0x0f00, 0xf000, 0x0e00), Tailscale
# (0x00ff0000) and Docker (none); Calico's default 0xffff0000 overlaps it (see docs/design.md).
DEFAULT_CT_MASK = 0xFF000000
# New connections per second per profile, and the burst (hashlimit). An `npm install`
# opens a few hundred in a burst; a flood meant to fill the host's conntrack table
# (nf_conntrack_max, often 65536-262144) needs tens of thousands.
DEFAULT_CONN_RATE = 500
DEFAULT_CONN_BURST = 2000
# Connections a profile's users may hold at once (conntrack entries they own): the rate
# alone would let long-lived TCP connections pile up over minutes.
DEFAULT_CONN_MAX = 4096
DEFAULT_CONTROL = "/run/egressd/control"
# A profile's mode: "enforce" blocks what the allowlist does not allow; "audit" (learning)
# answers and grants every name and logs each one enforcing mode would have blocked.
MODES = ("enforce", "audit")
PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,14}$")


@dataclass(frozen=True, slots=True)
class Upstream:
    address: str
    port: int = 53

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    upstreams: tuple[Upstream, ...] = ()
    upstream_timeout: float = 2.0
    upstream_tries: int = 3
    blocked_rcode: str = "nxdomain"
    max_inflight: int = 512
    cache_entries: int = 10000
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 128
    log_rejects: bool = True
    verify_interval: float = 30.0
    # The rcode of an answer the rebinding guard left without any address.
    rebind_rcode: str = "noerror"
    ct_mask: int = DEFAULT_CT_MASK
    ct_mark_clash: str = "refuse"  # or "warn": another rule on the host writes these bits
    # The control socket the CLI talks to (egressd.control); root only.
    control: str = DEFAULT_CONTROL
    # Prometheus metrics on this loopback address ("127.0.0.1:9153"); "" = off.
    metrics: str = ""


@dataclass(frozen=True, slots=True)
class GrantSettings:
    # Apps hold on to resolved addresses well past the TTL (JVM 30 s, browsers ~60 s,
    # connection pools that reconnect minutes later), so a short TTL must not cut them off:
    # every grant lasts at least `floor`. Cilium's default floor is an hour; 5 minutes keeps
    # stale grants short while covering what common runtimes do. See docs/design.md.
    floor: int = 300
    ceiling: int = 86400
    grace: int = 60
    maxelem: int = 65536


@functools.cache
def set_name(profile: str, family: int, ports: bool) -> str:
    """The ipset of a profile's grants: every port (``-v4``/``-v6``, hash:ip) or only
    some (``-p4``/``-p6``, hash:ip,port). Cached: one string object per set, however
    many grants name it."""
    return f"egressd-{profile}-{'p' if ports else 'v'}{family}"


def profile_of(set_name: str) -> str:
    """ "egressd-agent-p4" -> "agent" (the reverse of ``set_name``)."""
    return set_name[len("egressd-") : -3]


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    uids: tuple[int, ...]
    # Subordinate uid ranges of the users (inclusive first, last): uids they can become
    # through a user namespace (newuidmap), restricted like the users themselves.
    uid_ranges: tuple[tuple[int, int], ...] = ()
    port: int = DEFAULT_PORT
    rules: tuple[Rule, ...] = ()
    ports: tuple[int, ...] = ()  # empty: every port of a granted address
    cidrs: tuple[IPNetwork, ...] = ()
    allow_loopback: bool = False
    allowlists: tuple[str, ...] = ()
    # `private_answers`: exceptions to the rebinding guard (egressd.rebind): query names
    # whose answers may carry private addresses, and networks whose addresses are fine.
    private_names: tuple[Rule, ...] = ()
    private_cidrs: tuple[IPNetwork, ...] = ()
    # The conntrack mark id (under DaemonSettings.ct_mask) of the connections this
    # profile admitted. Stable across reloads and restarts: the `id` key, else derived from
    # the name, so a live connection keeps being recognised as this profile's.
    mark_id: int = 1
    # New connections (and DNS queries) per second the profile's users may open, and the
    # burst: each admitted connection is a conntrack entry, and the table is the host's.
    conn_rate: int = DEFAULT_CONN_RATE
    conn_burst: int = DEFAULT_CONN_BURST
    conn_max: int = DEFAULT_CONN_MAX
    mode: str = "enforce"

    @property
    def set4(self) -> str:
        return set_name(self.name, 4, False)

    @property
    def set6(self) -> str:
        return set_name(self.name, 6, False)

    # Grants limited to ports (a line's `ports=`, or the profile's `ports`): hash:ip,port
    # sets, one entry per address, protocol and port.
    @property
    def pset4(self) -> str:
        return set_name(self.name, 4, True)

    @property
    def pset6(self) -> str:
        return set_name(self.name, 6, True)


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    daemon: DaemonSettings
    grants: GrantSettings
    profiles: tuple[Profile, ...]


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _lookup_user(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def _lookup_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _no_nss_subuids(user: str) -> Sequence[tuple[int, int]]:
    return ()  # the pure core runs no program; cli injects subids.getsubids


@dataclass(frozen=True)
class Sources:
    """Where config parsing gets outside facts from (real system by default)."""

    read_text: Callable[[str], str] = _read_text
    lookup_user: Callable[[str], int] = _lookup_user
    resolv_conf: str = "/etc/resolv.conf"
    # uid -> passwd name (None if there is none): subordinate ranges are listed by name.
    lookup_name: Callable[[int], str | None] = _lookup_name
    # shadow's subordinate uid file (subuid(5)), read at every load; missing means empty.
    subuid_file: str = "/etc/subuid"
    # A user's subordinate uid ranges from NSS (sssd, LDAP) as (start, count) pairs;
    # raises ConfigError when they cannot be read.
    nss_subuids: Callable[[str], Sequence[tuple[int, int]]] = _no_nss_subuids


# --- key locations -------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$")


def _locate(text: str, table: str, key: str | None) -> int | None:
    """Line number of `key` inside `[table]` (or of the table header when key is None).

    A key written as a dotted key (``key.sub = ...``) or as a table header of its own
    (``[table.key]``, ``[table.key.sub]``) is found there.
    """
    current = ""
    header_line: int | None = None
    own = f"{table}.{key}" if table and key is not None else key
    for lineno, line in enumerate(text.split("\n"), start=1):  # TOML lines end at \n only
        m = _HEADER.match(line)
        if m:
            current = re.sub(r"\s*\.\s*", ".", m.group(1).strip("[] ")).replace('"', "")
            if current == table:
                header_line = lineno
            if own is not None and (current == own or current.startswith(own + ".")):
                return lineno
            continue
        if (
            current == table
            and key is not None
            and re.match(rf"^\s*\"?{re.escape(key)}\"?\s*[=.]", line)
        ):
            return lineno
    return header_line


class _Ctx:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text

    def error(self, table: str, key: str | None, message: str) -> ConfigError:
        dotted = f"{table}.{key}" if table and key else (key or table)
        return ConfigError(message, file=self.path, line=_locate(self.text, table, key), key=dotted)


# --- value checks --------------------------------------------------------------------------


def _check_keys(ctx: _Ctx, table: str, data: dict[str, Any], allowed: Sequence[str]) -> None:
    for key in data:
        if key not in allowed:
            raise ctx.error(table, key, f"unknown key (known: {', '.join(allowed)})")


def _typed(ctx: _Ctx, table: str, data: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    if key not in data:
        return default
    value = data[key]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ctx.error(table, key, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _positive(ctx: _Ctx, table: str, key: str, value: float, minimum: float = 1) -> None:
    if value < minimum:
        raise ctx.error(table, key, f"must be at least {minimum}, got {value}")


def parse_upstream(text: str) -> Upstream:
    """Parse "IP", "IP:PORT", "[IPv6]" or "[IPv6]:PORT"."""
    text = text.strip()
    port = 53
    host = text
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if m:
        host, port = m.group(1), int(m.group(2) or 53)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"bad port in {text!r}")
        port = int(port_text)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address (names are not allowed here)") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    if addr.is_unspecified:
        raise ValueError(f"{text!r} is the unspecified address")
    return Upstream(str(addr), port)


def resolv_conf_upstreams(text: str) -> list[Upstream]:
    out: list[Upstream] = []
    for line in text.split("\n"):
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                # A link-local server keeps its zone (fe80::1%eth0): without it, unusable.
                out.append(parse_upstream(parts[1]))
            except ValueError:
                continue
    return out


def _check_not_self(upstreams: Sequence[Upstream], ports: set[int]) -> None:
    """Refuse upstreams that would send egressd's own queries back to egressd."""
    for u in upstreams:
        addr: IPAddress = ipaddress.ip_address(u.address)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
        if addr.is_loopback and u.port in ports:
            raise ValueError(f"upstream {u} is egressd's own listener; egressd would query itself")


def _users(ctx: _Ctx, table: str, value: Any, sources: Sources) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ctx.error(table, "users", "expected a non-empty list of user names or uids")
    uids: list[int] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ctx.error(table, "users", f"{item!r} is neither a user name nor a uid")
        uid = resolve_user(item, sources)
        if uid is None:
            raise ctx.error(table, "users", f"unknown user {item!r}")
        if uid == 0:
            raise ctx.error(table, "users", "refusing to restrict root (uid 0)")
        if uid not in uids:
            uids.append(uid)
    return tuple(uids)


def resolve_user(item: int | str, sources: Sources) -> int | None:
    """A uid from a name or number. Numeric uids need not exist in the user database."""
    if isinstance(item, str) and item.isascii() and item.isdigit():
        item = int(item)
    if isinstance(item, int):
        return item if 0 <= item < 2**32 - 1 else None
    try:
        return sources.lookup_user(item)
    except KeyError:
        return None


# --- subordinate uids ------------------------------------------------------------------------
# A user with a subordinate range (useradd gives one: `agent:100000:65536` in /etc/subuid)
# can run processes as those uids through a user namespace (`unshare --map-auto`, with the
# setuid newuidmap of package uidmap). Their sockets belong to those uids, not to the
# user's, so the owner match must cover the ranges too (DESIGN §2 invariant 4).

UidRange = tuple[int, int]  # inclusive first, last
MAX_UID = 2**32 - 2  # (uid_t)-1 is "no uid"


@dataclass(frozen=True, slots=True)
class SubidLine:
    """One `owner:start:count` line of /etc/subuid."""

    owner: str
    first: int
    last: int
    line: int


def parse_subid_file(text: str, path: str) -> tuple[SubidLine, ...]:
    """Parse subuid(5) text. Blank lines and `#` comments are skipped.

    Numbers must be plain decimal: shadow and util-linux do not agree on other spellings
    (a leading 0, a sign, spaces), and a range read differently from newuidmap would
    restrict the wrong uids, so anything else is refused rather than guessed.
    """
    out: list[SubidLine] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        ok = len(fields) == 3 and fields[0] != ""
        ok = ok and all(_decimal(f) for f in fields[1:])
        if not ok:
            raise ConfigError(
                f"malformed line {raw!r} (expected owner:start:count, decimal numbers)",
                file=path,
                line=lineno,
            )
        start, count = int(fields[1]), int(fields[2])
        if count == 0:
            continue  # an empty range grants nothing
        if start + count - 1 > MAX_UID:
            raise ConfigError(
                f"range {start}+{count} goes past the largest uid {MAX_UID}", file=path, line=lineno
            )
        out.append(SubidLine(fields[0], start, start + count - 1, lineno))
    return tuple(out)


def _decimal(text: str) -> bool:
    return text.isascii() and text.isdigit() and (text == "0" or not text.startswith("0"))


def merge_ranges(ranges: Sequence[UidRange]) -> tuple[UidRange, ...]:
    """Sorted, with overlapping and adjacent ranges joined."""
    out: list[UidRange] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return tuple(out)


def read_subuid_file(sources: Sources) -> tuple[SubidLine, ...]:
    try:
        text = sources.read_text(sources.subuid_file)
    except FileNotFoundError:
        return ()  # no file: nobody has a subordinate range (newuidmap refuses all)
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", file=sources.subuid_file) from None
    return parse_subid_file(text, sources.subuid_file)


def subordinate_ranges(
    user: int | str, uid: int, lines: Sequence[SubidLine], sources: Sources
) -> tuple[UidRange, ...]:
    """Every subordinate uid range of one user: /etc/subuid and NSS (getsubids), merged.

    A line counts when its owner is the user's name (as configured, or its passwd name) or
    its uid: newuidmap accepts both. A numeric owner matches by value, and a uid without a
    passwd entry still gets its numeric lines: a superset is the safe side.
    """
    names: list[str] = []
    if isinstance(user, str) and not (user.isascii() and user.isdigit()):
        names.append(user)
    passwd_name = sources.lookup_name(uid)
    if passwd_name is not None and passwd_name not in names:
        names.append(passwd_name)
    found: list[UidRange] = []
    for entry in lines:
        mine = entry.owner in names or (entry.owner.isdigit() and int(entry.owner) == uid)
        if not mine:
            continue
        if entry.first == 0:
            raise ConfigError(
                f"subordinate range {entry.first}-{entry.last} of {entry.owner} contains root "
                f"(uid 0); egressd never restricts root: remove it "
                f"(usermod --del-subuids {entry.first}-{entry.last} {entry.owner})",
                file=sources.subuid_file,
                line=entry.line,
            )
        found.append((entry.first, entry.last))
    for name in names:
        for start, count in sources.nss_subuids(name):
            if count <= 0:
                continue
            last = start + count - 1
            if start == 0 or last > MAX_UID:
                raise ConfigError(
                    f"getsubids {name} reports the subordinate range {start}-{last}, which "
                    + ("contains root (uid 0)" if start == 0 else f"goes past uid {MAX_UID}")
                )
            found.append((start, last))
    return merge_ranges(found)


def _user_ranges(
    users: Sequence[int | str],
    lines: Sequence[SubidLine],
    sources: Sources,
    error: Callable[[str], ConfigError],
) -> tuple[UidRange, ...]:
    """The merged subordinate ranges of a profile's users. ``error`` places a problem that
    has no file line of its own (what getsubids reported) at the users key."""
    found: list[UidRange] = []
    for item in users:
        uid = resolve_user(item, sources)
        if uid is None:
            continue  # _users has refused it already
        try:
            found.extend(subordinate_ranges(item, uid, lines, sources))
        except ConfigError as err:
            if err.file is not None:
                raise
            raise error(err.detail) from None
    return merge_ranges(found)


def _range_clash(
    uids: Sequence[int],
    ranges: Sequence[UidRange],
    seen_uids: Mapping[int, str],
    seen_ranges: Sequence[tuple[UidRange, str]],
    name: str,
) -> str:
    """Why this profile's uids and ranges collide with earlier profiles', or "".

    One uid restricted by two profiles would have two chains and two marks; which one
    wins would depend on rule order, so it is refused like a uid in two profiles.
    """
    for uid in uids:
        for (first, last), other in seen_ranges:
            if first <= uid <= last:
                return (
                    f"uid {uid} is inside the subordinate uid range {first}-{last} "
                    f"of profile {other}"
                )
    for first, last in ranges:
        for uid, other in seen_uids.items():
            if other != name and first <= uid <= last:
                return f"subordinate uid range {first}-{last} contains uid {uid} of profile {other}"
        for (ofirst, olast), other in seen_ranges:
            if first <= olast and ofirst <= last:
                return (
                    f"subordinate uid range {first}-{last} overlaps {ofirst}-{olast} "
                    f"of profile {other}"
                )
    return ""


# --- the parser ------------------------------------------------------------------------------

_DAEMON_KEYS = (
    "upstreams",
    "upstream_timeout",
    "upstream_tries",
    "blocked_rcode",
    "max_inflight",
    "cache_entries",
    "tcp_idle_timeout",
    "tcp_max_connections",
    "log_rejects",
    "verify_interval",
    "rebind_rcode",
    "ct_mask",
    "ct_mark_clash",
    "control",
    "metrics",
)
_GRANT_KEYS = ("floor", "ceiling", "grace", "maxelem")
_PROFILE_KEYS = (
    "users",
    "allowlists",
    "allow",
    "port",
    "ports",
    "cidrs",
    "allow_loopback",
    "private_answers",
    "id",
    "conn_rate",
    "conn_burst",
    "conn_max",
    "mode",
)


def parse(text: str, path: str, sources: Sources | None = None) -> Config:
    """Parse and validate a configuration file's text."""
    sources = sources or Sources()
    ctx = _Ctx(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"line (\d+)", str(err))
        raise ConfigError(
            f"not valid TOML: {err}", file=path, line=int(m.group(1)) if m else None
        ) from None
    _check_keys(ctx, "", data, ("daemon", "grants", "profiles"))
    for table in ("daemon", "grants", "profiles"):
        if table in data and not isinstance(data[table], dict):
            raise ctx.error("", table, "expected a table")

    grants = _grants(ctx, data.get("grants", {}))
    mask = _ct_mask(ctx, data.get("daemon", {}))
    profiles = _profiles(ctx, data.get("profiles", {}), sources, mark_ids(mask))
    daemon = _daemon(ctx, data.get("daemon", {}), sources, {p.port for p in profiles})
    return Config(path=path, daemon=daemon, grants=grants, profiles=profiles)


def _daemon(ctx: _Ctx, d: dict[str, Any], sources: Sources, ports: set[int]) -> DaemonSettings:
    t = "daemon"
    _check_keys(ctx, t, d, _DAEMON_KEYS)
    base = DaemonSettings()
    raw_up = _typed(ctx, t, d, "upstreams", list, [])
    try:
        ups = [parse_upstream(str(u)) for u in raw_up]
    except ValueError as err:
        raise ctx.error(t, "upstreams", str(err)) from None
    source_key = "upstreams"
    if not ups:
        source_key = sources.resolv_conf
        try:
            ups = resolv_conf_upstreams(sources.read_text(sources.resolv_conf))
        except OSError as err:
            raise ctx.error(t, "upstreams", f"empty, and {sources.resolv_conf}: {err}") from None
        if not ups:
            raise ctx.error(t, "upstreams", f"empty, and {sources.resolv_conf} lists no nameserver")
    try:
        _check_not_self(ups, ports)
    except ValueError as err:
        raise ctx.error(t, "upstreams", f"{err} (from {source_key})") from None
    rcode = _typed(ctx, t, d, "blocked_rcode", str, base.blocked_rcode).lower()
    if rcode not in ("nxdomain", "refused"):
        raise ctx.error(t, "blocked_rcode", f"must be 'nxdomain' or 'refused', got {rcode!r}")
    out = DaemonSettings(
        upstreams=tuple(ups),
        upstream_timeout=_typed(ctx, t, d, "upstream_timeout", float, base.upstream_timeout),
        upstream_tries=_typed(ctx, t, d, "upstream_tries", int, base.upstream_tries),
        blocked_rcode=rcode,
        max_inflight=_typed(ctx, t, d, "max_inflight", int, base.max_inflight),
        cache_entries=_typed(ctx, t, d, "cache_entries", int, base.cache_entries),
        tcp_idle_timeout=_typed(ctx, t, d, "tcp_idle_timeout", float, base.tcp_idle_timeout),
        tcp_max_connections=_typed(ctx, t, d, "tcp_max_connections", int, base.tcp_max_connections),
        log_rejects=_typed(ctx, t, d, "log_rejects", bool, base.log_rejects),
        verify_interval=_typed(ctx, t, d, "verify_interval", float, base.verify_interval),
        rebind_rcode=_rebind_rcode(ctx, d),
        ct_mask=_ct_mask(ctx, d),
        ct_mark_clash=_typed(ctx, t, d, "ct_mark_clash", str, base.ct_mark_clash),
        control=_typed(ctx, t, d, "control", str, base.control),
        metrics=_typed(ctx, t, d, "metrics", str, base.metrics),
    )
    if not os.path.isabs(out.control):
        raise ctx.error(t, "control", f"must be an absolute path, got {out.control!r}")
    if out.metrics:
        problem = check_metrics_address(out.metrics)
        if problem:
            raise ctx.error(t, "metrics", problem)
    if out.ct_mark_clash not in ("refuse", "warn"):
        raise ctx.error(
            t, "ct_mark_clash", f"must be 'refuse' or 'warn', got {out.ct_mark_clash!r}"
        )
    _positive(ctx, t, "upstream_timeout", out.upstream_timeout, 0.05)
    _positive(ctx, t, "upstream_tries", out.upstream_tries)
    _positive(ctx, t, "max_inflight", out.max_inflight)
    _positive(ctx, t, "cache_entries", out.cache_entries, 0)
    _positive(ctx, t, "tcp_idle_timeout", out.tcp_idle_timeout, 0.1)
    _positive(ctx, t, "tcp_max_connections", out.tcp_max_connections)
    _positive(ctx, t, "verify_interval", out.verify_interval, 0)
    return out


def check_metrics_address(text: str) -> str:
    """Why a metrics address is unusable, or "". Loopback only: the counters name the
    profiles and their traffic, nothing for other hosts."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{text!r} is not IP:PORT (e.g. 127.0.0.1:9153)"
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return f"{text!r} is not IP:PORT (e.g. 127.0.0.1:9153)"
    if not ip.is_loopback:
        return f"{ip} is not a loopback address: metrics are served on loopback only"
    return ""


def mark_ids(mask: int) -> int:
    """How many profile ids fit under a conntrack mark mask (id 0 means "no profile")."""
    return (mask >> ((mask & -mask).bit_length() - 1)) if mask else 0


def check_ct_mask(mask: int) -> str:
    """Why a mask is unusable, or ""."""
    if not 0 < mask <= 0xFFFFFFFF:
        return f"must be a non-zero 32-bit mask, got {mask:#x}"
    low = mask & -mask
    if (mask + low) & mask:
        return f"{mask:#010x} must be one run of contiguous bits (e.g. 0xff000000)"
    if mark_ids(mask) < 3:
        return f"{mask:#010x} leaves room for fewer than 3 profile ids; use at least 2 bits"
    return ""


def _ct_mask(ctx: _Ctx, d: Any) -> int:
    if not isinstance(d, dict):
        return DEFAULT_CT_MASK  # parse() reports the non-table
    mask = _typed(ctx, "daemon", d, "ct_mask", int, DEFAULT_CT_MASK)
    problem = check_ct_mask(mask)
    if problem:
        raise ctx.error("daemon", "ct_mask", problem)
    return int(mask)


def default_mark_id(name: str, ids: int) -> int:
    """A profile's id from its name alone: the same after every reload and restart."""
    return zlib.crc32(name.encode()) % ids + 1


def _grants(ctx: _Ctx, d: dict[str, Any]) -> GrantSettings:
    t = "grants"
    _check_keys(ctx, t, d, _GRANT_KEYS)
    base = GrantSettings()
    g = GrantSettings(**{k: _typed(ctx, t, d, k, int, getattr(base, k)) for k in _GRANT_KEYS})
    check_grants(g, lambda key, msg: ctx.error(t, key, msg))
    return g


def check_grants(g: GrantSettings, error: Callable[[str, str], ConfigError]) -> None:
    # A timeout of 0 makes an ipset entry permanent, so the floor must be at least 1.
    if g.floor < 1:
        raise error("floor", f"must be at least 1 second (0 would be permanent), got {g.floor}")
    if g.ceiling < g.floor:
        raise error("ceiling", f"must be at least floor ({g.floor}), got {g.ceiling}")
    if g.grace < 0:
        raise error("grace", f"must not be negative, got {g.grace}")
    if g.ceiling + g.grace > 2_000_000:  # ipset's timeout is bounded (~24 days)
        raise error("ceiling", "ceiling + grace must stay below 2000000 seconds")
    if not 128 <= g.maxelem <= 2**24:
        raise error("maxelem", f"must be between 128 and {2**24}, got {g.maxelem}")


def _profiles(ctx: _Ctx, d: dict[str, Any], sources: Sources, ids: int) -> tuple[Profile, ...]:
    if not d:
        raise ctx.error("", "profiles", "no profile defined; add a [profiles.NAME] table")
    profiles: list[Profile] = []
    seen_ports: dict[int, str] = {}
    seen_uids: dict[int, str] = {}
    seen_ranges: list[tuple[UidRange, str]] = []
    subid_lines = read_subuid_file(sources)  # once per load: a reload re-reads it
    seen_ids: dict[int, str] = {}
    base_dir = os.path.dirname(os.path.abspath(ctx.path))
    for name, body in d.items():
        t = f"profiles.{name}"
        if not isinstance(body, dict):
            raise ctx.error("profiles", name, "expected a table")
        if not PROFILE_NAME.match(name):
            raise ctx.error(
                t,
                None,
                f"profile name {name!r} must match {PROFILE_NAME.pattern} "
                "(it becomes part of chain and set names)",
            )
        _check_keys(ctx, t, body, _PROFILE_KEYS)
        if "users" not in body:
            raise ctx.error(t, "users", "missing: name the user(s) this profile restricts")
        uids = _users(ctx, t, body["users"], sources)
        for uid in uids:
            if uid in seen_uids:
                raise ctx.error(t, "users", f"uid {uid} is already in profile {seen_uids[uid]}")
            seen_uids[uid] = name
        uid_ranges = _user_ranges(
            body["users"], subid_lines, sources, functools.partial(ctx.error, t, "users")
        )
        clash = _range_clash(uids, uid_ranges, seen_uids, seen_ranges, name)
        if clash:
            raise ctx.error(t, "users", clash)
        seen_ranges.extend((r, name) for r in uid_ranges)
        port = _typed(ctx, t, body, "port", int, DEFAULT_PORT)
        if not 0 < port < 65536:
            raise ctx.error(t, "port", f"must be 1..65535, got {port}")
        if port == 53:
            raise ctx.error(t, "port", "53 is the port the agent's DNS is redirected from")
        if port in seen_ports:
            raise ctx.error(t, "port", f"port {port} is already used by profile {seen_ports[port]}")
        seen_ports[port] = name

        rules: list[Rule] = []
        files: list[str] = []
        for item in _typed(ctx, t, body, "allowlists", list, []):
            if not isinstance(item, str):
                raise ctx.error(t, "allowlists", f"{item!r} is not a file name")
            file = item if os.path.isabs(item) else os.path.join(base_dir, item)
            try:
                text = sources.read_text(file)
            except OSError as err:
                raise ctx.error(t, "allowlists", f"cannot read {file}: {err.strerror}") from None
            rules.extend(parse_lines(text, file))
            files.append(file)
        for item in _typed(ctx, t, body, "allow", list, []):
            try:
                rules.append(
                    parse_pattern(str(item), f"{ctx.path}:{_locate(ctx.text, t, 'allow')}")
                )
            except ConfigError as err:
                raise ctx.error(t, "allow", err.detail) from None

        ports = _typed(ctx, t, body, "ports", list, [])
        for p in ports:
            if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536:
                raise ctx.error(t, "ports", f"{p!r} is not a port number")
        cidrs: list[IPNetwork] = []
        for c in _typed(ctx, t, body, "cidrs", list, []):
            try:
                net = ipaddress.ip_network(str(c), strict=True)
            except ValueError as err:
                raise ctx.error(t, "cidrs", str(err)) from None
            if net.prefixlen == 0:
                raise ctx.error(
                    t,
                    "cidrs",
                    f"{net} would let these users reach everything; "
                    "to stop restricting them, remove the profile",
                )
            cidrs.append(net)
        mark_id = _typed(ctx, t, body, "id", int, None)
        if mark_id is None:
            mark_id = default_mark_id(name, ids)
        elif not 1 <= mark_id <= ids:
            raise ctx.error(
                t, "id", f"must be 1..{ids} (what daemon.ct_mask leaves), got {mark_id}"
            )
        if mark_id in seen_ids:
            free = min(set(range(1, ids + 1)) - set(seen_ids) - {mark_id})
            raise ctx.error(
                t,
                "id",
                f"conntrack mark id {mark_id} is already profile {seen_ids[mark_id]}'s "
                f"(derived from the names); set `id = {free}` in one of them",
            )
        seen_ids[mark_id] = name
        conn_rate = _typed(ctx, t, body, "conn_rate", int, DEFAULT_CONN_RATE)
        conn_burst = _typed(ctx, t, body, "conn_burst", int, DEFAULT_CONN_BURST)
        conn_max = _typed(ctx, t, body, "conn_max", int, DEFAULT_CONN_MAX)
        mode = _typed(ctx, t, body, "mode", str, "enforce")
        if mode not in MODES:
            raise ctx.error(t, "mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        for key, value in (
            ("conn_rate", conn_rate),
            ("conn_burst", conn_burst),
            ("conn_max", conn_max),
        ):
            _positive(ctx, t, key, value)
            if value > 1_000_000:
                raise ctx.error(t, key, f"must be at most 1000000, got {value}")
        profiles.append(
            Profile(
                name=name,
                uids=uids,
                uid_ranges=uid_ranges,
                port=port,
                rules=tuple(rules),
                ports=tuple(sorted(set(ports))),
                cidrs=tuple(cidrs),
                allow_loopback=_typed(ctx, t, body, "allow_loopback", bool, False),
                allowlists=tuple(files),
                private_names=_private_names(ctx, t, body),
                private_cidrs=_private_cidrs(ctx, t, body),
                mark_id=mark_id,
                conn_rate=conn_rate,
                conn_burst=conn_burst,
                conn_max=conn_max,
                mode=mode,
            )
        )
    return tuple(profiles)


REBIND_RCODES = ("noerror", "nxdomain", "refused", "servfail")


def _rebind_rcode(ctx: _Ctx, d: dict[str, Any]) -> str:
    rcode = str(_typed(ctx, "daemon", d, "rebind_rcode", str, "noerror")).lower()
    if rcode not in REBIND_RCODES:
        raise ctx.error(
            "daemon", "rebind_rcode", f"must be one of {', '.join(REBIND_RCODES)}, got {rcode!r}"
        )
    return rcode


def _looks_like_cidr(item: str) -> bool:
    # Names have a letter in their last label; addresses and CIDRs have none, or a ':'.
    return "/" in item or ":" in item or not re.search(r"[a-zA-Z_*]", item.rsplit(".", 1)[-1])


def parse_private_cidr(item: str) -> IPNetwork:
    """One network of `private_answers` / `--allow-private`; ValueError says what is wrong."""
    net = ipaddress.ip_network(item.strip(), strict=True)
    row = host_overlap(net)
    if row is not None:
        raise ValueError(
            f"{net} overlaps {row.network} ({row.reason}): DNS never grants this host's "
            "addresses; use allow_loopback or cidrs for local services"
        )
    return net


def _private_items(ctx: _Ctx, t: str, body: dict[str, Any]) -> list[str]:
    items = _typed(ctx, t, body, "private_answers", list, [])
    for item in items:
        if not isinstance(item, str):
            raise ctx.error(t, "private_answers", f"{item!r} is neither a CIDR nor a name pattern")
    return [item.strip() for item in items]


def _private_cidrs(ctx: _Ctx, t: str, body: dict[str, Any]) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for item in _private_items(ctx, t, body):
        if _looks_like_cidr(item):
            try:
                out.append(parse_private_cidr(item))
            except ValueError as err:
                raise ctx.error(t, "private_answers", str(err)) from None
    return tuple(out)


def _private_names(ctx: _Ctx, t: str, body: dict[str, Any]) -> tuple[Rule, ...]:
    out: list[Rule] = []
    source = f"{ctx.path}:{_locate(ctx.text, t, 'private_answers')}"
    for item in _private_items(ctx, t, body):
        if _looks_like_cidr(item):
            continue
        try:
            rule = parse_pattern(item, source)
        except ConfigError as err:
            raise ctx.error(t, "private_answers", err.detail) from None
        if rule.deny:
            raise ctx.error(
                t, "private_answers", f"{item!r}: a deny pattern means nothing here; remove it"
            )
        out.append(rule)
    return tuple(out)


def _allow_private(items: Sequence[str], path: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(parse_private_cidr(item) for item in items)
    except ValueError as err:
        raise ConfigError(str(err), file=path, key="--allow-private") from None


def load(path: str, sources: Sources | None = None) -> Config:
    sources = sources or Sources()
    try:
        text = sources.read_text(path)
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", file=path) from None
    return parse(text, path, sources)


@dataclass(frozen=True)
class CommandLine:
    """The one-line form: egressd run --user U --allowlist F [--allow P]..."""

    users: Sequence[str] = field(default_factory=list)
    allowlists: Sequence[str] = field(default_factory=list)
    allow: Sequence[str] = field(default_factory=list)
    upstreams: Sequence[str] = field(default_factory=list)
    listen: str | None = None
    min_ttl: int | None = None
    allow_private: Sequence[str] = field(default_factory=list)  # CIDRs, for private test zones


def from_command_line(cl: CommandLine, sources: Sources | None = None) -> Config:
    """Build a one-profile Config ("default") from command-line options."""
    sources = sources or Sources()
    path = "<command line>"
    if not cl.users:
        raise ConfigError("--user is required without --config", file=path, key="--user")
    uids: list[int] = []
    for u in cl.users:
        uid = resolve_user(u, sources)
        if uid is None:
            raise ConfigError(f"unknown user {u!r}", file=path, key="--user")
        if uid == 0:
            raise ConfigError("refusing to restrict root (uid 0)", file=path, key="--user")
        if uid not in uids:
            uids.append(uid)
    uid_ranges = _user_ranges(
        list(cl.users),
        read_subuid_file(sources),
        sources,
        lambda msg: ConfigError(msg, file=path, key="--user"),
    )
    rules: list[Rule] = []
    for file in cl.allowlists:
        try:
            text = sources.read_text(file)
        except OSError as err:
            raise ConfigError(
                f"cannot read: {err.strerror}", file=file, key="--allowlist"
            ) from None
        rules.extend(parse_lines(text, file))
    for pattern in cl.allow:
        try:
            rules.append(parse_pattern(pattern, "--allow"))
        except ConfigError as err:
            raise ConfigError(err.detail, file=path, key="--allow") from None
    if not rules:
        raise ConfigError(
            "no allowlist: give --allowlist FILE or --allow PATTERN", file=path, key="--allowlist"
        )
    port = DEFAULT_PORT
    if cl.listen:
        try:
            port = parse_listen(cl.listen)
        except ValueError as err:
            raise ConfigError(str(err), file=path, key="--listen") from None
    grants = GrantSettings()
    if cl.min_ttl is not None:
        grants = GrantSettings(
            floor=cl.min_ttl,
            ceiling=max(grants.ceiling, cl.min_ttl),
            grace=grants.grace,
            maxelem=grants.maxelem,
        )
        check_grants(grants, lambda key, msg: ConfigError(msg, file=path, key="--min-ttl"))
    try:
        ups = [parse_upstream(u) for u in cl.upstreams]
        if not ups:
            ups = resolv_conf_upstreams(sources.read_text(sources.resolv_conf))
        if not ups:
            raise ValueError(f"no --upstream given and {sources.resolv_conf} lists no nameserver")
        _check_not_self(ups, {port})
    except (ValueError, OSError) as err:
        raise ConfigError(str(err), file=path, key="--upstream") from None
    profile = Profile(
        name="default",
        uids=tuple(uids),
        uid_ranges=uid_ranges,
        port=port,
        rules=tuple(rules),
        allowlists=tuple(cl.allowlists),
        private_cidrs=_allow_private(cl.allow_private, path),
        mark_id=default_mark_id("default", mark_ids(DEFAULT_CT_MASK)),
    )
    return Config(
        path=path, daemon=DaemonSettings(upstreams=tuple(ups)), grants=grants, profiles=(profile,)
    )


def parse_listen(text: str) -> int:
    """--listen accepts PORT, 127.0.0.1:PORT or [::1]:PORT; egressd always listens on both."""
    if text.isdigit():
        port = int(text)
    else:
        up = parse_upstream(text)
        if up.address not in ("127.0.0.1", "::1"):
            raise ValueError(
                f"{text!r}: egressd listens on 127.0.0.1 and ::1 (the REDIRECT targets)"
            )
        port = up.port
    if not 0 < port < 65536 or port == 53:
        raise ValueError(f"{text!r}: port must be 1..65535 and not 53")
    return port
