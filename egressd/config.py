"""Configuration: TOML file + allowlist files -> validated, frozen Config.

Every error names the file, the line and the key. The reading of files, the user database
and /etc/resolv.conf is injected (``Sources``) so that parsing stays testable without root.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .allowlist import Rule, parse_lines, parse_pattern
from .errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORT = 153  # privileged, so no unprivileged user can squat it while egressd is down
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


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    uids: tuple[int, ...]
    port: int = DEFAULT_PORT
    rules: tuple[Rule, ...] = ()
    ports: tuple[int, ...] = ()  # empty: every port of a granted address
    cidrs: tuple[IPNetwork, ...] = ()
    allow_loopback: bool = False
    allowlists: tuple[str, ...] = ()

    @property
    def set4(self) -> str:
        return f"egressd-{self.name}-v4"

    @property
    def set6(self) -> str:
        return f"egressd-{self.name}-v6"


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


@dataclass(frozen=True)
class Sources:
    """Where config parsing gets outside facts from (real system by default)."""

    read_text: Callable[[str], str] = _read_text
    lookup_user: Callable[[str], int] = _lookup_user
    resolv_conf: str = "/etc/resolv.conf"


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
)
_GRANT_KEYS = ("floor", "ceiling", "grace", "maxelem")
_PROFILE_KEYS = ("users", "allowlists", "allow", "port", "ports", "cidrs", "allow_loopback")


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
    profiles = _profiles(ctx, data.get("profiles", {}), sources)
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
    )
    _positive(ctx, t, "upstream_timeout", out.upstream_timeout, 0.05)
    _positive(ctx, t, "upstream_tries", out.upstream_tries)
    _positive(ctx, t, "max_inflight", out.max_inflight)
    _positive(ctx, t, "cache_entries", out.cache_entries, 0)
    _positive(ctx, t, "tcp_idle_timeout", out.tcp_idle_timeout, 0.1)
    _positive(ctx, t, "tcp_max_connections", out.tcp_max_connections)
    _positive(ctx, t, "verify_interval", out.verify_interval, 0)
    return out


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


def _profiles(ctx: _Ctx, d: dict[str, Any], sources: Sources) -> tuple[Profile, ...]:
    if not d:
        raise ctx.error("", "profiles", "no profile defined; add a [profiles.NAME] table")
    profiles: list[Profile] = []
    seen_ports: dict[int, str] = {}
    seen_uids: dict[int, str] = {}
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
        profiles.append(
            Profile(
                name=name,
                uids=uids,
                port=port,
                rules=tuple(rules),
                ports=tuple(sorted(set(ports))),
                cidrs=tuple(cidrs),
                allow_loopback=_typed(ctx, t, body, "allow_loopback", bool, False),
                allowlists=tuple(files),
            )
        )
    return tuple(profiles)


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
        port=port,
        rules=tuple(rules),
        allowlists=tuple(cl.allowlists),
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
