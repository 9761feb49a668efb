"""The rebinding guard (egressd.rebind) and its configuration (private_answers,
rebind_rcode, --allow-private).

Regenerate the golden table after an intended change with
    EGRESSD_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_rebind.py
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from egressd import rebind
from egressd.allowlist import labels_of, parse_pattern
from egressd.config import CommandLine
from egressd.errors import ConfigError
from egressd.rebind import Exceptions, classify, embedded_ipv4, screen
from egressd.sources import Sources, from_command_line, parse

GOLDEN = Path(__file__).parent / "golden" / "rebind-table.txt"
UPDATE = os.environ.get("EGRESSD_UPDATE_GOLDEN") == "1"


def ip(text: str) -> rebind.IPAddress:
    return ipaddress.ip_address(text)


def name(text: str) -> tuple[bytes, ...]:
    import dns.name

    return labels_of(dns.name.from_text(text))


# --- the table ----------------------------------------------------------------------------------


def test_golden_table() -> None:
    text = rebind.render_table()
    if UPDATE:
        GOLDEN.write_text(text, encoding="utf-8")
    assert GOLDEN.is_file(), f"{GOLDEN} missing; run with EGRESSD_UPDATE_GOLDEN=1 to create it"
    assert text == GOLDEN.read_text(encoding="utf-8")


def test_table_rows_are_canonical_and_without_commas() -> None:
    for row in (*rebind.V4_TABLE, *rebind.V6_TABLE):
        assert "," not in row.reason  # journal fields join lists with commas
    for emb in rebind.EMBEDDED:
        assert "," not in emb.reason
    assert all(r.network.version == 4 for r in rebind.V4_TABLE)
    assert all(r.network.version == 6 for r in rebind.V6_TABLE)


# One address of every row, and what it must be classified as.
SPECIAL = [
    ("0.0.0.0", "0.0.0.0/8", True),
    ("0.1.2.3", "0.0.0.0/8", True),
    ("10.0.0.1", "10.0.0.0/8", False),
    ("10.255.255.255", "10.0.0.0/8", False),
    ("100.64.0.1", "100.64.0.0/10", False),
    ("100.127.255.254", "100.64.0.0/10", False),
    ("127.0.0.1", "127.0.0.0/8", True),
    ("127.53.0.1", "127.0.0.0/8", True),
    ("169.254.169.254", "169.254.0.0/16", False),
    ("172.16.0.1", "172.16.0.0/12", False),
    ("172.31.255.255", "172.16.0.0/12", False),
    ("192.0.0.170", "192.0.0.0/24", False),
    ("192.168.1.1", "192.168.0.0/16", False),
    ("198.18.0.1", "198.18.0.0/15", False),
    ("198.19.255.255", "198.18.0.0/15", False),
    ("224.0.0.251", "224.0.0.0/4", False),
    ("239.255.255.250", "224.0.0.0/4", False),
    ("240.0.0.1", "240.0.0.0/4", False),
    ("255.255.255.255", "240.0.0.0/4", False),
    ("::", "::/128", True),
    ("::1", "::1/128", True),
    ("100::1", "100::/64", False),
    ("fc00::1", "fc00::/7", False),
    ("fd12:3456::1", "fc00::/7", False),
    ("fe80::1", "fe80::/10", False),
    ("febf::1", "fe80::/10", False),
    ("fec0::1", "fec0::/10", False),
    ("ff02::1", "ff00::/8", False),
    ("64:ff9b:1::a00:1", "64:ff9b:1::/48", False),
    # embedded IPv4, judged by the IPv4 inside
    ("::ffff:10.77.0.5", "10.0.0.0/8 via ::ffff:0:0/96", False),
    ("::ffff:127.0.0.1", "127.0.0.0/8 via ::ffff:0:0/96", True),
    ("::ffff:169.254.169.254", "169.254.0.0/16 via ::ffff:0:0/96", False),
    ("::10.0.0.1", "10.0.0.0/8 via ::/96", False),
    ("::127.0.0.1", "127.0.0.0/8 via ::/96", True),
    ("::ffff:0:a00:1", "10.0.0.0/8 via ::ffff:0:0:0/96", False),
    ("64:ff9b::a9fe:a9fe", "169.254.0.0/16 via 64:ff9b::/96", False),
    ("64:ff9b::7f00:1", "127.0.0.0/8 via 64:ff9b::/96", True),
    ("2002:a00:1::1", "10.0.0.0/8 via 2002::/16", False),
    ("2002:7f00:1::", "127.0.0.0/8 via 2002::/16", True),
    ("2002:c0a8:101:5::1", "192.168.0.0/16 via 2002::/16", False),
]


@pytest.mark.parametrize(("addr", "rule", "host"), SPECIAL)
def test_special_addresses(addr: str, rule: str, host: bool) -> None:
    why = classify(ip(addr))
    assert why is not None, addr
    assert (why.rule, why.host) == (rule, host)
    assert why.reason
    got = screen([addr])
    assert got.kept == () and [d.ip for d in got.dropped] == [addr]


ORDINARY = [
    # documentation ranges are "the internet" here (ipaddress.is_private says otherwise)
    "192.0.2.1",
    "198.51.100.7",
    "203.0.113.10",
    "2001:db8::1",
    "2001:db8:113::10",
    # the edges just outside special rows
    "1.0.0.0",
    "9.255.255.255",
    "11.0.0.0",
    "100.63.255.255",
    "100.128.0.0",
    "126.255.255.255",
    "128.0.0.0",
    "169.253.255.255",
    "169.255.0.0",
    "172.15.255.255",
    "172.32.0.0",
    "192.0.1.255",
    "192.167.255.255",
    "192.169.0.0",
    "198.17.255.255",
    "198.20.0.0",
    "223.255.255.255",
    "8.8.8.8",
    "2606:4700::1111",
    "fbff:ffff::1",
    "fe00::1",
    "100::1:0:0:0:1",  # outside 100::/64
    "64:ff9b:2::1",
    # embedded public IPv4 is fine
    "::ffff:8.8.8.8",
    "::8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
    "::ffff:203.0.113.10",
]


@pytest.mark.parametrize("addr", ORDINARY)
def test_ordinary_addresses(addr: str) -> None:
    assert classify(ip(addr)) is None, addr
    assert screen([addr]).kept == (addr,)


def test_is_private_would_be_wrong_here() -> None:
    # why the table is explicit: ipaddress disagrees on exactly the cases that matter
    assert ipaddress.ip_address("192.0.2.1").is_private and classify(ip("192.0.2.1")) is None
    assert not ipaddress.ip_address("100.64.0.1").is_private
    assert classify(ip("100.64.0.1")) is not None


def test_embedded_ipv4() -> None:
    assert embedded_ipv4(ipaddress.IPv6Address("::ffff:1.2.3.4")) == ip("1.2.3.4")
    assert embedded_ipv4(ipaddress.IPv6Address("2002:102:304::")) == ip("1.2.3.4")
    assert embedded_ipv4(ipaddress.IPv6Address("64:ff9b::102:304")) == ip("1.2.3.4")
    assert embedded_ipv4(ipaddress.IPv6Address("2001:db8::1")) is None


# --- own addresses -----------------------------------------------------------------------------


def test_own_addresses_public_ones_included() -> None:
    local = frozenset({ip("198.51.100.2"), ip("2001:db8:100::2"), ip("127.0.0.1")})
    got = screen(
        ["198.51.100.2", "2001:db8:100::2", "::ffff:198.51.100.2", "198.51.100.1"], local=local
    )
    assert got.kept == ("198.51.100.1",)
    rules = [d.why.rule for d in got.dropped]
    assert rules == ["own-address", "own-address", "own-address via ::ffff:0:0/96"]
    assert all(d.why.host for d in got.dropped)


def test_own_address_is_compared_as_an_address_not_as_text() -> None:
    local = frozenset({ip("2001:db8:100::2")})
    assert screen(["2001:0db8:0100:0000::0002"], local=local).kept == ()


# --- exceptions ------------------------------------------------------------------------------


def test_cidr_exception_keeps_its_addresses_only() -> None:
    exc = Exceptions(cidrs=(ipaddress.ip_network("10.77.0.0/24"),))
    got = screen(["10.77.0.5", "10.78.0.5", "::ffff:10.77.0.5", "203.0.113.1"], exc)
    assert got.kept == ("10.77.0.5", "::ffff:10.77.0.5", "203.0.113.1")
    assert [d.ip for d in got.dropped] == ["10.78.0.5"]


def test_name_exception_matches_the_query_name() -> None:
    rule = parse_pattern("**.corp.example", "config:3")
    exc = Exceptions(names=(rule,))
    addrs = ["10.1.2.3", "fd00::5", "169.254.169.254"]
    assert screen(addrs, exc, labels=name("git.corp.example")).kept == tuple(addrs)
    assert screen(addrs, exc, labels=name("corp.example")).kept == tuple(addrs)
    assert screen(addrs, exc, labels=name("evilcorp.example")).kept == ()
    assert screen(addrs, exc, labels=None).kept == ()
    assert exc.name_rule(name("a.corp.example")) == rule


def test_no_exception_lifts_this_host() -> None:
    local = frozenset({ip("10.1.2.3"), ip("198.51.100.2")})
    exc = Exceptions(
        cidrs=(ipaddress.ip_network("10.0.0.0/8"),),
        names=(parse_pattern("**.corp.example", "x:1"),),
    )
    addrs = ["127.0.0.1", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1", "10.1.2.3", "198.51.100.2"]
    got = screen([*addrs, "10.1.2.4"], exc, local, labels=name("a.corp.example"))
    assert got.kept == ("10.1.2.4",)
    assert [d.ip for d in got.dropped] == addrs


def test_screen_keeps_order_and_spelling() -> None:
    got = screen(["203.0.113.1", "127.0.0.1", "2001:DB8::1", "::FFFF:10.0.0.1"])
    assert got.kept == ("203.0.113.1", "2001:DB8::1")
    assert [d.ip for d in got.dropped] == ["127.0.0.1", "::FFFF:10.0.0.1"]
    assert str(got.dropped[0].why) == "127.0.0.0/8 (loopback)"


def test_unparsable_is_dropped() -> None:
    got = screen(["not-an-ip"])
    assert got.kept == () and got.dropped[0].why.rule == "unparsable"


def test_host_overlap() -> None:
    assert rebind.host_overlap(ipaddress.ip_network("127.0.0.0/8")) is not None
    assert rebind.host_overlap(ipaddress.ip_network("0.0.0.0/1")) is not None
    assert rebind.host_overlap(ipaddress.ip_network("::/127")) is not None
    assert rebind.host_overlap(ipaddress.ip_network("10.0.0.0/8")) is None
    assert rebind.host_overlap(ipaddress.ip_network("fd00::/8")) is None


# --- configuration ---------------------------------------------------------------------------

RESOLV = "/test/resolv.conf"
SRC = Sources(
    read_text=lambda p: "nameserver 192.0.2.53\n" if p == RESOLV else "",
    lookup_user=lambda n: {"agent": 1000}[n],
    resolv_conf=RESOLV,
)
CONF = "/etc/egressd/egressd.toml"


def conf(profile: str = "", daemon: str = "") -> str:
    head = f"[daemon]\n{daemon}\n"
    return head + f'[profiles.agent]\nusers = ["agent"]\nallow = ["a.example"]\n{profile}\n'


def test_private_answers_parse_into_names_and_cidrs() -> None:
    cfg = parse(
        conf('private_answers = ["10.77.0.0/24", "**.corp.example", "fd00::/8", " 192.168.1.7 "]'),
        CONF,
        SRC,
    )
    (p,) = cfg.profiles
    assert p.private_cidrs == (
        ipaddress.ip_network("10.77.0.0/24"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.168.1.7/32"),
    )
    assert [r.pattern for r in p.private_names] == ["**.corp.example"]
    assert p.private_names[0].source == f"{CONF}:6"
    assert cfg.daemon.rebind_rcode == "noerror"


def test_defaults_have_no_exceptions() -> None:
    (p,) = parse(conf(), CONF, SRC).profiles
    assert p.private_cidrs == () and p.private_names == ()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ('["10.77.0.5/24"]', "host bits"),
        ('["127.0.0.0/8"]', "never grants this host"),
        ('["0.0.0.0/0"]', "never grants this host"),
        ('["::1"]', "never grants this host"),
        ('["!bad.example"]', "deny pattern"),
        ('["*"]', "matches every name"),
        ('["300.1.2.3"]', "does not appear to be"),
        ("[5]", "neither a CIDR nor a name pattern"),
        ('"10.0.0.0/8"', "expected list"),
    ],
)
def test_bad_private_answers_name_file_line_key(value: str, words: str) -> None:
    text = conf(f"private_answers = {value}")
    with pytest.raises(ConfigError) as exc:
        parse(text, CONF, SRC)
    err = exc.value
    assert words in str(err), str(err)
    assert (err.file, err.line, err.key) == (CONF, 6, "profiles.agent.private_answers")


@pytest.mark.parametrize("value", ["noerror", "NXDOMAIN", "refused", "servfail"])
def test_rebind_rcode(value: str) -> None:
    cfg = parse(conf(daemon=f'rebind_rcode = "{value}"'), CONF, SRC)
    assert cfg.daemon.rebind_rcode == value.lower()


def test_bad_rebind_rcode() -> None:
    with pytest.raises(ConfigError) as exc:
        parse(conf(daemon='rebind_rcode = "formerr"'), CONF, SRC)
    assert (exc.value.line, exc.value.key) == (2, "daemon.rebind_rcode")


def test_allow_private_on_the_command_line() -> None:
    cl = CommandLine(users=["agent"], allow=["a.example"], allow_private=["198.18.0.0/15"])
    (p,) = from_command_line(cl, SRC).profiles
    assert p.private_cidrs == (ipaddress.ip_network("198.18.0.0/15"),)
    bad = CommandLine(users=["agent"], allow=["a.example"], allow_private=["127.0.0.1"])
    with pytest.raises(ConfigError) as exc:
        from_command_line(bad, SRC)
    assert exc.value.key == "--allow-private"


def test_cli_passes_allow_private() -> None:
    from egressd import cli

    args = cli._parser().parse_args(
        ["run", "--user", "1000", "--allow", "a.example", "--allow-private", "10.0.0.0/8"]
    )
    assert args.allow_private == ["10.0.0.0/8"]
