"""Conntrack mark ids and NEW-flow limits in the configuration, and the start-up checks
that must fail closed (egressd.config, egressd.daemon.check_ports, ipv6_available)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
from test_config import CONF, MINIMAL, TWO_PROFILES, parse_error, sources

from egressd import config as cfgmod
from egressd.config import DEFAULT_CT_MASK, default_mark_id, mark_ids
from egressd.daemon import check_ports
from egressd.errors import ConfigError
from egressd.firewall import iptables_ipset
from egressd.sources import from_command_line, parse


def test_ids_are_derived_from_the_name_and_stable() -> None:
    cfg = parse(TWO_PROFILES, CONF, sources())
    ids = {p.name: p.mark_id for p in cfg.profiles}
    assert ids == {n: default_mark_id(n, 255) for n in ("agent", "build")}
    assert len(set(ids.values())) == 2
    # The same after a reload with profiles added or reordered.
    reordered = TWO_PROFILES.split("\n\n")[1] + "\n\n" + TWO_PROFILES.split("\n\n")[0] + "\n"
    again = parse(reordered.replace("port = 154", "port = 154\nid = 9"), CONF, sources())
    assert {p.name: p.mark_id for p in again.profiles}["agent"] == ids["agent"]
    assert cfg.daemon.ct_mask == DEFAULT_CT_MASK == 0xFF000000
    assert cfg.daemon.ct_mark_clash == "refuse"


def test_explicit_id_and_collisions() -> None:
    collide = TWO_PROFILES.replace(
        "port = 154", f"port = 154\nid = {default_mark_id('agent', 255)}"
    )
    err = parse_error(collide)
    assert err.key == "profiles.build.id" and "already profile agent's" in str(err)
    assert "set `id = " in str(err)
    assert parse_error(MINIMAL + "id = 0\n").key == "profiles.agent.id"
    assert "1..255" in str(parse_error(MINIMAL + "id = 256\n"))
    small = "[daemon]\nct_mask = 0x70\n" + MINIMAL + "id = 7\n"
    assert parse(small, CONF, sources()).profiles[0].mark_id == 7
    assert "1..7" in str(parse_error("[daemon]\nct_mask = 0x70\n" + MINIMAL + "id = 8\n"))


@pytest.mark.parametrize(
    ("mask", "problem"),
    [
        ("0", "non-zero"),
        ("0x1ffffffff", "32-bit"),
        ("0xf0f00000", "contiguous"),
        ("0x100", "fewer than 3"),
        ('"0xff"', "expected int"),
    ],
)
def test_bad_masks(mask: str, problem: str) -> None:
    err = parse_error(f"[daemon]\nct_mask = {mask}\n" + MINIMAL)
    assert err.key == "daemon.ct_mask" and problem in str(err), err
    assert err.line == 2


def test_mask_arithmetic() -> None:
    assert mark_ids(0xFF000000) == 255
    assert mark_ids(0x0000F000) == 15
    assert cfgmod.check_ct_mask(0x0000F000) == ""
    assert parse("[daemon]\nct_mask = 0x0000f000\n" + MINIMAL, CONF, sources()).profiles[
        0
    ].mark_id == default_mark_id("agent", 15)


def test_conn_limits() -> None:
    p = parse(MINIMAL, CONF, sources()).profiles[0]
    assert (p.conn_rate, p.conn_burst, p.conn_max) == (500, 2000, 4096)
    text = MINIMAL + "conn_rate = 20\nconn_burst = 40\nconn_max = 7\n"
    p = parse(text, CONF, sources()).profiles[0]
    assert (p.conn_rate, p.conn_burst, p.conn_max) == (20, 40, 7)
    assert parse_error(MINIMAL + "conn_rate = 0\n").key == "profiles.agent.conn_rate"
    assert parse_error(MINIMAL + "conn_burst = 1000001\n").key == "profiles.agent.conn_burst"
    assert parse_error(MINIMAL + "conn_max = -1\n").key == "profiles.agent.conn_max"
    assert parse_error('[daemon]\nct_mark_clash = "ignore"\n' + MINIMAL).key == (
        "daemon.ct_mark_clash"
    )


def test_one_line_form_gets_a_stable_id() -> None:
    cl = cfgmod.CommandLine(users=["agent"], allow=["example.com"], upstreams=["192.0.2.1"])
    p = from_command_line(cl, sources()).profiles[0]
    assert p.mark_id == default_mark_id("default", 255)


# --- start-up checks that must fail closed ----------------------------------------------------


def test_an_unreadable_unprivileged_port_start_refuses_instead_of_guessing(
    tmp_path: Path,
) -> None:
    cfg = parse(MINIMAL, CONF, sources())
    with pytest.raises(ConfigError, match="refusing to start"):
        check_ports(cfg, str(tmp_path / "missing"))
    garbage = tmp_path / "garbage"
    garbage.write_text("x\n")
    with pytest.raises(ConfigError, match="refusing to start"):
        check_ports(cfg, str(garbage))
    zero = tmp_path / "zero"
    zero.write_text("0\n")  # rootless setups: every port is unprivileged
    with pytest.raises(ConfigError, match="can be bound by any user"):
        check_ports(cfg, str(zero))
    ok = tmp_path / "ok"
    ok.write_text("1024\n")
    check_ports(cfg, str(ok))  # the positive twin: a normal host starts


def test_ipv6_rules_unless_the_kernel_has_no_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket

    def refusing(code: int):  # type: ignore[no-untyped-def]
        def make(family: int = -1, *args: object, **kw: object) -> socket.socket:
            if family == socket.AF_INET6:
                raise OSError(code, "nope")
            return real(family, *args, **kw)  # type: ignore[arg-type]

        return make

    assert iptables_ipset.ipv6_available()  # this machine has IPv6
    monkeypatch.setattr(iptables_ipset.socket, "socket", refusing(errno.EAFNOSUPPORT))
    assert not iptables_ipset.ipv6_available()  # ipv6.disable=1: nothing to close
    # Anything else (a sandbox refusing sockets, say) still means IPv6 rules.
    monkeypatch.setattr(iptables_ipset.socket, "socket", refusing(errno.EACCES))
    assert iptables_ipset.ipv6_available()
