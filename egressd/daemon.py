"""Composition: wire config, firewall, listeners and pipeline; run the lifecycle.

Start: load config -> install sets and rules -> bind listeners -> READY.
SIGHUP: parse everything, apply, then swap one Policy reference; on any error the old
policy keeps running. SIGTERM: stop serving, leave rules and sets in place (fail closed).
Signal handlers only set events; the work happens in tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import __version__, attribution, sdnotify
from .blocklog import BlockLog
from .cache import Cache
from .config import Config, profile_of
from .control import ControlError, ControlServer
from .errors import ConfigError, EgressdError, FirewallError
from .events import (
    AuditMode,
    Error,
    Event,
    Reloaded,
    ReloadFailed,
    Repaired,
    Revoked,
    RulesInstalled,
    Started,
    Stopping,
)
from .firewall import rules
from .firewall.iptables_ipset import IptablesIpset, ipv6_available
from .firewall.nflog import Blocked, NflogError, NflogReader
from .firewall.watch import RulesetWatch
from .ledger import Ledger
from .listener import Listener
from .localaddrs import LocalAddressError, LocalAddresses
from .pipeline import Pipeline, PolicyRef
from .policy import Policy
from .stats import Stats
from .upstream import Latency, UpstreamResolver

if TYPE_CHECKING:
    from .metrics import MetricsServer

UNPRIVILEGED_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"
# The restricted uids of the last good install, read at boot by packaging/egressd-lockdown.
STATE_DIR = "/var/lib/egressd"
RESTRICTED_FILE = "restricted"
STOP_GRACE = 2.0  # seconds in-flight queries get to finish on SIGTERM
PRUNE_INTERVAL = 60.0
STATUS_INTERVAL = 10.0
TICK = 1.0  # housekeeping period
# The rules' poll period where iptables sends no change events (the legacy backend): a
# flush is found within POLL and repaired within about POLL + one re-apply, under 1 s.
POLL = 0.5
# After an nf_tables event, wait this long before verifying so that one verify covers the
# whole burst (`nft flush ruleset`, a tool restoring its rules, egressd's own apply).
DEBOUNCE = 0.05
PROTOCOLS = {6: "tcp", 17: "udp"}


# The cyclic collector's thresholds while serving: a young-generation pass every 20,000 net
# allocations instead of 700 (a fresh query allocates a few hundred objects), the older
# generations in proportion. Measured: +12% fresh names per second, no change to hits.
GC_THRESHOLDS = (20_000, 50, 50)


def _tune_gc() -> None:
    """Before serving: what the start allocated (modules, the compiled policy) is moved out
    of the collector's sight for good (gc.freeze), and young passes are made rarer. The
    ledger's and cache's objects hold no cycles; what does (asyncio's) is still
    collected, only in bigger batches."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def check_ports(config: Config, path: str = UNPRIVILEGED_PORT_START) -> None:
    """Refuse listener ports an unprivileged user could bind while egressd is down.

    Otherwise the agent itself could squat the port between a crash and a restart and
    answer its own redirected DNS.
    """
    try:
        with open(path) as fh:
            start = int(fh.read().strip())
    except (OSError, ValueError) as err:
        # Not "1024 then": containers and rootless setups often set it to 0, and guessing
        # wrong would let the agent squat the listener while egressd is down.
        raise ConfigError(
            f"cannot read {path} ({err}), so cannot tell whether the listener port can be "
            "bound by any user; refusing to start",
            file=config.path,
        ) from None
    for p in config.profiles:
        if p.port >= start:
            raise ConfigError(
                f"port {p.port} can be bound by any user (ip_unprivileged_port_start is "
                f"{start}); pick a port below {start}",
                file=config.path,
                key=f"profiles.{p.name}.port",
            )


class Daemon:
    def __init__(self, load: Callable[[], Config], report: Callable[[Event], None]) -> None:
        self.load = load
        self.state_dir = os.environ.get("EGRESSD_STATE_DIR") or STATE_DIR
        self.blocklog = BlockLog(report)
        self.report: Callable[[Event], None] = self.blocklog
        self.stats = Stats()
        self.firewall = IptablesIpset()
        self.watch = RulesetWatch()  # nf_tables change events: repair within a second
        # Rejected packets read back from NFLOG: one attributed record per blocked connection.
        self.nflog = NflogReader(self._connection_blocked, self._nflog_error, self.stats)
        self.ledger = Ledger()
        self.local = LocalAddresses()  # the host's own addresses, for the rebinding guard
        self._local_error = ""
        self._clashes_said: list[str] = []
        self.listeners: dict[int, Listener] = {}
        self.ref: PolicyRef | None = None
        self.pipeline: Pipeline | None = None
        # Reload and verify both (re)apply rules: one at a time, or a verify that started
        # before a reload could put the old policy's rules back after it.
        self._apply_lock = asyncio.Lock()
        self._reload = asyncio.Event()
        self._stop = asyncio.Event()
        self._stop_reason = "SIGTERM"
        self.control: ControlServer | None = None
        self.started_at = time.time()
        # For `egressd status`: the last reload's outcome and the last repair.
        self.last_reload: dict[str, Any] | None = None
        self.last_repair: dict[str, Any] | None = None
        # One latency histogram for every resolver a reload puts in: its counts only grow.
        self.latency = Latency()
        # Made when metrics are configured: prometheus-client costs the start ~15 ms.
        self.metrics: MetricsServer | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            config = self.load()
            check_ports(config)
        except ConfigError as err:
            self.report(Error("config", str(err)))
            return 2
        policy = Policy(config)
        self._start_nflog(policy)  # before the install: it decides NFLOG or LOG rules
        try:
            await self._check_marks(policy)
            found = await self.firewall.install(policy)
        except FirewallError as err:
            self.report(Error("firewall install", str(err)))
            try:
                await self.firewall.lock(policy)  # not started: then closed, not open
            except FirewallError as lock_err:
                self.report(Error("firewall deny-all", str(lock_err)))
            return 1
        self._save_restricted(policy)
        now = time.monotonic()
        for entries in found.values():
            self.ledger.load(entries, now)
        self._installed(policy)

        self.ref = PolicyRef(policy)
        self.pipeline = Pipeline(
            self.ref,
            self._resolver(config),
            self.firewall,
            self.ledger,
            Cache(config.daemon.cache_entries),
            self.report,
            self.stats,
        )
        await self._refresh_local()  # before the first query
        try:
            await self._sync_listeners(config)
        except OSError as err:
            # Rules stay: the agent's DNS finds no listener and fails, it is not let out.
            self.report(Error("listen", f"cannot bind a listener: {err}"))
            await self._close_listeners()
            return 1

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        loop.add_signal_handler(signal.SIGTERM, self._request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._request_stop, "SIGINT")
        await self.watch.start(self.firewall.families)  # else _maintain polls the rules
        await self._sync_control(config)
        await self._sync_metrics(config)
        self._say_audit(policy)

        listening = [a for lst in self.listeners.values() for a in lst.addresses]
        self.report(
            Started(
                __version__, config.path, tuple(map(str, config.daemon.upstreams)), tuple(listening)
            )
        )
        _tune_gc()
        sdnotify.ready(self._status())
        tasks = [asyncio.create_task(self._watchdog()), asyncio.create_task(self._maintain())]
        try:
            while not self._stop.is_set():
                reload_wait = asyncio.create_task(self._reload.wait())
                stop_wait = asyncio.create_task(self._stop.wait())
                await asyncio.wait([reload_wait, stop_wait], return_when=asyncio.FIRST_COMPLETED)
                reload_wait.cancel()
                stop_wait.cancel()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    async with self._apply_lock:
                        await self.reload()
        finally:
            self.blocklog.flush()
            sdnotify.stopping(f"stopping ({self._stop_reason}); rules stay in place")
            self.report(Stopping(self._stop_reason))
            for t in tasks:
                t.cancel()
            await self._close_listeners(grace=STOP_GRACE)
            if self.control is not None:
                await self.control.close()
            if self.metrics is not None:
                await self.metrics.close()
            self.watch.close()
            self.nflog.close()
            await self.firewall.close()
            await self.local.close()
        return 0

    # --- blocked connections (NFLOG) ---------------------------------------------------------

    @staticmethod
    def _nflog_groups(policy: Policy) -> dict[int, str]:
        """NFLOG group -> profile, for the profiles whose reject chain logs to NFLOG."""
        if not policy.config.daemon.log_rejects:
            return {}
        return rules.nflog_groups(policy.config.profiles)

    def _start_nflog(self, policy: Policy) -> None:
        try:
            self.nflog.start(self._nflog_groups(policy))
        except NflogError as err:
            # Blocked connections are still blocked, only not attributed in the journal.
            if err.errno == errno.EPERM:
                # Another program holds a group: the NFLOG rule still loads, and that
                # program gets the packets.
                self._nflog_error(f"{err.strerror or err}")
                return
            # No usable nfnetlink_log: an NFLOG rule might not even load, and would then
            # fail the whole install. The kernel's LOG rule instead.
            self.firewall.nflog = False
            self._nflog_error(f"{err.strerror or err}; rejected packets go to the kernel log")

    def _nflog_error(self, why: str) -> None:
        self.report(Error("blocked connections", f"{why}; blocked connections are not attributed"))

    def _connection_blocked(self, profile: str, pkt: Blocked) -> None:
        self.stats.connections_blocked += 1
        # The record (and the ledger lookup behind it) is made only within the profile's
        # budget: under a flood of rejected packets nearly none is.
        self.blocklog.per_query(
            profile,
            "ConnectionBlocked",
            lambda: attribution.blocked(
                profile,
                pkt.uid,
                pkt.destination,
                pkt.protocol,
                pkt.port,
                self.ledger.about(pkt.destination),
                time.monotonic(),
            ),
        )

    async def _check_marks(self, policy: Policy) -> None:
        """Refuse (or warn about) other rules that write egressd's conntrack mark bits."""
        clashes = await self.firewall.mark_clashes(policy)
        if not clashes:
            return
        d = policy.config.daemon
        what = (
            f"other rules on this host write the conntrack mark bits {d.ct_mask:#010x} "
            f"that egressd uses to recognise the flows it admitted: {'; '.join(clashes)}. "
            "Set daemon.ct_mask to bits nobody else writes"
        )
        if d.ct_mark_clash == "refuse":
            raise FirewallError(what + ' (or ct_mark_clash = "warn" to accept the risk)')
        self.report(Error("conntrack marks", what + "; running anyway (ct_mark_clash = warn)"))

    def _save_restricted(self, policy: Policy) -> None:
        """The last good set of restricted uids, for the boot-time lockdown."""
        path = os.path.join(self.state_dir, RESTRICTED_FILE)
        try:
            os.makedirs(self.state_dir, mode=0o755, exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(rules.restricted(policy.config.profiles))
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as err:
            # The running rules are fine; only the next boot's lockdown uses an older list.
            self.report(Error("state", f"cannot write {path}: {err}"))

    def _request_stop(self, reason: str) -> None:
        self._stop_reason = reason
        self._stop.set()

    def _resolver(self, config: Config) -> UpstreamResolver:
        d = config.daemon
        return UpstreamResolver(d.upstreams, d.upstream_timeout, d.upstream_tries, self.latency)

    def _installed(self, policy: Policy) -> None:
        self.report(
            RulesInstalled(
                tuple(p.name for p in policy.config.profiles),
                tuple(f"ipv{f}" for f in self.firewall.families),
                policy.digest,
            )
        )

    def _status(self) -> str:
        assert self.ref is not None
        profiles = self.ref.policy.config.profiles
        s = self.stats
        audit = [p.name for p in profiles if p.mode == "audit"]
        return (
            (f"AUDIT MODE (nothing blocked): {', '.join(audit)}; " if audit else "")
            + f"{len(profiles)} profile(s), policy {self.ref.policy.digest}; "
            f"{s.queries} queries, {s.blocked} blocked, {s.refused} refused, "
            f"{s.malformed} malformed, {s.servfail_upstream + s.servfail_grant} servfail, "
            f"{s.repairs} repairs; rules checked "
            + ("on nf_tables events" if self.watch.active else f"every {POLL:g} s")
        )

    # --- listeners -------------------------------------------------------------------------

    async def _sync_listeners(self, config: Config) -> list[int]:
        """Bind listeners for new ports; returns the ports that are no longer needed."""
        assert self.pipeline is not None
        d = config.daemon
        wanted = {p.port for p in config.profiles}
        started: list[int] = []
        try:
            for port in sorted(wanted - set(self.listeners)):
                lst = Listener(
                    port,
                    self.pipeline.handle,
                    self.stats,
                    max_inflight=d.max_inflight,
                    tcp_idle_timeout=d.tcp_idle_timeout,
                    tcp_max_connections=d.tcp_max_connections,
                    ipv6=ipv6_available(),
                    repeat=self.pipeline.repeat,  # repeated cached/blocked queries, unparsed
                )
                await lst.start()
                self.listeners[port] = lst
                started.append(port)
        except OSError:
            for port in started:
                await self.listeners.pop(port).close()
            raise
        for lst in self.listeners.values():
            lst.max_inflight = d.max_inflight
            lst.tcp_idle_timeout = d.tcp_idle_timeout
            lst.tcp_max_connections = d.tcp_max_connections
        return sorted(set(self.listeners) - wanted)

    async def _close_listeners(self, grace: float = 0.0) -> None:
        await asyncio.gather(*(lst.close(grace) for lst in self.listeners.values()))
        self.listeners.clear()

    # --- reload ----------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Apply a new configuration, or keep the running one and say why."""
        assert self.ref is not None and self.pipeline is not None
        sdnotify.reloading()
        old = self.ref.policy
        try:
            try:
                config = self.load()
                check_ports(config)
                new = Policy(config)
                resolver = self._resolver(config)
                had = set(self.listeners)
                stale = await self._sync_listeners(config)
            except (EgressdError, OSError, ValueError) as err:
                self._reload_failed(old, err)
                return False
            try:
                await self._check_marks(new)
                found = await self.firewall.install(new)
            except FirewallError as err:
                for port in set(self.listeners) - had:
                    await self.listeners.pop(port).close()
                self._reload_failed(old, err)
                with contextlib.suppress(FirewallError):
                    await self.firewall.install(old)  # undo a half-applied family
                return False
            now = time.monotonic()
            for entries in found.values():
                self.ledger.load(entries, now)
            self._save_restricted(new)
            # The swap: queries from here on see the new policy; answers of the old one
            # still in flight are decided again (the generation).
            self.ref.policy = new
            self.ref.generation += 1
            self.nflog.rebind(self._nflog_groups(new))
            self.pipeline.resolver = resolver
            self.pipeline.cache.clear()  # cached chains were checked against the old rules
            self.pipeline.cache.capacity = config.daemon.cache_entries
            await self._refresh_local()
            await self._revoke(new)
            for port in stale:
                await self.listeners.pop(port).close(grace=STOP_GRACE)
            await self._sync_control(config)
            await self._sync_metrics(config)
            self.stats.reloads += 1
            self._installed(new)
            self.report(Reloaded(config.path, new.digest))
            self._say_audit(new)
            self.last_reload = {"at": time.time(), "ok": True, "error": "", "policy": new.digest}
            return True
        finally:
            sdnotify.ready(self._status())

    async def _revoke(self, policy: Policy) -> None:
        """Make the sets match the new policy: what it still justifies stays, what only
        names it no longer allows justified goes (additions first: never a gap)."""
        assert self.pipeline is not None
        # Kernel writes of the old generation finish first, so the ledger knows them all.
        deadline = time.monotonic() + 5.0
        while self.pipeline.granting and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        live = {name for p in policy.config.profiles for name in (p.set4, p.set6, p.pset4, p.pset6)}
        adds, removes = self.ledger.reconcile(self.pipeline.judge, live, time.monotonic())
        try:
            await self.firewall.allow(adds)
            await self.firewall.revoke(removes)
        except FirewallError as err:
            self.report(Error("revoke", str(err)))
            return
        self.stats.revoked += len(removes)
        if adds or removes:
            shown = sorted({w.ip if not w.port else f"{w.ip}:{w.port}" for w in removes})
            self.report(Revoked(len(removes), len(adds), tuple(shown[:20])))

    def _reload_failed(self, old: Policy, err: Exception) -> None:
        self.stats.reload_failures += 1
        self.report(ReloadFailed(old.config.path, str(err)))
        self.last_reload = {"at": time.time(), "ok": False, "error": str(err), "policy": old.digest}

    def _say_audit(self, policy: Policy) -> None:
        """Loud, at every start and reload: an audit profile enforces nothing."""
        for p in policy.config.profiles:
            if p.mode == "audit":
                self.report(AuditMode(p.name, p.uids))

    # --- background ------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        while True:
            # Pinged from the event loop itself: a wedged loop stops the pings.
            sdnotify.watchdog()
            await asyncio.sleep(interval)

    async def _maintain(self) -> None:
        """Prune the ledger and check (and repair) the firewall state now and then.

        The rules are verified after every nf_tables change event (debounced), or every
        POLL where there are no events; everything, sets included, every verify_interval.
        """
        assert self.ref is not None
        last_verify = last_prune = last_status = last_tick = time.monotonic()
        # Verify the rules once at start: a change between install and the watch's start
        # sent no event to us.
        changed = True
        while True:
            try:
                interval = self.ref.policy.config.daemon.verify_interval
                if changed:
                    if interval > 0:
                        await asyncio.sleep(DEBOUNCE)
                    since = self.watch.take()  # always taken, or the wait below would spin
                    if interval > 0:
                        async with self._apply_lock:
                            await self._verify(sets=False, since=since)
                now = time.monotonic()
                tick = TICK if self.watch.active else POLL
                if now - last_tick >= tick:
                    last_tick = now
                    self.blocklog.flush()
                    self.stats.blocked_unlogged = self.blocklog.unlogged_total
                    await self._refresh_local()  # one netlink dump: cheap
                    if now - last_status >= STATUS_INTERVAL:
                        sdnotify.status(self._status())  # what `systemctl status` shows
                        last_status = now
                    if now - last_prune >= PRUNE_INTERVAL:
                        self.ledger.prune(now)
                        last_prune = now
                    if interval > 0 and now - last_verify >= interval:
                        last_verify = now
                        async with self._apply_lock:
                            await self._verify()
                    elif interval > 0 and not self.watch.active:
                        async with self._apply_lock:
                            await self._verify(sets=False)  # no events here: poll the rules
            except Exception as err:  # noqa: BLE001 - keep maintaining; say what went wrong
                self.report(Error("maintenance", f"{type(err).__name__}: {err}"))
            tick = TICK if self.watch.active else POLL
            changed = await self._ruleset_changed(last_tick + tick - time.monotonic())

    async def _ruleset_changed(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for an nf_tables change event."""
        if self.watch.changed.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.watch.changed.wait(), max(timeout, 0.0))
            return True
        return False

    async def _refresh_local(self) -> None:
        """Give the pipeline the host's current addresses (the rebinding guard drops them)."""
        assert self.pipeline is not None
        try:
            addresses = await self.local.dump()
        except LocalAddressError as err:
            # The CIDR table still applies; the host's public addresses are the ones missed.
            # Said once per failure streak, not once a second.
            if str(err) != self._local_error:
                self._local_error = str(err)
                self.report(Error("local addresses", str(err)))
            return
        self._local_error = ""
        self.pipeline.set_local_addresses(addresses)

    async def _verify(self, *, sets: bool = True, since: float | None = None) -> None:
        """since: when the change event that prompted this verify arrived (monotonic)."""
        assert self.ref is not None
        detected = time.monotonic()
        try:
            problems = await self.firewall.verify(self.ref.policy, sets=sets)
        except FirewallError as err:
            self.report(Error("firewall verify", str(err)))
            return
        if problems:
            # How long the rules were off: from the first event (or this verify) to now.
            window = time.monotonic() - (detected if since is None else since)
            self.stats.repairs += 1
            if any(p.startswith("set ") for p in problems):
                # A re-created set is empty: grants must be written again, also for
                # answers in the cache (a hit skips the grant while the ledger says the
                # entries last).
                self.ledger.forget()
                if self.pipeline is not None:
                    self.pipeline.cache.clear()
            what, window_ms = "; ".join(problems), round(window * 1000)
            self.report(Repaired(what, window_ms))
            self.last_repair = {"at": time.time(), "what": what, "window_ms": window_ms}
        if sets:
            await self._recheck_marks()

    async def _recheck_marks(self) -> None:
        """A rule writing egressd's ctmark bits may come after the start: say so, once.

        Not a stop: the running rules still hold against everything but that rule, and
        stopping would not remove it. The journal names it and how to fix it.
        """
        assert self.ref is not None
        try:
            clashes = await self.firewall.mark_clashes(self.ref.policy)
        except FirewallError as err:
            self.report(Error("conntrack marks", str(err)))
            return
        if clashes and clashes != self._clashes_said:
            mask = self.ref.policy.config.daemon.ct_mask
            self.report(
                Error(
                    "conntrack marks",
                    f"another rule now writes the conntrack mark bits {mask:#010x} egressd "
                    f"relies on: {'; '.join(clashes)}. Remove it, or set daemon.ct_mask to "
                    "bits nobody else writes and reload",
                )
            )
        self._clashes_said = clashes

    # --- control socket (egressd status, grants, reload, check --resolve) -------------------

    async def _sync_control(self, config: Config) -> None:
        """Serve the control socket at the configured path (moved when a reload changes it).

        A socket that cannot be bound is an error in the journal, not a refused start: DNS
        and the rules matter more than the CLI, and `egressd status` then says "not running"
        loudly enough."""
        path = config.daemon.control
        if self.control is not None and self.control.path == path:
            return
        server = ControlServer(
            path,
            {
                "status": self._ctl_status,
                "grants": self._ctl_grants,
                "reload": self._ctl_reload,
                "resolve": self._ctl_resolve,
            },
        )
        try:
            await server.start()
        except OSError as err:
            self.report(Error("control socket", f"cannot serve {path}: {err}"))
            return
        if self.control is not None:
            await self.control.close()
        self.control = server

    async def _sync_metrics(self, config: Config) -> None:
        """Serve /metrics on daemon.metrics ("" = not at all), moved when a reload changes it.

        An address that cannot be bound is an error in the journal and a problem in
        `egressd status`, not a refused start: metrics are for watching, the agent's DNS
        and the rules must not wait on a port clash. The next reload tries again."""
        address = config.daemon.metrics
        if self.metrics is None:
            if not address:
                return
            from .metrics import MetricsServer

            self.metrics = MetricsServer(self.snapshot, self.latency)
        try:
            await self.metrics.serve(address)
        except OSError as err:
            still = f"; still serving on {self.metrics.address}" if self.metrics.address else ""
            self.report(Error("metrics", f"cannot serve metrics on {address}: {err}{still}"))

    async def _ctl_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.snapshot()

    async def _ctl_reload(self, args: dict[str, Any]) -> dict[str, Any]:
        """A synchronous reload: the answer is its outcome (``systemctl reload`` runs
        ``egressd reload``, so a failed reload fails there too)."""
        async with self._apply_lock:
            ok = await self.reload()
        last = self.last_reload or {}
        if not ok:
            raise ControlError(
                f"reload failed, the running policy is unchanged: {last.get('error')}"
            )
        return {"policy": last.get("policy", ""), "config": self._policy().config.path}

    async def _ctl_resolve(self, args: dict[str, Any]) -> dict[str, Any]:
        """`egressd check --resolve`: the running policy's decision and, for an allowed
        name only, its live answer (explain.resolve_live; grants nothing, no cache).
        Imported here: only this command needs it, and a start is faster without."""
        from . import explain

        assert self.pipeline is not None
        try:
            return await explain.resolve_live(
                self._policy(),
                self.pipeline.resolver,
                args.get("profile"),
                str(args.get("name", "")),
                str(args.get("type") or "A"),
                self.pipeline.local_addresses,
            )
        except explain.CheckError as err:
            raise ControlError(str(err)) from None

    async def _ctl_grants(self, args: dict[str, Any]) -> dict[str, Any]:
        """Live set entries, with time left and the names that justified each."""
        profile, address, name = args.get("profile"), args.get("address"), args.get("name")
        now = time.monotonic()
        names = self.ledger.names_by_address(now)
        out = []
        for (set_name, ip, proto, port), exp in self.ledger.entries(now):
            owner = profile_of(set_name)
            if profile and owner != profile or address and ip != address:
                continue
            why = names.get((owner, ip), [])
            if name and name.lower().rstrip(".") not in why:
                continue
            out.append(
                {
                    "profile": owner,
                    "set": set_name,
                    "address": ip,
                    "port": f"{PROTOCOLS.get(proto, proto)}:{port}" if proto else "",
                    "expires_in": max(0, round(exp - now)),
                    "names": why,
                }
            )
        out.sort(key=lambda g: (g["profile"], g["address"], g["port"]))
        return {"grants": out}

    def _policy(self) -> Policy:
        assert self.ref is not None
        return self.ref.policy

    def snapshot(self) -> dict[str, Any]:
        """What `egressd status` shows and the metrics export (docs/commands/status.md)."""
        policy = self._policy()
        config = policy.config
        now = time.monotonic()
        problems: list[str] = []
        warnings: list[str] = []
        profiles = []
        for p in config.profiles:
            listener = self.listeners.get(p.port)
            if listener is None:
                problems.append(f"profile {p.name}: no listener on port {p.port}")
            if p.mode == "audit":
                warnings.append(f"profile {p.name} is in AUDIT mode: nothing is blocked")
            live = [
                (name, self.ledger.live(name, now))
                for family, name in ((4, p.set4), (4, p.pset4), (6, p.set6), (6, p.pset6))
                if family in self.firewall.families
            ]
            profiles.append(
                {
                    "name": p.name,
                    "mode": p.mode,
                    "uids": list(p.uids),
                    "uid_ranges": [list(r) for r in p.uid_ranges],
                    "port": p.port,
                    "listeners": list(listener.addresses) if listener else [],
                    "counts": dataclasses.asdict(self.stats.of(p.name)),
                    "grants": sum(n for _, n in live),
                    "sets": [
                        {"name": name, "entries": n, "maxelem": config.grants.maxelem}
                        for name, n in live
                    ],
                }
            )
        if self.last_reload is not None and not self.last_reload["ok"]:
            problems.append(
                "the last reload failed (the previous policy is running): "
                + self.last_reload["error"]
            )
        if self._local_error:
            problems.append(f"the host's own addresses are unknown: {self._local_error}")
        if self.control is None:
            problems.append("the control socket is not served")
        if (self.metrics.address if self.metrics else "") != config.daemon.metrics:
            problems.append(f"metrics are not served on {config.daemon.metrics}")
        return {
            "version": __version__,
            "pid": os.getpid(),
            "config": config.path,
            "policy": policy.digest,
            "started": self.started_at,
            "healthy": not problems,
            "problems": problems,
            "warnings": warnings,
            "rules_checked": "on nf_tables events" if self.watch.active else f"every {POLL:g} s",
            "upstreams": [str(u) for u in config.daemon.upstreams],
            "profiles": profiles,
            "totals": self.stats.totals(),
            "last_reload": self.last_reload,
            "last_repair": self.last_repair,
        }
