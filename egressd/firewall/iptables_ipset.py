"""The iptables-restore + ipset (netlink) firewall backend.

Rules go through the system's iptables-restore / ip6tables-restore, which drive whichever
backend the host uses (nft on Debian 12) and apply a whole table atomically; python-iptables
would only drive legacy xtables (see docs/architecture.md, Decisions). Sets go through
netlink with pyroute2's AsyncIPSet inside the event loop, never through an ``ipset``
subprocess on the hot path; the hot path's entry ADD/DEL messages are built by hand
(ipsetmsg) and go over a socket of their own (see IptablesIpset._adt).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shutil
import socket
from collections import Counter, defaultdict
from collections.abc import Sequence

from ..config import Profile
from ..errors import FirewallError
from ..netlinklib import AsyncIPSet, IPSetError, NetlinkError
from ..policy import Policy
from . import ipsetmsg, marks, rules
from .base import Found, Write

SET_PREFIX = "egressd-"
RESIZE_SUFFIX = "-new"  # "egressd-" + 15-char profile + "-v4" + this = 30 <= 31 characters
# The sets' default entry timeout. Every add passes its own timeout, so this never decides a
# grant; it is a constant so that changing the grant settings never changes a set's
# parameters (ipset refuses to "create" an existing set with other parameters).
SET_TIMEOUT = 300
IPSET_ERR_HASH_FULL = 4352  # IPSET_ERR_TYPE_SPECIFIC: the hash types use it for "set is full"
IPSET_ERR_EXIST = 4103  # IPSET_ERR_PRIVATE + 7: deleting an entry that is not there
IPSET_FLAG_WITH_COMMENT = 1 << 4  # the set keeps a comment per entry (cadt flags)
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # error ACKs without a copy of the (possibly long) request
ACK_TIMEOUT = 5.0  # seconds a set write waits for the kernel's ACK before it fails
ADT_RCVBUF = 4 << 20  # room for the ACKs of a burst of concurrent writes
SO_RCVBUFFORCE = 33  # not in Python's socket module
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_TOOLS = {4: ("iptables", "iptables-restore"), 6: ("ip6tables", "ip6tables-restore")}
# The OUTPUT jumps of one family: (table, chain) missing; (table, chain) -> copies where the
# jump is not (only) the first rule.
_Jumps = tuple[list[tuple[str, str]], dict[tuple[str, str], int]]


async def _run(argv: Sequence[str], stdin: str | None = None) -> tuple[int, str, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as err:
        raise FirewallError(f"cannot run {argv[0]}: {err}") from err
    out, stderr = await proc.communicate(stdin.encode() if stdin is not None else None)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), stderr.decode(errors="replace")


def _sets_of(profile: Profile) -> list[tuple[int, str, str]]:
    """(family, name, type) of a profile's sets: every port, and per port."""
    return [
        (4, profile.set4, "hash:ip"),
        (6, profile.set6, "hash:ip"),
        (4, profile.pset4, "hash:ip,port"),
        (6, profile.pset6, "hash:ip,port"),
    ]


def ipv6_available() -> bool:
    """Whether this kernel speaks IPv6 at all (else there is no IPv6 egress to close).

    Only "address family not supported" (ipv6.disable=1, a kernel built without it) means
    no IPv6 rules. Anything else, an unreadable /proc file included, means IPv6 rules: a
    wrong "no" would leave the agent's IPv6 egress open, a wrong "yes" only fails loudly.
    """
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError as err:
        return err.errno != errno.EAFNOSUPPORT
    return True


class IptablesIpset:
    """Firewall backend (see firewall.base.Firewall)."""

    def __init__(self) -> None:
        self._ipset: AsyncIPSet | None = None
        # The hot path's set writes: their own netlink socket, the ipset protocol version
        # pyroute2 negotiated, and who waits for which ACK (allow() runs concurrently).
        self._adt_sock: socket.socket | None = None
        self._adt_protocol = 0
        self._adt_seq = 0
        self._adt_waiting: dict[int, asyncio.Future[int]] = {}
        self._lock = asyncio.Lock()  # serialises install/verify/uninstall, not allow()
        self.created: list[str] = []  # sets an install had to create (none was there)
        self.families = (4, 6) if ipv6_available() else (4,)
        # Rejected packets go to NFLOG (egressd reads them back and attributes them); False
        # on a kernel where egressd could not bind NFLOG groups: the kernel LOG rule instead,
        # since an NFLOG rule that does not load would fail the whole install.
        self.nflog = True
        # family -> table -> own_rules() as of the last successful apply (what verify expects)
        self._applied: dict[int, dict[str, tuple[str, ...]]] = {}

    async def _sets(self) -> AsyncIPSet:
        if self._ipset is None:
            ipset = AsyncIPSet()
            try:
                await ipset.setup_endpoint()
            except (OSError, NetlinkError) as err:
                raise FirewallError(f"cannot open the ipset netlink socket: {err}") from err
            self._ipset = ipset
        return self._ipset

    async def _adt_socket(self) -> socket.socket:
        if self._adt_sock is None:
            self._adt_protocol = (await self._sets())._proto_version
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            except OSError as err:
                raise FirewallError(f"cannot open the ipset netlink socket: {err}") from err
            try:
                sock.setblocking(False)
                sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
                try:  # as root, past net.core.rmem_max; else what rmem_max allows
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, ADT_RCVBUF)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ADT_RCVBUF)
                sock.bind((0, 0))
                asyncio.get_running_loop().add_reader(sock.fileno(), self._adt_read)
            except OSError as err:
                sock.close()
                raise FirewallError(f"cannot set up the ipset netlink socket: {err}") from err
            self._adt_sock = sock
        return self._adt_sock

    def _adt_read(self, mine: int = 0) -> int | None:
        """Hand every ACK waiting on the socket to whoever waits for it; the code of the
        ACK of sequence number ``mine`` (a request whose sender reads at once), if it came.
        """
        sock = self._adt_sock
        got = None
        while sock is not None:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                # ENOBUFS: ACKs were dropped, nobody can tell whose; all waiters fail now
                # rather than at their timeout (their writes may or may not have landed).
                # The sender reading at once fails too: its ACK may be among them.
                self._adt_fail(FirewallError(f"ipset netlink socket: {err}"))
                if mine:
                    raise FirewallError(f"ipset netlink socket: {err}") from err
                break
            for seq, code in ipsetmsg.acks(data):
                if seq == mine:
                    got = code
                    continue
                fut = self._adt_waiting.pop(seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(code)
        return got

    def _adt_fail(self, err: FirewallError) -> None:
        waiting, self._adt_waiting = self._adt_waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(err)

    async def close(self) -> None:
        if self._adt_sock is not None:
            sock, self._adt_sock = self._adt_sock, None
            with contextlib.suppress(RuntimeError):  # no running loop: no reader either
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
            self._adt_fail(FirewallError("the ipset netlink socket was closed"))
        if self._ipset is not None:
            self._ipset.close()
            self._ipset = None

    # --- sets ------------------------------------------------------------------------------

    async def _ensure_set(self, name: str, stype: str, family: int, maxelem: int) -> list[Write]:
        """Create the set, or take over the one a previous run left (and its grants)."""
        found = await self._inspect(name, family)
        if found is None:
            try:
                await self._create(name, stype, family, maxelem)
            except NetlinkError as err:
                raise FirewallError(f"ipset create {name} failed: {err}") from err
            self.created.append(name)
            return []
        header, entries = found
        if header[:4] != (stype, _AF[family], header[2], True):
            raise FirewallError(
                f"set {name} exists but is not a {stype} set of IPv{family} with timeouts; "
                "remove it (egressd uninstall) and start again"
            )
        # A set of an older egressd has no comments: re-created with them the same way.
        if header[2] != maxelem or not header[4]:
            await self._resize(name, stype, family, maxelem, entries)
        return entries

    async def _create(self, name: str, stype: str, family: int, maxelem: int) -> None:
        ipset = await self._sets()
        await ipset.create(
            name,
            stype=stype,
            family=_AF[family],
            exclusive=True,
            maxelem=maxelem,
            timeout=SET_TIMEOUT,
            comment=True,
        )

    async def _inspect(
        self, name: str, family: int
    ) -> tuple[tuple[str, int, int, bool, bool], list[Write]] | None:
        """(type, family, maxelem, has timeouts, has comments) and the entries (seconds
        left) of a set."""
        ipset = await self._sets()
        header: tuple[str, int, int, bool, bool] | None = None
        entries: list[Write] = []
        try:
            async for msg in await ipset.list(name=name):
                data = msg.get_attr("IPSET_ATTR_DATA")
                if header is None and data is not None:
                    header = (
                        msg.get_attr("IPSET_ATTR_TYPENAME"),
                        msg.get_attr("IPSET_ATTR_FAMILY"),
                        data.get_attr("IPSET_ATTR_MAXELEM"),
                        data.get_attr("IPSET_ATTR_TIMEOUT") is not None,
                        bool(
                            (data.get_attr("IPSET_ATTR_CADT_FLAGS") or 0) & IPSET_FLAG_WITH_COMMENT
                        ),
                    )
                adt = msg.get_attr("IPSET_ATTR_ADT")
                for entry in adt.get_attrs("IPSET_ATTR_DATA") if adt else ():
                    ip_attr = entry.get_attr("IPSET_ATTR_IP_FROM")
                    ip = ip_attr.get_attr("IPSET_ATTR_IPADDR_IPV4") or ip_attr.get_attr(
                        "IPSET_ATTR_IPADDR_IPV6"
                    )
                    left = int(entry.get_attr("IPSET_ATTR_TIMEOUT") or 0)
                    proto = entry.get_attr("IPSET_ATTR_PROTO") or 0
                    port = entry.get_attr("IPSET_ATTR_PORT_FROM") or 0
                    comment = entry.get_attr("IPSET_ATTR_COMMENT") or ""
                    entries.append(Write(name, family, ip, left, proto, port, comment))
        except NetlinkError as err:
            if err.code == errno.ENOENT:
                return None
            raise FirewallError(f"ipset list {name} failed: {err}") from err
        if header is None:
            return None
        return header, entries

    async def _resize(
        self, name: str, stype: str, family: int, maxelem: int, entries: list[Write]
    ) -> None:
        """ipset cannot change maxelem in place: fill a new set, swap it in, drop the old.

        The swap is atomic and rules refer to the set by name, so the users never see a set
        without their grants.
        """
        if len(entries) > maxelem:
            raise FirewallError(
                f"set {name} holds {len(entries)} grants, more than the new maxelem {maxelem}"
            )
        ipset = await self._sets()
        tmp = name + RESIZE_SUFFIX
        with contextlib.suppress(NetlinkError):
            await ipset.destroy(tmp)  # left over from an interrupted resize
        try:
            await self._create(tmp, stype, family, maxelem)
            await self.allow(
                [
                    Write(tmp, family, w.ip, max(w.timeout, 1), w.proto, w.port, w.comment)
                    for w in entries
                ]
            )
            await ipset.swap(tmp, name)
            await ipset.destroy(tmp)
        except NetlinkError as err:
            raise FirewallError(f"resizing set {name} to maxelem {maxelem} failed: {err}") from err

    async def _set_names(self) -> list[str]:
        ipset = await self._sets()
        names = []
        try:
            async for msg in await ipset.list():
                name = msg.get_attr("IPSET_ATTR_SETNAME")
                if name and name.startswith(SET_PREFIX) and name not in names:
                    names.append(name)
        except NetlinkError as err:
            raise FirewallError(f"ipset list failed: {err}") from err
        return names

    async def allow(self, writes: Sequence[Write]) -> None:
        """Write all addresses of one answer with one netlink message per set.

        The kernel's ipset ADD takes a list of entries (IPSET_ATTR_ADT), as `ipset restore`
        uses; one round trip per set instead of one per address. No NLM_F_EXCL: an
        existing entry gets the new timeout (ipset's -exist).
        """
        await self._adt(ipsetmsg.IPSET_CMD_ADD, writes, "add")

    async def revoke(self, writes: Sequence[Write]) -> None:
        """Remove entries (their timeouts are ignored); entries already gone are fine."""
        await self._adt(ipsetmsg.IPSET_CMD_DEL, writes, "del")

    async def _adt(self, cmd: int, writes: Sequence[Write], verb: str) -> None:
        if not writes:
            return
        by_set: dict[tuple[str, int], list[Write]] = defaultdict(list)
        for w in writes:
            by_set[(w.set_name, w.family)].append(w)
        for (name, family), ws in by_set.items():
            code = await self._adt_request(cmd, name, family, ws, verb)
            if code == 0:
                continue
            if cmd == ipsetmsg.IPSET_CMD_DEL and code == IPSET_ERR_EXIST:
                # Already expired (or one of the list was): delete the rest one by one.
                if len(ws) > 1:
                    for w in ws:
                        await self._adt(cmd, [w], verb)
                continue
            detail = (
                "set is full (maxelem)"
                if code == IPSET_ERR_HASH_FULL
                else str(IPSetError(code, cmd=cmd))  # pyroute2's words, as before
            )
            shown = ", ".join(w.ip for w in ws[:4]) + (
                f" and {len(ws) - 4} more" if len(ws) > 4 else ""
            )
            raise FirewallError(f"ipset {verb} {shown} to {name} failed: {detail}")

    async def _adt_request(
        self, cmd: int, name: str, family: int, ws: Sequence[Write], verb: str
    ) -> int:
        """Send one ADD/DEL and wait for its ACK: 0, or the kernel's error code.

        pyroute2 took ~105 us to encode this message, most of a fresh query's time;
        ipsetmsg builds the same bytes in a few. The kernel handles the request inside
        send(), so the ACK is usually there when send() returns and is read at once; else
        the socket's reader hands it over when it arrives.
        """
        sock = await self._adt_socket()
        self._adt_seq = self._adt_seq % 0xFFFFFFFF + 1
        seq = self._adt_seq
        try:
            data = ipsetmsg.encode(cmd, name, family, ws, seq, protocol=self._adt_protocol)
        except ValueError as err:
            raise FirewallError(f"ipset {verb} to {name} failed: {err}") from err
        try:
            sock.send(data)
        except OSError as err:
            raise FirewallError(f"ipset {verb} to {name} failed: {err}") from err
        # Usually the ACK is there already: taken here, without a future.
        code = self._adt_read(seq)
        if code is not None:
            return code
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._adt_waiting[seq] = fut
        try:
            try:
                return await asyncio.wait_for(fut, ACK_TIMEOUT)
            except TimeoutError:
                raise FirewallError(
                    f"ipset {verb} to {name} failed: no ACK from the kernel in {ACK_TIMEOUT:g} s"
                ) from None
        finally:
            self._adt_waiting.pop(seq, None)

    # --- rules -----------------------------------------------------------------------------

    async def _jumps(self, family: int) -> _Jumps:
        """Which OUTPUT jumps are missing, and which are not (only) the first rule.

        A foreign rule above egressd's jump (an ACCEPT, say) would let the users out, so
        egressd's jump must be the first rule of OUTPUT in both tables.
        """
        tool = _TOOLS[family][0]
        missing: list[tuple[str, str]] = []
        stale: dict[tuple[str, str], int] = {}
        # Both tables at once: this is on the way to READY (and to every repair).
        results = await asyncio.gather(
            *(_run([tool, "-w", "-t", table, "-S", "OUTPUT"]) for table, _ in rules.JUMPS)
        )
        for (table, chain), (rc, out, err) in zip(rules.JUMPS, results, strict=True):
            if rc != 0:
                raise FirewallError(f"{tool} -t {table} -S OUTPUT failed: {err.strip()}")
            lines = [ln for ln in out.splitlines() if ln.startswith("-A OUTPUT")]
            jump = f"-A OUTPUT -j {chain}"
            copies = lines.count(jump)
            if copies == 0:
                missing.append((table, chain))
            elif lines[0] != jump or copies > 1:
                stale[(table, chain)] = copies
        return missing, stale

    async def _chains(self, family: int, table: str) -> tuple[list[str], list[str]]:
        """egressd's chains in a table, and the OUTPUT rules jumping to them."""
        tool = _TOOLS[family][0]
        rc, out, err = await _run([tool, "-w", "-t", table, "-S"])
        if rc != 0:
            raise FirewallError(f"{tool} -t {table} -S failed: {err.strip()}")
        return own_chains(out)

    async def _apply(
        self,
        policy: Policy,
        family: int,
        jumps: _Jumps | None = None,
    ) -> None:
        """jumps: what _jumps(family) just said, if nothing was written since."""
        profiles = policy.config.profiles
        fam = rules.V4 if family == 4 else rules.V6
        missing, stale = jumps if jumps is not None else await self._jumps(family)
        text = rules.render(
            profiles,
            fam,
            ct_mask=policy.config.daemon.ct_mask,
            log_rejects=policy.config.daemon.log_rejects,
            nflog=self.nflog,
            missing_jumps=missing,
            stale_jumps=stale,
        )
        await self._restore(family, text, "rules")
        # Profiles removed by a reload leave chains nobody jumps to any more; drop them.
        # One listing serves both: the chains to drop and, when there are none (every
        # start but after such a reload), verify's snapshot.
        wanted = rules.chains(profiles)
        tool = _TOOLS[family][0]
        listing = await self._listing(family)
        cleaned = False
        for table in ("filter", "nat"):
            chains, _ = own_chains(listing[table])
            gone = [c for c in chains if c not in wanted[table]]
            # All flushed before any is deleted: a profile chain jumps to its admit and
            # reject chains, which cannot be deleted while it still refers to them.
            for chain in gone:
                await _run([tool, "-w", "-t", table, "-F", chain])
            for chain in gone:
                await _run([tool, "-w", "-t", table, "-X", chain])
            cleaned = cleaned or bool(gone)
        if cleaned:
            listing = await self._listing(family)
        # What verify compares with: egressd's rules as iptables prints them now.
        self._applied[family] = {table: own_rules(text) for table, text in listing.items()}

    async def lock(self, policy: Policy) -> None:
        """Deny the users everything where egressd's rules are not in place (fail closed)."""
        async with self._lock:
            await self._lock_unguarded(policy)

    async def _lock_unguarded(self, policy: Policy) -> dict[int, _Jumps | None]:
        """Per family: its jumps as found when nothing was written, else None."""
        # Where egressd's filter jump is missing (a first start, a foreign flush), every
        # family first gets a deny-all for the users, then its full rules: if a later
        # restore fails (or the start is refused), that family stays closed, never open.
        # The families are independent: locked at the same time.
        results = await asyncio.gather(
            *(self._lock_family(policy, f) for f in self.families), return_exceptions=True
        )
        errors = []
        found: dict[int, _Jumps | None] = {}
        for family, result in zip(self.families, results, strict=True):
            if isinstance(result, FirewallError):
                errors.append(str(result))  # the other family was tried all the same
            elif isinstance(result, BaseException):
                raise result
            else:
                found[family] = result
        if errors:
            raise FirewallError("; ".join(errors))
        return found

    async def _lock_family(self, policy: Policy, family: int) -> _Jumps | None:
        missing, stale = await self._jumps(family)
        if ("filter", rules.FILTER_CHAIN) not in missing:
            return missing, stale
        fam = rules.V4 if family == 4 else rules.V6
        text = rules.render_lock(policy.config.profiles, fam, add_jump=True)
        await self._restore(family, text, "deny-all")
        return None  # the jumps changed: _apply lists them again

    async def _restore(self, family: int, text: str, what: str) -> None:
        restore = _TOOLS[family][1]
        rc, _, err = await _run([restore, "-w", "--noflush"], stdin=text)
        if rc != 0:
            raise FirewallError(f"{restore} of the {what} failed (unchanged): {err.strip()}")

    async def mark_clashes(self, policy: Policy) -> list[str]:
        """Rules of other software that write the conntrack mark bits egressd owns."""
        mask = policy.config.daemon.ct_mask
        found: list[str] = []
        tools = [_TOOLS[family][0] + "-save" for family in self.families]
        nft = shutil.which("nft") is not None
        # All dumps at once: they only read, and this is on the way to READY.
        dumps = [_run([tool]) for tool in tools]
        if nft:
            dumps.append(_run(["nft", "-j", "list", "ruleset"]))
        results = await asyncio.gather(*dumps)
        for tool, (rc, out, err) in zip(tools, results, strict=False):
            if rc != 0:
                raise FirewallError(f"{tool} failed: {err.strip()}")
            found += marks.iptables_writers(out, mask)
        if nft:
            rc, out, _ = results[-1]
            if rc == 0:  # no nft support in this kernel: nothing native to clash with
                found += marks.nft_writers(out, mask)
        return list(dict.fromkeys(found))

    async def install(self, policy: object) -> Found:
        assert isinstance(policy, Policy)
        g = policy.config.grants
        async with self._lock:
            found: dict[str, list[Write]] = {}
            # Sets first: the rules reference them.
            for p in policy.config.profiles:
                for family, name, stype in _sets_of(p):
                    found[name] = await self._ensure_set(name, stype, family, g.maxelem)
            jumps = await self._lock_unguarded(policy)
            # Every family is closed (or was already) before any gets its full rules; the
            # families' restores are independent, so they run at the same time. Each is
            # awaited: a family whose restore failed stays as it was (closed).
            results = await asyncio.gather(
                *(self._apply(policy, f, jumps.get(f)) for f in self.families),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            wanted_sets = set(found)
            for name in await self._set_names():
                if name not in wanted_sets:
                    await self._destroy_set(name)
            return found

    async def _destroy_set(self, name: str) -> None:
        ipset = await self._sets()
        try:
            await ipset.destroy(name)
        except NetlinkError as err:
            # In use by a rule we could not remove: leave it, say so.
            raise FirewallError(f"ipset destroy {name} failed: {err}") from err

    async def verify(self, policy: object, *, sets: bool = True) -> list[str]:
        """Compare the kernel's state with what the last apply left; re-apply on any drift.

        sets=False checks only the rules: the fast path after an nf_tables change event
        (ipset sends none, and listing every set with its members is the costly part).
        """
        assert isinstance(policy, Policy)
        problems: list[str] = []
        async with self._lock:
            for family in self.families:
                problems += await self._rule_problems(policy, family)
            if sets or problems:
                # Also before any repair: install re-creates a missing set, empty, and the
                # caller must then write the grants again (a flushed chain lets a set go).
                present = set(await self._set_names())
                for p in policy.config.profiles:
                    for _, name, _ in _sets_of(p):
                        if name not in present:
                            problems.insert(0, f"set {name} missing")
        if problems:
            self.created.clear()
            await self.install(policy)
            # A set destroyed between the check above and the install (`iptables -F`
            # and `ipset destroy` in a row) is re-created empty all the same: its grants
            # must be written again, so say so.
            problems += [
                f"set {name} re-created"
                for name in self.created
                if f"set {name} missing" not in problems
            ]
        return problems

    async def _listing(self, family: int) -> dict[str, str]:
        """`iptables -S` of the filter and nat tables (both at once: this is the fast path)."""
        tool = _TOOLS[family][0]
        tables = ("filter", "nat")
        results = await asyncio.gather(*(_run([tool, "-w", "-t", t, "-S"]) for t in tables))
        out: dict[str, str] = {}
        for table, (rc, text, err) in zip(tables, results, strict=True):
            if rc != 0:
                raise FirewallError(f"{tool} -t {table} -S failed: {err.strip()}")
            out[table] = text
        return out

    async def _rule_problems(self, policy: Policy, family: int) -> list[str]:
        listing = await self._listing(family)
        # Content: egressd's lines as iptables printed them right after the last apply.
        # Comparing printed with printed avoids normalising the render (iptables -S spells
        # rules differently from the restore input); a rule replaced in place is caught.
        problems: list[str] = []
        applied = self._applied.get(family)
        if applied is not None:
            for table, text in listing.items():
                problems += drift(f"IPv{family} {table}", applied.get(table, ()), own_rules(text))
        if not problems:
            # Counts against the render: also catches a snapshot that was taken of an
            # already-damaged state (a foreign change between the restore and the snapshot).
            fam = rules.V4 if family == 4 else rules.V6
            expected = rules.rule_counts(
                rules.render(
                    policy.config.profiles,
                    fam,
                    ct_mask=policy.config.daemon.ct_mask,
                    log_rejects=policy.config.daemon.log_rejects,
                    nflog=self.nflog,
                )
            )
            actual: dict[str, int] = {}
            for text in listing.values():
                for chain, n in rules.rule_counts(text).items():
                    actual[chain] = actual.get(chain, 0) + n
            problems += [
                f"IPv{family} chain {chain} has {actual.get(chain, 0)} of its {n} rules"
                for chain, n in sorted(expected.items())
                if actual.get(chain, 0) != n
            ]
        # A foreign rule above egressd's jump (an ACCEPT, say) would let the users out.
        for table, chain in rules.JUMPS:
            problems += jump_problems(f"IPv{family} {table}", chain, listing[table])
        return problems

    async def uninstall(self) -> None:
        async with self._lock:
            errors = []
            families = (4, 6) if ipv6_available() else (4,)
            for family in families:
                tool = _TOOLS[family][0]
                for table in ("filter", "nat"):
                    try:
                        chains, _ = await self._chains(family, table)
                    except FirewallError as err:
                        errors.append(str(err))
                        continue
                    for chain in chains:
                        while (await _run([tool, "-w", "-t", table, "-D", "OUTPUT", "-j", chain]))[
                            0
                        ] == 0:
                            pass
                    for chain in chains:
                        await _run([tool, "-w", "-t", table, "-F", chain])
                    for chain in chains:
                        rc, _, stderr = await _run([tool, "-w", "-t", table, "-X", chain])
                        if rc != 0:
                            errors.append(f"{tool} -t {table} -X {chain}: {stderr.strip()}")
            for name in await self._set_names():
                try:
                    await self._destroy_set(name)
                except FirewallError as err:
                    errors.append(str(err))
            if errors:
                raise FirewallError("; ".join(errors))


# --- verify's comparisons (pure) -----------------------------------------------------------


def own_chains(text: str) -> tuple[list[str], list[str]]:
    """egressd's chains in one table's `iptables -S`, and the OUTPUT rules jumping to them."""
    chains, jumps = [], []
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["-N"] and parts[1].startswith(rules.CHAIN_PREFIX):
            chains.append(parts[1])
        elif (
            parts[:2] == ["-A", "OUTPUT"]
            and parts[-2:-1] == ["-j"]
            and parts[-1].startswith(rules.CHAIN_PREFIX)
        ):
            jumps.append(" ".join(parts[2:]))
    return chains, jumps


def _target(parts: Sequence[str]) -> str:
    return parts[parts.index("-j") + 1] if "-j" in parts[:-1] else ""


def own_rules(text: str) -> tuple[str, ...]:
    """egressd's lines of one table's `iptables -S`: its chains, their rules, the jumps in."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] not in ("-N", "-A"):
            continue
        # A line of one of egressd's chains, or a jump into one (from OUTPUT, say).
        if parts[1].startswith(rules.CHAIN_PREFIX) or (
            parts[0] == "-A" and _target(parts).startswith(rules.CHAIN_PREFIX)
        ):
            out.append(line)
    return tuple(out)


def drift(where: str, before: Sequence[str], after: Sequence[str]) -> list[str]:
    """What differs between two own_rules() snapshots, one line per chain, briefly."""
    if tuple(before) == tuple(after):
        return []
    by_chain: dict[str, tuple[list[str], list[str]]] = {}
    for i, lines in enumerate((before, after)):
        for line in lines:
            by_chain.setdefault(line.split()[1], ([], []))[i].append(line)
    problems = []
    for chain, (b, a) in by_chain.items():
        if a == b:
            continue
        if f"-N {chain}" in b and f"-N {chain}" not in a:
            problems.append(f"{where} chain {chain} missing")
            continue
        missing = list((Counter(b) - Counter(a)).elements())
        extra = list((Counter(a) - Counter(b)).elements())
        if not missing and not extra:
            problems.append(f"{where} chain {chain}: rules reordered")
            continue
        parts = []
        if missing:
            parts.append(f"{len(missing)} rule(s) missing ({missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected ({extra[0]})")
        problems.append(f"{where} chain {chain}: " + ", ".join(parts))
    return problems


def jump_problems(where: str, chain: str, text: str) -> list[str]:
    """The OUTPUT jump to `chain` must be there exactly once, and first."""
    lines = [ln for ln in text.splitlines() if ln.startswith("-A OUTPUT ")]
    jump = f"-A OUTPUT -j {chain}"
    copies = lines.count(jump)
    if copies == 0:
        return [f"{where} OUTPUT jump to {chain} missing"]
    if lines[0] != jump or copies > 1:
        return [f"{where} OUTPUT jump to {chain} not first"]
    return []
