"""Configuration parsing (egressd.config) with injected Sources: no real files, users or
/etc/resolv.conf are read (except the shipped example config at the end)."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from egressd.allowlist import Scope
from egressd.config import (
    _DAEMON_KEYS,
    _GRANT_KEYS,
    _PROFILE_KEYS,
    DEFAULT_PORT,
    DEFAULT_PRESETS_DIR,
    CommandLine,
    Config,
    DaemonSettings,
    GrantSettings,
    Upstream,
    merge_ranges,
    parse_listen,
    parse_subid_file,
    parse_upstream,
    resolv_conf_upstreams,
    restricts_nobody,
)
from egressd.errors import ConfigError
from egressd.sources import Sources, from_command_line, load, parse

CONF = "/etc/egressd/egressd.toml"
RESOLV = "/test/resolv.conf"
USERS = {"agent": 1000, "agent2": 1001, "builder": 1002, "root": 0, "toor": 0}
REPO = Path(__file__).resolve().parents[2]


def sources(
    files: Mapping[str, str] | None = None,
    users: Mapping[str, int] | None = None,
    resolv: str | None = "nameserver 192.0.2.53\n",
) -> Sources:
    data = dict(files or {})
    if resolv is not None:
        data.setdefault(RESOLV, resolv)
    table = dict(USERS if users is None else users)

    def read_text(path: str) -> str:
        try:
            return data[path]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None

    def lookup_user(name: str) -> int:
        return table[name]  # KeyError for unknown users, like pwd.getpwnam

    def list_dir(path: str) -> list[str]:
        # a directory is there when a file below it is
        prefix = path.rstrip("/") + "/"
        names = {p[len(prefix) :].split("/")[0] for p in data if p.startswith(prefix)}
        if not names:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return sorted(names)

    return Sources(
        read_text=read_text, lookup_user=lookup_user, resolv_conf=RESOLV, list_dir=list_dir
    )


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based number of the nth line containing needle."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) >= nth, f"{needle!r} not in text"
    return hits[nth - 1]


def parse_error(text: str, src: Sources | None = None, path: str = CONF) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        parse(text, path, src or sources())
    return exc.value


MINIMAL = """\
[profiles.agent]
users = ["agent"]
allow = ["example.com"]
"""


# --- valid configurations --------------------------------------------------------------------


FULL = """\
# a full configuration
[daemon]
upstreams = ["192.0.2.1", "192.0.2.2:5353", "[2001:db8::1]", "[2001:db8::2]:5300"]
upstream_timeout = 1.5
upstream_tries = 5
blocked_rcode = "REFUSED"
max_inflight = 64
cache_entries = 0
tcp_idle_timeout = 3
tcp_max_connections = 7
log_rejects = false
verify_interval = 0

[grants]
floor = 120
ceiling = 3600
grace = 30
maxelem = 1024

[profiles.agent]
users = ["agent", 1001, "1005", "agent"]
allowlists = ["allowlist.d/base.txt", "/srv/lists/extra.txt"]
allow = ["inline.example", "!bad.inline.example"]
port = 154
ports = [443, 80, 443, 22]
cidrs = ["10.0.0.0/8", "fd00::/8"]
allow_loopback = true

[profiles."build-2"]
users = ["builder"]
allow = ["**.pypi.org"]
port = 155
"""

FILES = {
    "/etc/egressd/allowlist.d/base.txt": "# base\n**.example.com\n*.example.org\n",
    "/srv/lists/extra.txt": "\n!ads.example.com\n",
}


def test_full_config() -> None:
    cfg = parse(FULL, CONF, sources(FILES))
    assert isinstance(cfg, Config)
    assert cfg.path == CONF
    assert cfg.daemon == DaemonSettings(
        upstreams=(
            Upstream("192.0.2.1", 53),
            Upstream("192.0.2.2", 5353),
            Upstream("2001:db8::1", 53),
            Upstream("2001:db8::2", 5300),
        ),
        upstream_timeout=1.5,
        upstream_tries=5,
        blocked_rcode="refused",
        max_inflight=64,
        cache_entries=0,
        tcp_idle_timeout=3.0,
        tcp_max_connections=7,
        log_rejects=False,
        verify_interval=0.0,
    )
    assert isinstance(cfg.daemon.tcp_idle_timeout, float)
    assert cfg.grants == GrantSettings(floor=120, ceiling=3600, grace=30, maxelem=1024)
    assert [p.name for p in cfg.profiles] == ["agent", "build-2"]

    agent, build = cfg.profiles
    assert agent.uids == (1000, 1001, 1005)  # duplicates dropped, order kept
    assert agent.port == 154
    assert agent.ports == (22, 80, 443)  # sorted, de-duplicated
    assert agent.cidrs == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert agent.allow_loopback is True
    assert agent.allowlists == ("/etc/egressd/allowlist.d/base.txt", "/srv/lists/extra.txt")
    assert [(r.pattern, r.source) for r in agent.rules] == [
        ("**.example.com", "/etc/egressd/allowlist.d/base.txt:2"),
        ("*.example.org", "/etc/egressd/allowlist.d/base.txt:3"),
        ("!ads.example.com", "/srv/lists/extra.txt:2"),
        ("inline.example", f"{CONF}:{line_of(FULL, 'allow = [')}"),
        ("!bad.inline.example", f"{CONF}:{line_of(FULL, 'allow = [')}"),
    ]
    assert agent.set4 == "egressd-agent-v4" and agent.set6 == "egressd-agent-v6"

    assert build.uids == (1002,)
    assert build.port == 155
    assert [r.scope for r in build.rules] == [Scope.SUBTREE]
    assert build.ports == () and build.cidrs == () and build.allow_loopback is False


def test_defaults() -> None:
    cfg = parse(MINIMAL, CONF, sources(resolv="nameserver 192.0.2.53\n"))
    assert cfg.daemon == DaemonSettings(upstreams=(Upstream("192.0.2.53"),))
    assert cfg.grants == GrantSettings()
    assert cfg.grants == GrantSettings(floor=300, ceiling=86400, grace=60, maxelem=65536)
    (p,) = cfg.profiles
    assert p.name == "agent"
    assert p.uids == (1000,)
    assert p.port == DEFAULT_PORT == 153
    assert p.ports == () and p.cidrs == () and p.allow_loopback is False
    assert p.allowlists == ()
    assert [r.pattern for r in p.rules] == ["example.com"]


def test_numeric_uids_need_not_exist() -> None:
    cfg = parse('[profiles.a]\nusers = [4242, "4343"]\nallow = ["x.example"]\n', CONF, sources())
    assert cfg.profiles[0].uids == (4242, 4343)


def test_profile_without_rules_is_allowed() -> None:
    # Everything blocked is a legitimate (if useless) policy.
    cfg = parse('[profiles.a]\nusers = ["agent"]\n', CONF, sources())
    assert cfg.profiles[0].rules == ()


def test_load_reads_through_sources() -> None:
    cfg = load(CONF, sources({CONF: MINIMAL}))
    assert cfg.path == CONF and cfg.profiles[0].name == "agent"
    with pytest.raises(ConfigError) as exc:
        load("/nope.toml", sources())
    assert exc.value.file == "/nope.toml"


# --- unknown keys, and where they are ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle", "key"),
    [
        ("bogus = 1\n" + MINIMAL, "bogus", "bogus"),
        (MINIMAL + "\n[daemon]\nupstreams = []\nbogus = true\n", "bogus", "daemon.bogus"),
        (MINIMAL + "[grants]\nfloor = 300\n\n  bogus=1\n", "bogus", "grants.bogus"),
        (
            MINIMAL + "port = 154\nallow_loopbak = true\n",
            "allow_loopbak",
            "profiles.agent.allow_loopbak",
        ),
        ('[profiles.agent]\n"users" = ["agent"]\n"bogus" = 1\n', '"bogus"', "profiles.agent.bogus"),
        (MINIMAL + "\n[bogus]\nx = 1\n", "[bogus]", "bogus"),
        (MINIMAL + "\n[bogus.sub]\nx = 1\n", "[bogus.sub]", "bogus"),
        (
            MINIMAL + "\n[profiles.agent.bogus]\nx = 1\n",
            "[profiles.agent.bogus]",
            "profiles.agent.bogus",
        ),
        (MINIMAL + "bogus.x = 1\n", "bogus.x", "profiles.agent.bogus"),
        (
            MINIMAL + "\n[daemon]\nlog_rejects = true\n\n[daemon.bogus]\n",
            "[daemon.bogus]",
            "daemon.bogus",
        ),
    ],
    ids=[
        "top",
        "daemon",
        "grants",
        "profile",
        "quoted",
        "top-table",
        "top-dotted-table",
        "profile-subtable",
        "profile-dotted-key",
        "daemon-subtable",
    ],
)
def test_unknown_key_names_file_line_and_key(text: str, needle: str, key: str) -> None:
    err = parse_error(text)
    assert err.file == CONF
    assert err.key == key
    assert err.line == line_of(text, needle)
    assert "unknown key" in str(err)
    assert str(err).startswith(f"{CONF}:{err.line}: key '{key}': ")


def test_unknown_key_lists_known_ones() -> None:
    err = parse_error(MINIMAL + "[grants]\nflor = 1\n")
    assert "floor" in str(err) and "maxelem" in str(err)


def test_table_that_is_not_a_table() -> None:
    err = parse_error("daemon = 1\n" + MINIMAL)
    assert (err.key, err.line) == ("daemon", 1)
    err = parse_error("[profiles]\nagent = 5\n")
    assert (err.key, err.line) == ("profiles.agent", 2)


def test_bad_toml_reports_line() -> None:
    text = MINIMAL + "port = \n[daemon]\n"
    err = parse_error(text)
    assert err.file == CONF
    assert err.line == line_of(text, "port =")
    assert "not valid TOML" in str(err)
    text2 = '[profiles.agent]\nusers = ["agent"]\nusers = ["agent2"]\n'  # duplicate key
    assert parse_error(text2).line == 3


def test_no_profiles() -> None:
    err = parse_error("[daemon]\nupstreams = []\n")
    assert err.key == "profiles" and "no profile" in str(err)
    assert parse_error("").key == "profiles"


@pytest.mark.parametrize("name", ["Agent", "-agent", "a" * 16, "a.b", "agent!", "ägent"])
def test_bad_profile_names(name: str) -> None:
    text = f'[profiles."{name}"]\nusers = ["agent"]\n'
    err = parse_error(text)
    assert err.line == 1
    assert "profile name" in str(err)


def test_longest_profile_name() -> None:
    cfg = parse(f'[profiles.{"a" * 15}]\nusers = ["agent"]\n', CONF, sources())
    assert cfg.profiles[0].name == "a" * 15


# --- users -----------------------------------------------------------------------------------


def test_unknown_user_names_users_line() -> None:
    text = '[profiles.agent]\n# who\n\nusers = ["agent", "nobody-here"]\nallow = []\n'
    err = parse_error(text)
    assert (err.file, err.line, err.key) == (CONF, 4, "profiles.agent.users")
    assert "unknown user 'nobody-here'" in str(err)


@pytest.mark.parametrize("users", ['["root"]', '["toor"]', "[0]", '["0"]', '["agent", 0]'])
def test_root_is_refused(users: str) -> None:
    text = f"[profiles.agent]\nallow = []\nusers = {users}\n"
    err = parse_error(text)
    assert (err.line, err.key) == (3, "profiles.agent.users")
    assert "root" in str(err)


@pytest.mark.parametrize(
    "users",
    [
        '"agent"',
        "[true]",
        "[1.5]",
        "[-1]",
        "[4294967295]",
        '["4294967295"]',
        '["²"]',
        '["١٢"]',
    ],
)
def test_bad_users_values(users: str) -> None:
    err = parse_error(f"[profiles.agent]\nusers = {users}\n")
    assert (err.line, err.key) == (2, "profiles.agent.users")


def test_users_missing() -> None:
    err = parse_error('[profiles.agent]\nallow = ["a.example"]\n')
    assert err.key == "profiles.agent.users" and err.line == 1
    assert "missing" in str(err)


def test_duplicate_uid_across_profiles() -> None:
    text = (
        '[profiles.a]\nusers = ["agent"]\n\n'
        "[profiles.b]\nport = 154\nusers = [1000]\n"  # 1000 is "agent"
    )
    err = parse_error(text)
    assert (err.line, err.key) == (6, "profiles.b.users")
    assert "1000" in str(err) and "profile a" in str(err)


# --- ports -----------------------------------------------------------------------------------


def test_duplicate_port() -> None:
    text = (
        '[profiles.a]\nusers = ["agent"]\nport = 154\n\n'
        '[profiles.b]\nusers = ["agent2"]\nport = 154\n'
    )
    err = parse_error(text)
    assert (err.line, err.key) == (7, "profiles.b.port")
    assert "already used by profile a" in str(err)


def test_duplicate_default_port_points_at_profile_header() -> None:
    text = '[profiles.a]\nusers = ["agent"]\n\n[profiles.b]\nusers = ["agent2"]\n'
    err = parse_error(text)
    assert (err.line, err.key) == (4, "profiles.b.port")


@pytest.mark.parametrize("port", ["53", "0", "65536", "-1", '"154"', "true", "15.3"])
def test_bad_listener_port(port: str) -> None:
    text = f'[profiles.a]\nusers = ["agent"]\nport = {port}\n'
    err = parse_error(text)
    assert (err.line, err.key) == (3, "profiles.a.port")
    if port == "53":
        assert "53" in str(err) and "redirected" in str(err)


@pytest.mark.parametrize("ports", ["[0]", "[65536]", '["443"]', "[true]", '"443"', "[1.5]"])
def test_bad_destination_ports(ports: str) -> None:
    text = f'[profiles.a]\nusers = ["agent"]\nports = {ports}\n'
    err = parse_error(text)
    assert (err.line, err.key) == (3, "profiles.a.ports")


@pytest.mark.parametrize(
    "cidr",
    ['"10.0.0.1/8"', '"example.com"', '"10.0.0.0/33"', '"fd00::1/8"', '"0.0.0.0/0"', '"::/0"'],
)
def test_bad_cidrs(cidr: str) -> None:
    text = f'[profiles.a]\nusers = ["agent"]\ncidrs = [{cidr}]\n'
    err = parse_error(text)
    assert (err.line, err.key) == (3, "profiles.a.cidrs")


# --- allowlists --------------------------------------------------------------------------------


def test_bad_pattern_in_allowlist_file_names_that_file_and_line() -> None:
    files = {"/etc/egressd/lists/a.txt": "# ok\nexample.com\n\nwww.*.example.com\n"}
    text = '[profiles.a]\nusers = ["agent"]\nallowlists = ["lists/a.txt"]\n'
    err = parse_error(text, sources(files))
    assert err.file == "/etc/egressd/lists/a.txt"
    assert err.line == 4
    assert str(err).startswith("/etc/egressd/lists/a.txt:4: ")


def test_missing_allowlist_file() -> None:
    text = '[profiles.a]\nusers = ["agent"]\n\nallowlists = ["gone.txt"]\n'
    err = parse_error(text)
    assert (err.file, err.line, err.key) == (CONF, 4, "profiles.a.allowlists")
    assert "/etc/egressd/gone.txt" in str(err)


def test_allowlists_must_be_strings() -> None:
    err = parse_error('[profiles.a]\nusers = ["agent"]\nallowlists = [1]\n')
    assert (err.line, err.key) == (3, "profiles.a.allowlists")


def test_relative_allowlist_paths_are_relative_to_the_config_file() -> None:
    files = {
        "/opt/conf/lists/a.txt": "a.example\n",
        "/opt/conf/b.txt": "b.example\n",
        "/abs/c.txt": "c.example\n",
    }
    text = '[profiles.a]\nusers = ["agent"]\nallowlists = ["lists/a.txt", "b.txt", "/abs/c.txt"]\n'
    cfg = parse(text, "/opt/conf/egressd.toml", sources(files))
    p = cfg.profiles[0]
    assert p.allowlists == ("/opt/conf/lists/a.txt", "/opt/conf/b.txt", "/abs/c.txt")
    assert [r.source for r in p.rules] == [
        "/opt/conf/lists/a.txt:1",
        "/opt/conf/b.txt:1",
        "/abs/c.txt:1",
    ]


def test_relative_config_path_resolves_against_cwd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    files = {str(tmp_path / "conf" / "l.txt"): "l.example\n"}
    cfg = parse(
        '[profiles.a]\nusers = ["agent"]\nallowlists = ["l.txt"]\n', "conf/e.toml", sources(files)
    )
    assert cfg.profiles[0].allowlists == (str(tmp_path / "conf" / "l.txt"),)


def test_inline_allow_bad_pattern() -> None:
    text = '[profiles.a]\nusers = ["agent"]\n\nallow = ["ok.example", ".bad.example"]\n'
    err = parse_error(text)
    assert (err.file, err.line, err.key) == (CONF, 4, "profiles.a.allow")
    assert "'**.bad.example'" in str(err)


def test_inline_allow_rules_name_the_config_line() -> None:
    text = '[profiles.a]\nusers = ["agent"]\nallow = [\n  "a.example",\n  "!b.example",\n]\n'
    rules = parse(text, CONF, sources()).profiles[0].rules
    assert [r.source for r in rules] == [f"{CONF}:3", f"{CONF}:3"]
    assert [r.deny for r in rules] == [False, True]


# --- upstreams ---------------------------------------------------------------------------------


RESOLV_CONF = """\
# generated
; also a comment
search example.internal
options edns0 trust-ad
nameserver 192.0.2.1   # first
nameserver 2001:db8::53
nameserver fe80::1%eth0
;nameserver 192.0.2.99
# nameserver 192.0.2.98
nameserver not-an-address
nameserver
nameserver 0.0.0.0
  nameserver   192.0.2.2
"""


def test_upstreams_default_to_resolv_conf() -> None:
    cfg = parse(MINIMAL, CONF, sources(resolv=RESOLV_CONF))
    assert cfg.daemon.upstreams == (
        Upstream("192.0.2.1"),
        Upstream("2001:db8::53"),
        Upstream("fe80::1%eth0"),  # the zone id is kept: without it the address is unusable
        Upstream("192.0.2.2"),
    )


def test_resolv_conf_upstreams_helper() -> None:
    assert resolv_conf_upstreams("") == []
    assert resolv_conf_upstreams("nameserver ::1\n") == [Upstream("::1", 53)]
    assert resolv_conf_upstreams("nameserver 127.0.0.53\noptions x\n") == [Upstream("127.0.0.53")]


@pytest.mark.parametrize("resolv", ["", "# nothing\nsearch x\n", "nameserver bogus\n"])
def test_empty_resolv_conf_is_an_error(resolv: str) -> None:
    text = MINIMAL + "[daemon]\nupstreams = []\n"
    err = parse_error(text, sources(resolv=resolv))
    assert (err.key, err.line) == ("daemon.upstreams", line_of(text, "upstreams"))
    assert RESOLV in str(err) and "no nameserver" in str(err)


def test_missing_resolv_conf_is_an_error() -> None:
    err = parse_error(MINIMAL, sources(resolv=None))
    assert err.key == "daemon.upstreams"
    assert RESOLV in str(err)


def test_explicit_upstreams_override_resolv_conf() -> None:
    text = MINIMAL + '[daemon]\nupstreams = ["198.51.100.1:5353"]\n'
    # resolv.conf would point at ourselves, and is not read at all
    cfg = parse(text, CONF, sources(resolv=None))
    assert cfg.daemon.upstreams == (Upstream("198.51.100.1", 5353),)


@pytest.mark.parametrize(
    "up", ["127.0.0.1:153", "[::1]:153", "127.0.0.2:153", "[::ffff:127.0.0.1]:153"]
)
def test_upstream_at_our_own_listener_is_refused(up: str) -> None:
    text = MINIMAL + f'[daemon]\nupstreams = ["192.0.2.1", "{up}"]\n'
    err = parse_error(text)
    assert (err.key, err.line) == ("daemon.upstreams", line_of(text, "upstreams"))
    assert "query itself" in str(err)


def test_upstream_at_another_profiles_listener_is_refused() -> None:
    text = (
        MINIMAL + '[profiles.b]\nusers = ["agent2"]\nport = 200\n'
        '[daemon]\nupstreams = ["127.0.0.1:200"]\n'
    )
    assert "query itself" in str(parse_error(text))


def test_loopback_upstream_on_another_port_is_fine() -> None:
    cfg = parse(MINIMAL, CONF, sources(resolv="nameserver 127.0.0.53\n"))
    assert cfg.daemon.upstreams == (Upstream("127.0.0.53", 53),)


@pytest.mark.parametrize(
    "up",
    [
        '"dns.google"',
        '"192.0.2.1:0"',
        '"192.0.2.1:x"',
        '"0.0.0.0"',
        '"[::]:53"',
        '"[::1"',
        '"192.0.2.1:70000"',
    ],
)
def test_bad_upstreams(up: str) -> None:
    text = MINIMAL + f"[daemon]\nupstreams = [{up}]\n"
    err = parse_error(text)
    assert (err.key, err.line) == ("daemon.upstreams", line_of(text, "upstreams"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", Upstream("192.0.2.1", 53)),
        (" 192.0.2.1:5353 ", Upstream("192.0.2.1", 5353)),
        ("2001:db8::1", Upstream("2001:db8::1", 53)),
        ("[2001:DB8::1]", Upstream("2001:db8::1", 53)),
        ("[2001:db8::1]:853", Upstream("2001:db8::1", 853)),
    ],
)
def test_parse_upstream(text: str, expected: Upstream) -> None:
    assert parse_upstream(text) == expected


def test_upstream_str() -> None:
    assert str(Upstream("192.0.2.1", 53)) == "192.0.2.1:53"
    assert str(Upstream("2001:db8::1", 5353)) == "[2001:db8::1]:5353"


# --- daemon settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ('blocked_rcode = "servfail"', "blocked_rcode"),
        ("blocked_rcode = 5", "blocked_rcode"),
        ("upstream_timeout = 0", "upstream_timeout"),
        ('upstream_timeout = "2"', "upstream_timeout"),
        ("upstream_tries = 0", "upstream_tries"),
        ("upstream_tries = 1.5", "upstream_tries"),
        ("max_inflight = 0", "max_inflight"),
        ("cache_entries = -1", "cache_entries"),
        ("tcp_idle_timeout = 0.01", "tcp_idle_timeout"),
        ("tcp_max_connections = 0", "tcp_max_connections"),
        ("log_rejects = 1", "log_rejects"),
        ("verify_interval = -1", "verify_interval"),
        ('upstreams = "192.0.2.1"', "upstreams"),
    ],
)
def test_bad_daemon_settings(setting: str, key: str) -> None:
    text = MINIMAL + f"\n[daemon]\n{setting}\n"
    err = parse_error(text)
    assert (err.key, err.line) == (f"daemon.{key}", line_of(text, setting))


@pytest.mark.parametrize(
    ("value", "expected"), [('"nxdomain"', "nxdomain"), ('"Refused"', "refused")]
)
def test_blocked_rcode(value: str, expected: str) -> None:
    cfg = parse(MINIMAL + f"[daemon]\nblocked_rcode = {value}\n", CONF, sources())
    assert cfg.daemon.blocked_rcode == expected


# --- grants ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "key", "words"),
    [
        ("floor = 0", "floor", "permanent"),
        ("floor = -5", "floor", "at least 1"),
        ("floor = 600\nceiling = 599", "ceiling", "at least floor"),
        ("grace = -1", "grace", "negative"),
        ("ceiling = 1999941", "ceiling", "2000000"),
        ("maxelem = 127", "maxelem", "between 128"),
        ("maxelem = 16777217", "maxelem", "between 128"),
        ('floor = "300"', "floor", "expected int"),
        ("floor = true", "floor", "expected int"),
        ("floor = 300.5", "floor", "expected int"),
    ],
)
def test_bad_grants(setting: str, key: str, words: str) -> None:
    text = MINIMAL + f"[grants]\n{setting}\n"
    err = parse_error(text)
    assert err.key == f"grants.{key}"
    assert err.line == line_of(text, f"{key} =")
    assert words in str(err)


@pytest.mark.parametrize(
    "setting",
    [
        "floor = 1",
        "floor = 600\nceiling = 600",
        "maxelem = 128",
        "maxelem = 16777216",
        "grace = 0",
        "ceiling = 1999940",
    ],
)
def test_grant_bounds_accepted(setting: str) -> None:
    parse(MINIMAL + f"[grants]\n{setting}\n", CONF, sources())


# --- the one-line form -------------------------------------------------------------------------


def cl_sources(**files: str) -> Sources:
    return sources({f"/l/{k}.txt": v for k, v in files.items()})


def test_from_command_line() -> None:
    cl = CommandLine(
        users=["agent", "4242"],
        allowlists=["/l/a.txt"],
        allow=["**.example.com", "!ads.example.com"],
        upstreams=["192.0.2.9", "[2001:db8::9]:5353"],
        listen="127.0.0.1:154",
        min_ttl=30,
    )
    cfg = from_command_line(cl, cl_sources(a="a.example\n"))
    assert cfg.path == "<command line>"
    (p,) = cfg.profiles
    assert p.name == "default" and p.uids == (1000, 4242) and p.port == 154
    assert [(r.pattern, r.source) for r in p.rules] == [
        ("a.example", "/l/a.txt:1"),
        ("**.example.com", "--allow"),
        ("!ads.example.com", "--allow"),
    ]
    assert p.allowlists == ("/l/a.txt",)
    assert cfg.daemon.upstreams == (Upstream("192.0.2.9"), Upstream("2001:db8::9", 5353))
    assert cfg.grants == GrantSettings(floor=30, ceiling=86400, grace=60, maxelem=65536)


def test_from_command_line_defaults() -> None:
    cfg = from_command_line(CommandLine(users=["agent"], allow=["a.example"]), sources())
    assert cfg.profiles[0].port == 153
    assert cfg.grants == GrantSettings()
    assert cfg.daemon == DaemonSettings(upstreams=(Upstream("192.0.2.53"),))


def test_min_ttl_above_ceiling_raises_ceiling() -> None:
    cfg = from_command_line(
        CommandLine(users=["agent"], allow=["a.example"], min_ttl=100000), sources()
    )
    assert cfg.grants.floor == 100000 and cfg.grants.ceiling == 100000


@pytest.mark.parametrize(
    ("cl", "key"),
    [
        (CommandLine(allow=["a.example"]), "--user"),
        (CommandLine(users=["nobody-here"], allow=["a.example"]), "--user"),
        (CommandLine(users=["root"], allow=["a.example"]), "--user"),
        (CommandLine(users=["0"], allow=["a.example"]), "--user"),
        (CommandLine(users=["²"], allow=["a.example"]), "--user"),
        (CommandLine(users=["agent"]), "--allowlist"),
        (CommandLine(users=["agent"], allowlists=["/l/missing.txt"]), "--allowlist"),
        (CommandLine(users=["agent"], allow=["*"]), "--allow"),
        (CommandLine(users=["agent"], allow=["a.example"], min_ttl=0), "--min-ttl"),
        (CommandLine(users=["agent"], allow=["a.example"], min_ttl=-1), "--min-ttl"),
        (CommandLine(users=["agent"], allow=["a.example"], min_ttl=3_000_000), "--min-ttl"),
        (CommandLine(users=["agent"], allow=["a.example"], listen="53"), "--listen"),
        (CommandLine(users=["agent"], allow=["a.example"], listen="10.0.0.1:154"), "--listen"),
        (CommandLine(users=["agent"], allow=["a.example"], listen="localhost:154"), "--listen"),
        (CommandLine(users=["agent"], allow=["a.example"], upstreams=["dns.google"]), "--upstream"),
        (
            CommandLine(users=["agent"], allow=["a.example"], upstreams=["127.0.0.1:153"]),
            "--upstream",
        ),
        (
            CommandLine(
                users=["agent"], allow=["a.example"], listen="[::1]:200", upstreams=["[::1]:200"]
            ),
            "--upstream",
        ),
    ],
)
def test_from_command_line_errors(cl: CommandLine, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        from_command_line(cl, sources())
    assert exc.value.key == key


def test_from_command_line_bad_allowlist_names_file_and_line() -> None:
    with pytest.raises(ConfigError) as exc:
        from_command_line(
            CommandLine(users=["agent"], allowlists=["/l/a.txt"]), cl_sources(a="ok.example\n*\n")
        )
    assert (exc.value.file, exc.value.line) == ("/l/a.txt", 2)


def test_from_command_line_resolv_conf_errors() -> None:
    for src in (sources(resolv=""), sources(resolv=None)):
        with pytest.raises(ConfigError) as exc:
            from_command_line(CommandLine(users=["agent"], allow=["a.example"]), src)
        assert exc.value.key == "--upstream"


def test_from_command_line_explicit_upstreams_skip_resolv_conf() -> None:
    cfg = from_command_line(
        CommandLine(users=["agent"], allow=["a.example"], upstreams=["192.0.2.7"]),
        sources(resolv=None),
    )
    assert cfg.daemon.upstreams == (Upstream("192.0.2.7"),)


@pytest.mark.parametrize(
    ("text", "port"),
    [("154", 154), ("127.0.0.1:154", 154), ("[::1]:5353", 5353), ("1", 1), ("65535", 65535)],
)
def test_parse_listen(text: str, port: int) -> None:
    assert parse_listen(text) == port


@pytest.mark.parametrize(
    "text",
    [
        "53",
        "0",
        "65536",
        "127.0.0.1:53",
        "127.0.0.1",
        "::1",
        "0.0.0.0:154",
        "192.0.2.1:154",
        "[::]:154",
        "localhost:154",
        "",
        "abc",
        "127.0.0.1:0",
        "²",
    ],
)
def test_parse_listen_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


# --- the shipped example ----------------------------------------------------------------------


def shipped_sources(tmp: Path) -> Sources:
    """The real files of a copy of etc/egressd, the checkout's presets/, fake users."""
    uids: dict[str, int] = {}

    def lookup_user(name: str) -> int:
        # every user name the example mentions exists, each with its own uid
        return uids.setdefault(name, 2000 + len(uids))

    resolv = tmp / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    presets = str(REPO / "presets")
    return Sources(
        lookup_user=lookup_user,
        lookup_name=lambda uid: None,
        resolv_conf=str(resolv),
        subuid_file=str(tmp / "no-subuid"),
        host_path=lambda p: presets if p == DEFAULT_PRESETS_DIR else p,
    )


def test_shipped_example_config_parses(tmp_path: Path) -> None:
    # As shipped (a conffile the installer never edits) it restricts nobody: valid, and
    # `egressd run` refuses it until conf.d names the user.
    etc = tmp_path / "egressd"
    shutil.copytree(REPO / "etc" / "egressd", etc)
    cfg = load(str(etc / "egressd.toml"), shipped_sources(tmp_path))
    assert [p.name for p in cfg.profiles] == ["agent"]
    (p,) = cfg.profiles
    assert p.uids == () and restricts_nobody(cfg)
    assert p.presets == ("python", "node", "github")
    assert p.allowlists == (str(etc / "allowlist.d" / "local.list"),)
    assert p.rules and all(r.source.startswith(str(REPO / "presets")) for r in p.rules)
    assert cfg.daemon.presets_dir == DEFAULT_PRESETS_DIR
    assert cfg.daemon.upstreams

    # what install writes
    (etc / "conf.d").mkdir()
    (etc / "conf.d" / "50-install.toml").write_text(
        '[profiles.agent]\nusers = ["agent"]\n'
        'presets = ["python", "node", "github", "claude-code"]\n'
    )
    cfg = load(str(etc / "egressd.toml"), shipped_sources(tmp_path))
    (p,) = cfg.profiles
    assert p.uids == (2000,) and not restricts_nobody(cfg)
    assert p.presets == ("python", "node", "github", "claude-code")
    assert cfg.files == (str(etc / "egressd.toml"), str(etc / "conf.d" / "50-install.toml"))


def test_shipped_example_documents_every_key() -> None:
    text = (REPO / "etc" / "egressd" / "egressd.toml").read_text()
    for key in (*_DAEMON_KEYS, *_GRANT_KEYS, *_PROFILE_KEYS):
        assert re.search(rf"^#? ?{key} = ", text, re.M), f"{key} is not shown in the example"


def test_from_command_line_deduplicates_users() -> None:
    cl = CommandLine(users=["agent", "1000", "agent2", "agent"], allow=["a.example"])
    assert from_command_line(cl, sources()).profiles[0].uids == (1000, 1001)


def test_line_numbers_count_newlines_only() -> None:
    # TOML lines end at \n; U+2028 in a comment must not shift the reported line
    text = '[profiles.a]\n# a\u2028b\nusers = ["nobody-here"]\n'
    assert parse_error(text).line == 3


# --- subordinate uid ranges (/etc/subuid and getsubids) ----------------------------------------

SUBUID = "/test/subuid"
NAMES = {1000: "agent", 1001: "agent2", 1002: "builder"}  # uid -> passwd name


def sub_sources(
    subuid: str | None,
    nss: Mapping[str, Sequence[tuple[int, int]] | ConfigError] | None = None,
    files: Mapping[str, str] | None = None,
) -> Sources:
    """sources() plus a subuid file (None: missing), passwd names and a fake getsubids
    (a ConfigError value: getsubids fails for that name)."""
    data = dict(files or {})
    if subuid is not None:
        data[SUBUID] = subuid

    def nss_subuids(name: str) -> Sequence[tuple[int, int]]:
        value = (nss or {}).get(name, ())
        if isinstance(value, ConfigError):
            raise value
        return value

    return dataclasses.replace(
        sources(data),
        lookup_name=NAMES.get,
        subuid_file=SUBUID,
        nss_subuids=nss_subuids,
    )


TWO_PROFILES = """\
[profiles.agent]
users = ["agent"]
allow = ["a.example"]

[profiles.build]
users = ["builder"]
allow = ["b.example"]
port = 154
"""


def test_subordinate_ranges_by_name_and_by_uid() -> None:
    subuid = (
        "# written by useradd\n"
        "\n"
        "agent:100000:65536\n"
        "1000:300000:10\n"  # the same user by uid
        "0001000:310000:10\n"  # a numeric owner matches by value (util-linux does)
        "agent2:400000:65536\n"
        "agent:165536:5\n"  # adjacent to the first: merged
    )
    cfg = parse(MINIMAL, CONF, sub_sources(subuid))
    assert cfg.profiles[0].uid_ranges == ((100000, 165540), (300000, 300009), (310000, 310009))


def test_numeric_user_gets_the_ranges_of_its_passwd_name() -> None:
    text = MINIMAL.replace('users = ["agent"]', 'users = [1000, "1001"]')
    cfg = parse(text, CONF, sub_sources("agent:100000:65536\nagent2:200000:65536\n"))
    assert cfg.profiles[0].uid_ranges == ((100000, 165535), (200000, 265535))


def test_uid_without_passwd_entry_still_gets_numeric_lines() -> None:
    # A uid that is not in passwd today may be tomorrow (LDAP); its lines then apply.
    text = MINIMAL.replace('users = ["agent"]', "users = [4242]")
    cfg = parse(text, CONF, sub_sources("4242:500000:5\nagent:100000:65536\n"))
    assert cfg.profiles[0].uid_ranges == ((500000, 500004),)


@pytest.mark.parametrize("subuid", [None, "", "# nothing\n\n", "agent:100000:0\n"])
def test_no_subordinate_ranges(subuid: str | None) -> None:
    assert parse(MINIMAL, CONF, sub_sources(subuid)).profiles[0].uid_ranges == ()


def test_nss_ranges_are_added_and_merged_with_the_file() -> None:
    nss = {"agent": [(100000, 65536), (165000, 1000), (900000, 10)]}
    cfg = parse(MINIMAL, CONF, sub_sources("agent:100000:65536\n", nss))
    assert cfg.profiles[0].uid_ranges == ((100000, 165999), (900000, 900009))


def test_nss_is_asked_by_passwd_name_for_numeric_users() -> None:
    text = MINIMAL.replace('users = ["agent"]', "users = [1002]")
    cfg = parse(text, CONF, sub_sources("", {"builder": [(700000, 100)]}))
    assert cfg.profiles[0].uid_ranges == ((700000, 700099),)


@pytest.mark.parametrize(
    "line",
    [
        "agent:100000",
        "agent:100000:65536:1",
        ":100000:65536",
        "agent:0x186a0:65536",
        "agent:0100000:65536",  # octal to some parsers, decimal to others
        "agent:-1:65536",
        "agent:+100000:65536",
        "agent:100000:6 5536",
        "agent:１００:5",  # full-width digits are digits to str.isdigit
    ],
)
def test_malformed_subuid_line_names_the_file_and_line(line: str) -> None:
    err = parse_error(MINIMAL, sub_sources(f"# header\nagent2:200000:65536\n{line}\n"))
    assert err.file == SUBUID and err.line == 3
    assert "malformed" in str(err) and line in str(err)


def test_subuid_range_past_the_largest_uid_is_an_error() -> None:
    err = parse_error(MINIMAL, sub_sources("agent:4294967000:1000\n"))
    assert err.file == SUBUID and err.line == 1 and "largest uid" in str(err)


def test_range_containing_root_is_refused() -> None:
    err = parse_error(MINIMAL, sub_sources("agent2:1:5\n\nagent:0:65536\n"))
    assert err.file == SUBUID and err.line == 3
    assert "root" in str(err) and "usermod --del-subuids 0-65535 agent" in str(err)


def test_nss_range_containing_root_is_refused_at_the_users_key() -> None:
    err = parse_error(MINIMAL, sub_sources("", {"agent": [(0, 10)]}))
    assert (err.file, err.line, err.key) == (CONF, 2, "profiles.agent.users")
    assert "getsubids agent" in str(err) and "root" in str(err)


def test_getsubids_failure_is_a_config_error_at_the_users_key() -> None:
    failing = ConfigError("getsubids agent failed (exit 1): sssd is down")
    err = parse_error(MINIMAL, sub_sources("", {"agent": failing}))
    assert (err.file, err.line) == (CONF, 2) and "sssd is down" in str(err)


def test_unreadable_subuid_file_is_an_error() -> None:
    def read_text(path: str) -> str:
        if path == SUBUID:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return sources().read_text(path)

    src = dataclasses.replace(sub_sources(None), read_text=read_text)
    err = parse_error(MINIMAL, src)
    assert err.file == SUBUID and "Permission denied" in str(err)


@pytest.mark.parametrize(
    ("subuid", "words"),
    [
        # a range of one profile contains a uid of another, either order
        ("agent:1000:5000\n", "uid 1002 is inside the subordinate uid range 1000-5999 of "),
        ("builder:900:200\n", "range 900-1099 contains uid 1000 of profile agent"),
        ("agent:100000:65536\nbuilder:165535:10\n", "overlaps 100000-165535 of profile agent"),
    ],
)
def test_ranges_may_not_touch_another_profile(subuid: str, words: str) -> None:
    err = parse_error(TWO_PROFILES, sub_sources(subuid))
    assert err.key == "profiles.build.users" and words in str(err)


def test_a_range_may_cover_its_own_users_uid() -> None:
    cfg = parse(MINIMAL, CONF, sub_sources("agent:900:200\n"))
    assert cfg.profiles[0].uids == (1000,) and cfg.profiles[0].uid_ranges == ((900, 1099),)


def test_every_load_rereads_the_subuid_file() -> None:
    files = {CONF: MINIMAL, SUBUID: "agent:100000:65536\n"}

    def read_text(path: str) -> str:
        if path in files:
            return files[path]
        return sources().read_text(path)

    src = dataclasses.replace(sub_sources(None), read_text=read_text)
    assert load(CONF, src).profiles[0].uid_ranges == ((100000, 165535),)
    files[SUBUID] = "agent:200000:10\n"  # usermod --del-subuids / --add-subuids, then reload
    assert load(CONF, src).profiles[0].uid_ranges == ((200000, 200009),)


def test_from_command_line_restricts_subordinate_ranges_too() -> None:
    src = sub_sources("agent:100000:65536\n4242:500000:5\n", {"agent": [(800000, 1)]})
    cl = CommandLine(users=["agent", "4242"], allow=["a.example"])
    assert from_command_line(cl, src).profiles[0].uid_ranges == (
        (100000, 165535),
        (500000, 500004),
        (800000, 800000),
    )


def test_from_command_line_subordinate_range_errors() -> None:
    cl = CommandLine(users=["agent"], allow=["a.example"])
    err = parse_error_cl(cl, sub_sources("agent:0:65536\n"))
    assert err.file == SUBUID and err.line == 1
    err = parse_error_cl(cl, sub_sources("", {"agent": ConfigError("getsubids agent: boom")}))
    assert err.key == "--user" and "boom" in str(err)


def parse_error_cl(cl: CommandLine, src: Sources) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        from_command_line(cl, src)
    return exc.value


def test_parse_subid_file_and_merge_ranges() -> None:
    lines = parse_subid_file("  # c\n a:1:2 \nb:10:1\n", "/x")
    assert [(e.owner, e.first, e.last, e.line) for e in lines] == [("a", 1, 2, 2), ("b", 10, 10, 3)]
    assert merge_ranges([(10, 20), (1, 5), (6, 8), (15, 30), (40, 40)]) == (
        (1, 8),
        (10, 30),
        (40, 40),
    )
    assert merge_ranges([]) == ()
