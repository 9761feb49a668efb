"""Daemon start and reload with fakes: no root, no netlink, no sockets.

The firewall, the host-address dump and the listeners are replaced by recording fakes on
the Daemon's attributes (the constructor touches none of them: IptablesIpset() opens its
netlink socket only on first use). What is asserted is the order that keeps the agent
closed: rules installed before the policy swap, no swap when the install fails, a cache
emptied by the swap.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.name
import pytest

from egressd import daemon as daemon_mod
from egressd.allowlist import labels_of, parse_lines
from egressd.cache import Cache, Entry
from egressd.config import Config, DaemonSettings, GrantSettings, Profile, Upstream
from egressd.daemon import Daemon, check_ports
from egressd.errors import ConfigError, FirewallError
from egressd.events import Error, Event, Reloaded, ReloadFailed
from egressd.firewall.base import Write
from egressd.firewall.nflog import NflogError
from egressd.ledger import Ledger
from egressd.pipeline import Pipeline, PolicyRef
from egressd.policy import Policy
from egressd.upstream import UpstreamResolver

GRANTS = GrantSettings(floor=300, ceiling=86400, grace=60, maxelem=65536)


def make_config(rules: str, *, port: int = 153, upstream: str = "192.0.2.53") -> Config:
    path = "/etc/egressd/allowlist.d/agent.txt"
    agent = Profile(name="agent", uids=(1000,), port=port, rules=tuple(parse_lines(rules, path)))
    return Config(
        path="/etc/egressd/egressd.toml",
        daemon=DaemonSettings(upstreams=(Upstream(upstream),)),
        grants=GRANTS,
        profiles=(agent,),
    )


@dataclass
class FakeFirewall:
    """Records each call with the policy the daemon was serving at that moment."""

    serving: Callable[[], Policy | None]
    log: list[tuple[str, Any, Policy | None]] = field(default_factory=list)
    fail_install: int = 0  # how many install() calls fail from now on
    clashes: list[str] = field(default_factory=list)
    found: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    families: tuple[int, ...] = (4, 6)
    nflog: bool = True  # NFLOG rules (else the kernel LOG rule)

    async def install(self, policy: object) -> dict[str, list[tuple[str, int]]]:
        self.log.append(("install", policy, self.serving()))
        if self.fail_install:
            self.fail_install -= 1
            raise FirewallError("iptables-restore of the rules failed (unchanged): boom")
        return self.found

    async def lock(self, policy: Policy) -> None:
        self.log.append(("lock", policy, self.serving()))

    async def mark_clashes(self, policy: Policy) -> list[str]:
        self.log.append(("mark_clashes", policy, self.serving()))
        return list(self.clashes)

    async def verify(self, policy: object, *, sets: bool = True) -> list[str]:
        self.log.append(("verify", policy, self.serving()))
        return []

    async def allow(self, writes: Sequence[Write]) -> None:
        self.log.append(("allow", list(writes), self.serving()))

    async def revoke(self, writes: Sequence[Write]) -> None:
        self.log.append(("revoke", list(writes), self.serving()))

    async def close(self) -> None:
        self.log.append(("close", None, self.serving()))

    def calls(self) -> list[str]:
        return [name for name, _, _ in self.log]


@dataclass
class FakeNflog:
    """The NFLOG reader, without a netlink socket: ``fail`` is the bind's errno."""

    fail: int = 0
    bound: list[dict[int, str]] = field(default_factory=list)

    def start(self, groups: dict[int, str]) -> None:
        if self.fail:
            raise NflogError(self.fail, os.strerror(self.fail))
        self.bound.append(dict(groups))

    def rebind(self, groups: dict[int, str]) -> None:
        self.bound.append(dict(groups))

    def close(self) -> None:
        pass


class FakeLocal:
    async def dump(self) -> frozenset[Any]:
        return frozenset()

    async def close(self) -> None:
        pass


@dataclass
class FakeListener:
    """Stands in for a bound listener; the daemon only sets its limits and closes it."""

    max_inflight: int = 0
    tcp_idle_timeout: float = 0.0
    tcp_max_connections: int = 0
    closed: bool = False

    async def close(self, grace: float = 0.0) -> None:
        self.closed = True


@dataclass
class Rig:
    daemon: Daemon
    firewall: FakeFirewall
    configs: list[Config]
    events: list[Event]


@pytest.fixture
def unprivileged_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ip_unprivileged_port_start = 1024, from a file the test owns (not this host's)."""
    proc = tmp_path / "ip_unprivileged_port_start"
    proc.write_text("1024\n")
    real = daemon_mod.check_ports
    monkeypatch.setattr(daemon_mod, "check_ports", lambda config: real(config, str(proc)))
    return proc


def serving_rig(
    first: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, cache_entries: int = 100
) -> Rig:
    """A Daemon as run() leaves it after a good start, serving `first` on fake listeners."""
    monkeypatch.setenv("EGRESSD_STATE_DIR", str(tmp_path / "state"))
    configs = [first]
    events: list[Event] = []
    d = Daemon(lambda: configs[-1], events.append)
    fw = FakeFirewall(lambda: d.ref.policy if d.ref is not None else None)
    d.firewall = fw  # type: ignore[assignment]
    d.local = FakeLocal()  # type: ignore[assignment]
    d.nflog = FakeNflog()  # type: ignore[assignment]
    d.ref = PolicyRef(Policy(first))
    d.pipeline = Pipeline(
        d.ref,
        d._resolver(first),
        fw,
        Ledger(),
        Cache(cache_entries),
        d.report,
        d.stats,
    )
    d.listeners = {p.port: FakeListener() for p in first.profiles}  # type: ignore[misc]
    return Rig(d, fw, configs, events)


def cached(d: Daemon, name: str) -> None:
    """Put one answer into the pipeline's cache, as a served query would."""
    assert d.pipeline is not None
    entry = Entry(rcode=0, answer=(), authority=(), addresses=(), chain=(), stored=0.0, ttl=3600)
    d.pipeline.cache.put(("agent", labels_of(dns.name.from_text(name)), 1), entry)
    assert len(d.pipeline.cache) == 1


# --- reload ------------------------------------------------------------------------------------


def test_reload_installs_the_rules_before_the_swap_and_clears_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unprivileged_start: Path
) -> None:
    old_config = make_config("**.example.com\n")
    r = serving_rig(old_config, tmp_path, monkeypatch)
    old = r.daemon.ref.policy  # type: ignore[union-attr]
    old_resolver = r.daemon.pipeline.resolver  # type: ignore[union-attr]
    cached(r.daemon, "www.example.com")

    r.configs.append(make_config("**.example.org\n", upstream="192.0.2.54"))
    assert asyncio.run(r.daemon.reload()) is True

    new = r.daemon.ref.policy  # type: ignore[union-attr]
    assert new is not old and new.config is r.configs[-1]
    installs = [(policy, serving) for name, policy, serving in r.firewall.log if name == "install"]
    # The new rules went in while the old policy was still the one served.
    assert installs == [(new, old)]
    assert r.firewall.calls()[:2] == ["mark_clashes", "install"]
    # Whatever the reload writes into the sets after the install, it writes for the new
    # policy, after the swap (revoking under the old one would race its grants).
    assert all(serving is new for _, _, serving in r.firewall.log[2:])
    # Cached chains were checked against the old rules: none survives the swap.
    assert len(r.daemon.pipeline.cache) == 0  # type: ignore[union-attr]
    resolver = r.daemon.pipeline.resolver  # type: ignore[union-attr]
    assert resolver is not old_resolver and isinstance(resolver, UpstreamResolver)
    assert [e for e in r.events if isinstance(e, Reloaded)] == [
        Reloaded(old_config.path, new.digest)
    ]
    assert r.daemon.stats.reloads == 1 and r.daemon.stats.reload_failures == 0
    state = (tmp_path / "state" / "restricted").read_text()
    assert "1000" in state


def test_reload_whose_install_fails_keeps_the_old_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unprivileged_start: Path
) -> None:
    r = serving_rig(make_config("**.example.com\n"), tmp_path, monkeypatch)
    old = r.daemon.ref.policy  # type: ignore[union-attr]
    old_resolver = r.daemon.pipeline.resolver  # type: ignore[union-attr]
    cached(r.daemon, "www.example.com")
    r.firewall.fail_install = 1

    r.configs.append(make_config("**.example.org\n", upstream="192.0.2.54"))
    assert asyncio.run(r.daemon.reload()) is False

    assert r.daemon.ref.policy is old  # type: ignore[union-attr]
    assert r.daemon.pipeline.resolver is old_resolver  # type: ignore[union-attr]
    assert len(r.daemon.pipeline.cache) == 1  # type: ignore[union-attr]
    installs = [policy for name, policy, _ in r.firewall.log if name == "install"]
    # The failed new install, then the old rules put back over a half-applied family.
    assert len(installs) == 2 and installs[0] is not old and installs[1] is old
    assert all(serving is old for _, _, serving in r.firewall.log)
    failed = [e for e in r.events if isinstance(e, ReloadFailed)]
    assert len(failed) == 1 and "boom" in failed[0].error
    assert not any(isinstance(e, Reloaded) for e in r.events)
    assert r.daemon.stats.reloads == 0 and r.daemon.stats.reload_failures == 1
    assert not (tmp_path / "state" / "restricted").exists()


def test_reload_refused_for_a_mark_clash_keeps_the_old_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unprivileged_start: Path
) -> None:
    r = serving_rig(make_config("**.example.com\n"), tmp_path, monkeypatch)
    old = r.daemon.ref.policy  # type: ignore[union-attr]
    r.firewall.clashes = ["-A PREROUTING -j CONNMARK --set-xmark 0x1/0xffffffff"]
    r.configs.append(make_config("**.example.org\n"))
    assert asyncio.run(r.daemon.reload()) is False
    assert r.daemon.ref.policy is old  # type: ignore[union-attr]
    # The new rules never went in; the old ones are re-installed (a no-op change).
    assert [p for n, p, _ in r.firewall.log if n == "install"] == [old]
    assert "conntrack mark bits" in next(e for e in r.events if isinstance(e, ReloadFailed)).error


def test_reload_with_a_bad_config_touches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unprivileged_start: Path
) -> None:
    r = serving_rig(make_config("**.example.com\n"), tmp_path, monkeypatch)
    old = r.daemon.ref.policy  # type: ignore[union-attr]
    cached(r.daemon, "www.example.com")

    def broken() -> Config:
        raise ConfigError("allowlist.d/agent.txt:3: bad pattern", file="agent.txt")

    r.daemon.load = broken
    assert asyncio.run(r.daemon.reload()) is False
    assert r.daemon.ref.policy is old  # type: ignore[union-attr]
    assert r.firewall.log == []
    assert len(r.daemon.pipeline.cache) == 1  # type: ignore[union-attr]


def test_reload_to_an_unsafe_port_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unprivileged_start: Path
) -> None:
    r = serving_rig(make_config("**.example.com\n"), tmp_path, monkeypatch)
    old = r.daemon.ref.policy  # type: ignore[union-attr]
    r.configs.append(make_config("**.example.com\n", port=1024))
    assert asyncio.run(r.daemon.reload()) is False
    assert r.daemon.ref.policy is old  # type: ignore[union-attr]
    assert r.firewall.log == []
    assert "port 1024" in next(e for e in r.events if isinstance(e, ReloadFailed)).error


# --- start -------------------------------------------------------------------------------------


def starting_daemon(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Daemon, FakeFirewall, list[Event]]:
    monkeypatch.setenv("EGRESSD_STATE_DIR", str(tmp_path / "state"))
    events: list[Event] = []
    d = Daemon(lambda: config, events.append)
    fw = FakeFirewall(lambda: d.ref.policy if d.ref is not None else None)
    d.firewall = fw  # type: ignore[assignment]
    d.local = FakeLocal()  # type: ignore[assignment]
    d.nflog = FakeNflog()  # type: ignore[assignment]
    return d, fw, events


def test_start_whose_install_fails_locks_and_serves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unprivileged_start: Path
) -> None:
    d, fw, events = starting_daemon(make_config("**.example.com\n"), tmp_path, monkeypatch)
    fw.fail_install = 1
    assert asyncio.run(d.run()) == 1
    assert fw.calls() == ["mark_clashes", "install", "lock"]
    assert d.ref is None and d.pipeline is None and d.listeners == {}
    assert [e.where for e in events if isinstance(e, Error)] == ["firewall install"]
    assert not (tmp_path / "state" / "restricted").exists()


def test_start_refused_for_a_mark_clash_locks_before_any_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unprivileged_start: Path
) -> None:
    d, fw, events = starting_daemon(make_config("**.example.com\n"), tmp_path, monkeypatch)
    fw.clashes = ["-A PREROUTING -j CONNMARK --set-xmark 0x1/0xffffffff"]
    assert asyncio.run(d.run()) == 1
    assert fw.calls() == ["mark_clashes", "lock"]
    assert d.ref is None


def test_start_on_an_unsafe_port_touches_no_firewall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unprivileged_start: Path
) -> None:
    d, fw, events = starting_daemon(
        make_config("**.example.com\n", port=1024), tmp_path, monkeypatch
    )
    assert asyncio.run(d.run()) == 2
    assert fw.log == []
    assert [e.where for e in events if isinstance(e, Error)] == ["config"]


# --- check_ports -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "port", "ok"),
    [
        (1024, 1023, True),  # one below: only root can bind it
        (1024, 1024, False),  # equal: any user can bind it
        (1024, 5353, False),
        (54, 53, True),
        (54, 54, False),
        (0, 53, False),  # every port is unprivileged
    ],
)
def test_check_ports_boundary(tmp_path: Path, start: int, port: int, ok: bool) -> None:
    proc = tmp_path / "ip_unprivileged_port_start"
    proc.write_text(f"{start}\n")
    config = make_config("**.example.com\n", port=port)
    if ok:
        check_ports(config, str(proc))
    else:
        with pytest.raises(ConfigError, match=f"port {port} can be bound by any user"):
            check_ports(config, str(proc))


@pytest.mark.parametrize("content", [None, "", "many\n"])
def test_check_ports_refuses_when_it_cannot_tell(tmp_path: Path, content: str | None) -> None:
    proc = tmp_path / "ip_unprivileged_port_start"
    if content is not None:
        proc.write_text(content)
    with pytest.raises(ConfigError, match="refusing to start"):
        check_ports(make_config("**.example.com\n", port=53), str(proc))


@pytest.mark.parametrize(("fail", "nflog"), [(0, True), (errno.EPERM, True), (errno.ENOENT, False)])
def test_nflog_is_bound_before_the_install_which_falls_back_to_log_without_it(
    fail: int,
    nflog: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    unprivileged_start: Path,
) -> None:
    """A kernel where the groups cannot be bound gets the LOG rule (an NFLOG rule that does
    not load would fail the whole install); a group another program holds (EPERM) keeps
    NFLOG: the rule loads, the other program gets the packets."""
    d, fw, events = starting_daemon(make_config("**.example.com\n"), tmp_path, monkeypatch)
    d.nflog = FakeNflog(fail)  # type: ignore[assignment]
    fw.fail_install = 1  # stop right after the install: what it was told is what matters
    assert asyncio.run(d.run()) == 1
    assert fw.nflog is nflog
    errors = [e.where for e in events if isinstance(e, Error)]
    assert errors == (
        ["firewall install"] if not fail else ["blocked connections", "firewall install"]
    )
