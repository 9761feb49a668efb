"""Configuration: the schema and its validation, TOML texts in, a frozen Config out.

Pure: this module reads no file, directory, user database or /etc/resolv.conf. The
adapter ``egressd.sources`` reads them and hands over texts and lists (``Text``,
``Facts``); here they are merged (``merge``: the main file, then conf.d drop-ins, later
wins key by key) and validated (``build``: the one function the TOML file and the
command line (``command_line``) both go through). Every error names the file, the line
and the key.
"""

from __future__ import annotations

import functools
import ipaddress
import posixpath
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
# Where the named allowlists (`presets = ["python", ...]`) are: shipped read-only by the
# package, so an upgrade updates them and the operator's own lines live elsewhere.
DEFAULT_PRESETS_DIR = "/usr/share/egressd/presets"
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
    presets_dir: str = DEFAULT_PRESETS_DIR


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
    # The operator's allowlist files: the `allowlists` key, then allowlist.d/*.list and
    # allowlist.d/PROFILE/*.list (where `egressd suggest --write` may append).
    allowlists: tuple[str, ...] = ()
    # The presets (named, read-only allowlists in DaemonSettings.presets_dir) it uses.
    presets: tuple[str, ...] = ()
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
    # Every configuration file merged, in order: the main file, then conf.d/*.toml.
    files: tuple[str, ...] = ()


# --- texts in, settings with their place out -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    """One configuration file as the sources module read it."""

    path: str
    text: str


@dataclass(frozen=True, slots=True)
class Setting:
    """One key's value and where it was written (the last file that set it)."""

    value: Any
    file: str
    line: int | None
    key: str  # as the operator spells it: "profiles.agent.users", or "--user"

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=self.line, key=self.key)

    @property
    def where(self) -> str:
        """A rule's source: ``file:line``, or the option (``--allow``)."""
        return f"{self.file}:{self.line}" if self.line is not None else self.key


@dataclass(frozen=True)
class Document:
    """The merged settings: tables "daemon", "grants" and "profiles.NAME", key by key."""

    path: str  # the main file (Config.path)
    files: tuple[str, ...]  # every file merged, in order
    tables: Mapping[str, Mapping[str, Setting]]
    # Where each table was opened (first), for errors about a table or a key it lacks.
    headers: Mapping[str, Setting]
    profiles: tuple[str, ...]  # profile names, in the order they first appear
    # Relative `allowlists` paths are relative to this directory ("" on the command line:
    # relative to the working directory).
    base_dir: str = ""
    # allowlist.d/*.list and allowlist.d/PROFILE/*.list beside the main file apply
    # (not to the one-line form, which has no configuration directory).
    drop_ins: bool = False

    def table(self, name: str) -> Mapping[str, Setting]:
        return self.tables.get(name, {})

    def at(self, table: str, key: str) -> Setting:
        """The key's setting, or (when it is not set) a place for an error about it:
        the table's header."""
        found = self.table(table).get(key)
        if found is not None:
            return found
        head = self.headers.get(table) or Setting(None, self.path, None, table)
        # A file's table: "table.key" at its header; an option stands for the keys it sets.
        dotted = f"{table}.{key}" if head.key == table else head.key
        return Setting(None, head.file, head.line, dotted)


_TABLES = ("daemon", "grants", "profiles")
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


def _place(src: Text, table: str, key: str | None) -> Setting:
    dotted = f"{table}.{key}" if table and key else (key or table)
    return Setting(None, src.path, _locate(src.text, table, key), dotted)


def _toml(src: Text) -> dict[str, Any]:
    try:
        return tomllib.loads(src.text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"line (\d+)", str(err))
        raise ConfigError(
            f"not valid TOML: {err}", file=src.path, line=int(m.group(1)) if m else None
        ) from None


def _check_keys(src: Text, table: str, data: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in data:
        if key not in allowed:
            raise _place(src, table, key).error(f"unknown key (known: {', '.join(allowed)})")


def merge(texts: Sequence[Text], base_dir: str = "", drop_ins: bool = True) -> Document:
    """The main file, then each drop-in over it: key by key per table ([daemon], [grants],
    [profiles.NAME]), the later file wins. A list is replaced, not extended, so a drop-in
    says the whole of what it sets. Unknown keys and tables are refused in the file that
    has them."""
    tables: dict[str, dict[str, Setting]] = {}
    headers: dict[str, Setting] = {}
    profiles: list[str] = []
    for src in texts:
        data = _toml(src)
        _check_keys(src, "", data, _TABLES)
        for name in _TABLES:
            if name in data and not isinstance(data[name], dict):
                raise _place(src, "", name).error("expected a table")
        sections: list[tuple[str, Mapping[str, Any], Sequence[str]]] = [
            ("daemon", data.get("daemon", {}), _DAEMON_KEYS),
            ("grants", data.get("grants", {}), _GRANT_KEYS),
        ]
        for name, body in data.get("profiles", {}).items():
            t = f"profiles.{name}"
            if not isinstance(body, dict):
                raise _place(src, "profiles", name).error("expected a table")
            if not PROFILE_NAME.match(name):
                raise _place(src, t, None).error(
                    f"profile name {name!r} must match {PROFILE_NAME.pattern} "
                    "(it becomes part of chain and set names)"
                )
            if name not in profiles:
                profiles.append(name)
            sections.append((t, body, _PROFILE_KEYS))
        for t, body, allowed in sections:
            _check_keys(src, t, body, allowed)
            if t in data or t.startswith("profiles."):
                headers.setdefault(t, _place(src, t, None))
            mine = tables.setdefault(t, {})
            for key, value in body.items():
                mine[key] = Setting(value, src.path, _locate(src.text, t, key), f"{t}.{key}")
    return Document(
        path=texts[0].path,
        files=tuple(s.path for s in texts),
        tables=tables,
        headers=headers,
        profiles=tuple(profiles),
        base_dir=base_dir,
        drop_ins=drop_ins,
    )


# --- what the sources module found ------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """Everything outside the configuration text that ``build`` needs, gathered by the
    sources module for one Document (``wanted`` says what): file contents, the user
    database, subordinate uid ranges, the presets and drop-in files there are."""

    files: Mapping[str, str] = field(default_factory=dict)  # path -> text
    unreadable: Mapping[str, str] = field(default_factory=dict)  # path -> why
    uids: Mapping[str, int] = field(default_factory=dict)  # user name -> uid (known ones)
    names: Mapping[int, str] = field(default_factory=dict)  # uid -> passwd name
    # A user's subordinate uid ranges from NSS (getsubids) as (start, count) pairs, and
    # the users whose ranges could not be read (why).
    nss_subuids: Mapping[str, Sequence[tuple[int, int]]] = field(default_factory=dict)
    nss_errors: Mapping[str, str] = field(default_factory=dict)
    # subuid(5): its text is in `files`, a read error in `unreadable`; neither: no file.
    subuid_file: str = "/etc/subuid"
    resolv_conf: str = "/etc/resolv.conf"
    # Preset name -> its file in the presets dir; None: the dir could not be listed
    # (why: unreadable[presets_dir]).
    presets: Mapping[str, str] | None = None
    # allowlist.d/*.list (every profile) and allowlist.d/PROFILE/*.list, sorted.
    allowlist_d: tuple[str, ...] = ()
    profile_allowlist_d: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def read(self, path: str) -> str:
        """A file's text; ValueError (why) when it could not be read."""
        if path in self.files:
            return self.files[path]
        raise ValueError(self.unreadable.get(path, "not read"))


@dataclass(frozen=True, slots=True)
class Wanted:
    """What ``build`` will look up for a Document: the sources module gathers these."""

    allowlists: tuple[str, ...]  # files named by `allowlists` keys
    users: tuple[int | str, ...]  # as configured (see user_key), names and uids
    presets_dir: str | None  # set when a profile names a preset
    presets: tuple[str, ...]  # the names
    profiles: tuple[str, ...]  # for allowlist.d/PROFILE/
    resolv_conf: bool  # no upstreams configured


def _list_of(s: Setting | None) -> list[Any]:
    return list(s.value) if s is not None and isinstance(s.value, list) else []


def allowlist_path(doc: Document, item: str) -> str:
    return item if posixpath.isabs(item) else posixpath.join(doc.base_dir, item)


def wanted(doc: Document) -> Wanted:
    files: list[str] = []
    users: list[int | str] = []
    presets: list[str] = []
    for name in doc.profiles:
        t = doc.table(f"profiles.{name}")
        for item in _list_of(t.get("allowlists")):
            if isinstance(item, str) and allowlist_path(doc, item) not in files:
                files.append(allowlist_path(doc, item))
        for item in _list_of(t.get("users")):
            ok = isinstance(item, int | str) and not isinstance(item, bool)
            if ok and user_key(item) not in users:
                users.append(user_key(item))
        for item in _list_of(t.get("presets")):
            if isinstance(item, str) and item not in presets:
                presets.append(item)
    return Wanted(
        allowlists=tuple(files),
        users=tuple(users),
        presets_dir=presets_dir(doc) if presets else None,
        presets=tuple(presets),
        profiles=doc.profiles,
        resolv_conf=not _list_of(doc.table("daemon").get("upstreams")),
    )


# --- values ---------------------------------------------------------------------------------


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


def user_key(item: int | str) -> int | str:
    """A configured user as the user database sees it: "1005" is uid 1005, not a name."""
    if isinstance(item, str) and item.isascii() and item.isdigit():
        return int(item)
    return item


def resolve_user(item: int | str, uids: Mapping[str, int]) -> int | None:
    """A uid from a name or number. Numeric uids need not exist in the user database."""
    key = user_key(item)
    if isinstance(key, int):
        return key if 0 <= key < 2**32 - 1 else None
    return uids.get(key)


def _users(s: Setting, facts: Facts) -> tuple[int, ...]:
    # An empty list is valid: the profile restricts nobody (yet); the restricted user is
    # chosen in a conf.d drop-in. `egressd run` refuses a config that restricts nobody.
    if not isinstance(s.value, list):
        raise s.error("expected a list of user names or uids")
    uids: list[int] = []
    for item in s.value:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise s.error(f"{item!r} is neither a user name nor a uid")
        uid = resolve_user(item, facts.uids)
        if uid is None:
            raise s.error(f"unknown user {item!r}")
        if uid == 0:
            raise s.error("refusing to restrict root (uid 0)")
        if uid not in uids:
            uids.append(uid)
    return tuple(uids)


# --- subordinate uids ------------------------------------------------------------------------
# A user with a subordinate range (useradd gives one: `agent:100000:65536` in /etc/subuid)
# can run processes as those uids through a user namespace (`unshare --map-auto`, with the
# setuid newuidmap of package uidmap). Their sockets belong to those uids, not to the
# user's, so the owner match must cover the ranges too (docs/architecture.md, invariant 4).

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


def read_subuid_file(facts: Facts) -> tuple[SubidLine, ...]:
    path = facts.subuid_file
    if path in facts.unreadable:
        raise ConfigError(f"cannot read: {facts.unreadable[path]}", file=path)
    if path not in facts.files:
        return ()  # no file: nobody has a subordinate range (newuidmap refuses all)
    return parse_subid_file(facts.files[path], path)


def subordinate_ranges(
    user: int | str, uid: int, lines: Sequence[SubidLine], facts: Facts
) -> tuple[UidRange, ...]:
    """Every subordinate uid range of one user: /etc/subuid and NSS (getsubids), merged.

    A line counts when its owner is the user's name (as configured, or its passwd name) or
    its uid: newuidmap accepts both. A numeric owner matches by value, and a uid without a
    passwd entry still gets its numeric lines: a superset is the safe side.
    """
    names: list[str] = []
    key = user_key(user)
    if isinstance(key, str):
        names.append(key)
    passwd_name = facts.names.get(uid)
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
                file=facts.subuid_file,
                line=entry.line,
            )
        found.append((entry.first, entry.last))
    for name in names:
        if name in facts.nss_errors:
            raise ConfigError(facts.nss_errors[name])
        for start, count in facts.nss_subuids.get(name, ()):
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
    facts: Facts,
    error: Callable[[str], ConfigError],
) -> tuple[UidRange, ...]:
    """The merged subordinate ranges of a profile's users. ``error`` places a problem that
    has no file line of its own (what getsubids reported) at the users key."""
    found: list[UidRange] = []
    for item in users:
        uid = resolve_user(item, facts.uids)
        if uid is None:
            continue  # _users has refused it already
        try:
            found.extend(subordinate_ranges(item, uid, lines, facts))
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


# --- the schema ------------------------------------------------------------------------------

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
    "presets_dir",
)
_GRANT_KEYS = ("floor", "ceiling", "grace", "maxelem")
_PROFILE_KEYS = (
    "users",
    "presets",
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


def _typed(table: Mapping[str, Setting], key: str, kind: type, default: Any) -> Any:
    s = table.get(key)
    if s is None:
        return default
    value = s.value
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise s.error(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _positive(s: Setting, value: float, minimum: float = 1) -> None:
    if value < minimum:
        raise s.error(f"must be at least {minimum}, got {value}")


def build(doc: Document, facts: Facts) -> Config:
    """Validate a merged Document against what the sources module found: the one way a
    Config is made, from the TOML files and from the command line alike."""
    if not doc.profiles:
        raise ConfigError(
            "no profile defined; add a [profiles.NAME] table", file=doc.path, key="profiles"
        )
    presets_dir(doc)  # before the profiles use it
    grants = _grants(doc)
    mask = _ct_mask(doc)
    profiles = _profiles(doc, facts, mark_ids(mask))
    daemon = _daemon(doc, facts, {p.port for p in profiles})
    return Config(path=doc.path, daemon=daemon, grants=grants, profiles=profiles, files=doc.files)


def restricts_nobody(config: Config) -> bool:
    """No profile names a user: valid to check, but not a state egressd runs in."""
    return not any(p.uids for p in config.profiles)


def _daemon(doc: Document, facts: Facts, ports: set[int]) -> DaemonSettings:
    d = doc.table("daemon")
    base = DaemonSettings()
    raw_up = _typed(d, "upstreams", list, [])
    try:
        ups = [parse_upstream(str(u)) for u in raw_up]
    except ValueError as err:
        raise doc.at("daemon", "upstreams").error(str(err)) from None
    source_key = "upstreams"
    if not ups:
        source_key = facts.resolv_conf
        try:
            ups = resolv_conf_upstreams(facts.read(facts.resolv_conf))
        except ValueError as err:
            raise doc.at("daemon", "upstreams").error(
                f"empty, and {facts.resolv_conf}: {err}"
            ) from None
        if not ups:
            raise doc.at("daemon", "upstreams").error(
                f"empty, and {facts.resolv_conf} lists no nameserver"
            )
    try:
        _check_not_self(ups, ports)
    except ValueError as err:
        raise doc.at("daemon", "upstreams").error(f"{err} (from {source_key})") from None
    rcode = _typed(d, "blocked_rcode", str, base.blocked_rcode).lower()
    if rcode not in ("nxdomain", "refused"):
        raise doc.at("daemon", "blocked_rcode").error(
            f"must be 'nxdomain' or 'refused', got {rcode!r}"
        )
    out = DaemonSettings(
        upstreams=tuple(ups),
        upstream_timeout=_typed(d, "upstream_timeout", float, base.upstream_timeout),
        upstream_tries=_typed(d, "upstream_tries", int, base.upstream_tries),
        blocked_rcode=rcode,
        max_inflight=_typed(d, "max_inflight", int, base.max_inflight),
        cache_entries=_typed(d, "cache_entries", int, base.cache_entries),
        tcp_idle_timeout=_typed(d, "tcp_idle_timeout", float, base.tcp_idle_timeout),
        tcp_max_connections=_typed(d, "tcp_max_connections", int, base.tcp_max_connections),
        log_rejects=_typed(d, "log_rejects", bool, base.log_rejects),
        verify_interval=_typed(d, "verify_interval", float, base.verify_interval),
        rebind_rcode=_rebind_rcode(doc),
        ct_mask=_ct_mask(doc),
        ct_mark_clash=_typed(d, "ct_mark_clash", str, base.ct_mark_clash),
        control=_typed(d, "control", str, base.control),
        metrics=_typed(d, "metrics", str, base.metrics),
        presets_dir=presets_dir(doc),
    )
    if not posixpath.isabs(out.control):
        raise doc.at("daemon", "control").error(f"must be an absolute path, got {out.control!r}")
    if out.metrics:
        problem = check_metrics_address(out.metrics)
        if problem:
            raise doc.at("daemon", "metrics").error(problem)
    if out.ct_mark_clash not in ("refuse", "warn"):
        raise doc.at("daemon", "ct_mark_clash").error(
            f"must be 'refuse' or 'warn', got {out.ct_mark_clash!r}"
        )
    for key, minimum in (
        ("upstream_timeout", 0.05),
        ("upstream_tries", 1),
        ("max_inflight", 1),
        ("cache_entries", 0),
        ("tcp_idle_timeout", 0.1),
        ("tcp_max_connections", 1),
        ("verify_interval", 0),
    ):
        _positive(doc.at("daemon", key), getattr(out, key), minimum)
    return out


def presets_dir(doc: Document) -> str:
    """The presets directory (daemon.presets_dir), checked: an absolute path."""
    path = _typed(doc.table("daemon"), "presets_dir", str, DEFAULT_PRESETS_DIR)
    if not posixpath.isabs(path):
        raise doc.at("daemon", "presets_dir").error(f"must be an absolute path, got {path!r}")
    return str(path)


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


def _ct_mask(doc: Document) -> int:
    mask = _typed(doc.table("daemon"), "ct_mask", int, DEFAULT_CT_MASK)
    problem = check_ct_mask(mask)
    if problem:
        raise doc.at("daemon", "ct_mask").error(problem)
    return int(mask)


def default_mark_id(name: str, ids: int) -> int:
    """A profile's id from its name alone: the same after every reload and restart."""
    return zlib.crc32(name.encode()) % ids + 1


def _grants(doc: Document) -> GrantSettings:
    d = doc.table("grants")
    base = GrantSettings()
    g = GrantSettings(**{k: _typed(d, k, int, getattr(base, k)) for k in _GRANT_KEYS})
    check_grants(g, lambda key, msg: doc.at("grants", key).error(msg))
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


def _profiles(doc: Document, facts: Facts, ids: int) -> tuple[Profile, ...]:
    profiles: list[Profile] = []
    seen_ports: dict[int, str] = {}
    seen_uids: dict[int, str] = {}
    seen_ranges: list[tuple[UidRange, str]] = []
    subid_lines = read_subuid_file(facts)  # once per load: a reload re-reads it
    seen_ids: dict[int, str] = {}
    for name in doc.profiles:
        t = f"profiles.{name}"
        body = doc.table(t)
        if "users" not in body:
            raise doc.at(t, "users").error(
                "missing: name the user(s) this profile restricts (users = [] for nobody yet)"
            )
        users = body["users"]
        uids = _users(users, facts)
        for uid in uids:
            if uid in seen_uids:
                raise users.error(f"uid {uid} is already in profile {seen_uids[uid]}")
            seen_uids[uid] = name
        uid_ranges = _user_ranges(users.value, subid_lines, facts, users.error)
        clash = _range_clash(uids, uid_ranges, seen_uids, seen_ranges, name)
        if clash:
            raise users.error(clash)
        seen_ranges.extend((r, name) for r in uid_ranges)
        port = _typed(body, "port", int, DEFAULT_PORT)
        if not 0 < port < 65536:
            raise doc.at(t, "port").error(f"must be 1..65535, got {port}")
        if port == 53:
            raise doc.at(t, "port").error("53 is the port the agent's DNS is redirected from")
        if port in seen_ports:
            raise doc.at(t, "port").error(
                f"port {port} is already used by profile {seen_ports[port]}"
            )
        seen_ports[port] = name

        presets, preset_rules = _presets(doc, t, facts)
        files, file_rules = _allowlists(doc, name, facts)
        rules = preset_rules + file_rules
        for item in _typed(body, "allow", list, []):
            s = body["allow"]
            try:
                rules.append(parse_pattern(str(item), s.where))
            except ConfigError as err:
                raise s.error(err.detail) from None

        ports = _typed(body, "ports", list, [])
        for p in ports:
            if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536:
                raise doc.at(t, "ports").error(f"{p!r} is not a port number")
        cidrs: list[IPNetwork] = []
        for c in _typed(body, "cidrs", list, []):
            try:
                net = ipaddress.ip_network(str(c), strict=True)
            except ValueError as err:
                raise doc.at(t, "cidrs").error(str(err)) from None
            if net.prefixlen == 0:
                raise doc.at(t, "cidrs").error(
                    f"{net} would let these users reach everything; "
                    "to stop restricting them, remove the profile",
                )
            cidrs.append(net)
        mark_id = _typed(body, "id", int, None)
        if mark_id is None:
            mark_id = default_mark_id(name, ids)
        elif not 1 <= mark_id <= ids:
            raise doc.at(t, "id").error(
                f"must be 1..{ids} (what daemon.ct_mask leaves), got {mark_id}"
            )
        if mark_id in seen_ids:
            free = min(set(range(1, ids + 1)) - set(seen_ids) - {mark_id})
            raise doc.at(t, "id").error(
                f"conntrack mark id {mark_id} is already profile {seen_ids[mark_id]}'s "
                f"(derived from the names); set `id = {free}` in one of them",
            )
        seen_ids[mark_id] = name
        conn_rate = _typed(body, "conn_rate", int, DEFAULT_CONN_RATE)
        conn_burst = _typed(body, "conn_burst", int, DEFAULT_CONN_BURST)
        conn_max = _typed(body, "conn_max", int, DEFAULT_CONN_MAX)
        mode = _typed(body, "mode", str, "enforce")
        if mode not in MODES:
            raise doc.at(t, "mode").error(f"must be one of {', '.join(MODES)}, got {mode!r}")
        for key, value in (
            ("conn_rate", conn_rate),
            ("conn_burst", conn_burst),
            ("conn_max", conn_max),
        ):
            _positive(doc.at(t, key), value)
            if value > 1_000_000:
                raise doc.at(t, key).error(f"must be at most 1000000, got {value}")
        profiles.append(
            Profile(
                name=name,
                uids=uids,
                uid_ranges=uid_ranges,
                port=port,
                rules=tuple(rules),
                ports=tuple(sorted(set(ports))),
                cidrs=tuple(cidrs),
                allow_loopback=_typed(body, "allow_loopback", bool, False),
                allowlists=tuple(files),
                presets=presets,
                private_names=_private_names(doc, t),
                private_cidrs=_private_cidrs(doc, t),
                mark_id=mark_id,
                conn_rate=conn_rate,
                conn_burst=conn_burst,
                conn_max=conn_max,
                mode=mode,
            )
        )
    return tuple(profiles)


def _presets(doc: Document, t: str, facts: Facts) -> tuple[tuple[str, ...], list[Rule]]:
    """The profile's presets (names) and their rules, from the presets dir."""
    names = _typed(doc.table(t), "presets", list, [])
    if not names:
        return (), []
    s = doc.table(t)["presets"]
    where = presets_dir(doc)
    if facts.presets is None:
        why = facts.unreadable.get(where, "cannot be listed")
        raise s.error(
            f"the presets directory {where} cannot be read: {why} (set daemon.presets_dir)"
        )
    out: list[str] = []
    rules: list[Rule] = []
    for item in names:
        if not isinstance(item, str):
            raise s.error(f"{item!r} is not a preset name")
        if item not in facts.presets:
            known = ", ".join(sorted(facts.presets)) or "none"
            raise s.error(f"unknown preset {item!r} (in {where}: {known})")
        if item in out:
            continue
        file = facts.presets[item]
        try:
            rules.extend(parse_lines(facts.read(file), file))
        except ValueError as err:
            raise s.error(f"cannot read preset {file}: {err}") from None
        out.append(item)
    return tuple(out), rules


def _allowlists(doc: Document, name: str, facts: Facts) -> tuple[list[str], list[Rule]]:
    """The operator's allowlist files of a profile and their rules: the `allowlists` key,
    then allowlist.d/*.list, then allowlist.d/PROFILE/*.list (a file named twice is read
    once)."""
    t = f"profiles.{name}"
    files: list[str] = []
    rules: list[Rule] = []
    for item in _typed(doc.table(t), "allowlists", list, []):
        s = doc.table(t)["allowlists"]
        if not isinstance(item, str):
            raise s.error(f"{item!r} is not a file name")
        file = allowlist_path(doc, item)
        if file in files:
            continue
        try:
            text = facts.read(file)
        except ValueError as err:
            raise s.error(f"cannot read {file}: {err}") from None
        rules.extend(parse_lines(text, file))
        files.append(file)
    if doc.drop_ins:
        for file in (*facts.allowlist_d, *facts.profile_allowlist_d.get(name, ())):
            if file in files:
                continue
            try:
                text = facts.read(file)
            except ValueError as err:
                raise ConfigError(f"cannot read: {err}", file=file) from None
            rules.extend(parse_lines(text, file))
            files.append(file)
    return files, rules


REBIND_RCODES = ("noerror", "nxdomain", "refused", "servfail")


def _rebind_rcode(doc: Document) -> str:
    rcode = str(_typed(doc.table("daemon"), "rebind_rcode", str, "noerror")).lower()
    if rcode not in REBIND_RCODES:
        raise doc.at("daemon", "rebind_rcode").error(
            f"must be one of {', '.join(REBIND_RCODES)}, got {rcode!r}"
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


def _private_items(doc: Document, t: str) -> list[str]:
    items = _typed(doc.table(t), "private_answers", list, [])
    for item in items:
        if not isinstance(item, str):
            raise doc.at(t, "private_answers").error(
                f"{item!r} is neither a CIDR nor a name pattern"
            )
    return [item.strip() for item in items]


def _private_cidrs(doc: Document, t: str) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for item in _private_items(doc, t):
        if _looks_like_cidr(item):
            try:
                out.append(parse_private_cidr(item))
            except ValueError as err:
                raise doc.at(t, "private_answers").error(str(err)) from None
    return tuple(out)


def _private_names(doc: Document, t: str) -> tuple[Rule, ...]:
    out: list[Rule] = []
    s = doc.at(t, "private_answers")
    for item in _private_items(doc, t):
        if _looks_like_cidr(item):
            continue
        try:
            rule = parse_pattern(item, s.where)
        except ConfigError as err:
            raise s.error(err.detail) from None
        if rule.deny:
            raise s.error(f"{item!r}: a deny pattern means nothing here; remove it")
        out.append(rule)
    return tuple(out)


# --- the one-line form -------------------------------------------------------------------------

COMMAND_LINE = "<command line>"
ONE_LINE_PROFILE = "default"


@dataclass(frozen=True)
class CommandLine:
    """The one-line form: egressd run --user U --allowlist F [--preset NAME] [--allow P]..."""

    users: Sequence[str] = field(default_factory=list)
    allowlists: Sequence[str] = field(default_factory=list)
    allow: Sequence[str] = field(default_factory=list)
    upstreams: Sequence[str] = field(default_factory=list)
    listen: str | None = None
    min_ttl: int | None = None
    allow_private: Sequence[str] = field(default_factory=list)  # CIDRs, for private test zones
    presets: Sequence[str] = field(default_factory=list)
    presets_dir: str | None = None


def command_line(cl: CommandLine) -> Document:
    """The options as the Document a config file with one profile ("default") would
    give: ``build`` then checks them as it checks a file, errors naming the option."""
    if not cl.users:
        raise ConfigError("--user is required without --config", file=COMMAND_LINE, key="--user")
    if not (cl.allowlists or cl.allow or cl.presets):
        raise ConfigError(
            "no allowlist: give --allowlist FILE, --preset NAME or --allow PATTERN",
            file=COMMAND_LINE,
            key="--allowlist",
        )

    def opt(value: Any, option: str) -> Setting:
        return Setting(value, COMMAND_LINE, None, option)

    profile = {
        "users": opt(list(cl.users), "--user"),
        "presets": opt(list(cl.presets), "--preset"),
        "allowlists": opt(list(cl.allowlists), "--allowlist"),
        "allow": opt(list(cl.allow), "--allow"),
        "private_answers": opt(list(cl.allow_private), "--allow-private"),
    }
    if cl.listen:
        try:
            profile["port"] = opt(parse_listen(cl.listen), "--listen")
        except ValueError as err:
            raise ConfigError(str(err), file=COMMAND_LINE, key="--listen") from None
    daemon: dict[str, Setting] = {}
    if cl.upstreams:
        daemon["upstreams"] = opt(list(cl.upstreams), "--upstream")
    if cl.presets_dir is not None:
        daemon["presets_dir"] = opt(cl.presets_dir, "--presets-dir")
    grants: dict[str, Setting] = {}
    if cl.min_ttl is not None:
        grants["floor"] = opt(cl.min_ttl, "--min-ttl")
        grants["ceiling"] = opt(max(GrantSettings().ceiling, cl.min_ttl), "--min-ttl")
    t = f"profiles.{ONE_LINE_PROFILE}"
    return Document(
        path=COMMAND_LINE,
        files=(),
        tables={"daemon": daemon, "grants": grants, t: profile},
        # No line to point at: an error about a key the options did not set names the
        # option that would set it.
        headers={
            "daemon": opt(None, "--upstream"),
            "grants": opt(None, "--min-ttl"),
            t: opt(None, "--user"),
        },
        profiles=(ONE_LINE_PROFILE,),
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
