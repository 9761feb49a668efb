"""The spine: query -> policy -> cache/upstream -> grants -> firewall.allow -> reply.

``Pipeline.handle`` reads top to bottom; every step is owned by a named module. The one
invariant that matters most is visible here: addresses reach the agent only after
``firewall.allow`` has returned (the kernel holds them), and a failed grant is SERVFAIL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from . import answers, plainquery, rebind, replies
from .allowlist import Labels, labels_of
from .cache import NEGATIVE_TTL_CAP, Cache, Entry, aged, capped
from .config import DaemonSettings
from .errors import FirewallError, UpstreamError
from .events import (
    AnswerFiltered,
    Error,
    Event,
    GrantFailed,
    QueryBlocked,
    QueryRefused,
    UpstreamFailed,
)
from .ledger import Ledger, Reason, Write, entries_for, grant_timeout, name_of
from .policy import Decision, Policy, ProfilePolicy, decide, decide_chain
from .stats import Stats


class Resolver(Protocol):
    async def resolve(self, qname: dns.name.Name, qtype: int, rd: bool) -> dns.message.Message: ...


class Allower(Protocol):
    async def allow(self, writes: Sequence[Write]) -> None: ...


@dataclass(slots=True)
class PolicyRef:
    """The one mutable reference a reload swaps, and its generation (bumped by each swap).

    A query remembers the generation it started under; an answer from an older
    generation is never cached, granted or served: it is decided again.
    """

    policy: Policy
    generation: int = 0


STALE_RETRIES = 3  # a query overtaken by this many reloads in a row gets SERVFAIL


class _Stale(Exception):
    """The policy changed while this answer was being made."""


class Pipeline:
    def __init__(
        self,
        ref: PolicyRef,
        resolver: Resolver,
        firewall: Allower,
        ledger: Ledger,
        cache: Cache,
        report: Callable[[Event], None],
        stats: Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ref = ref
        self.resolver = resolver
        self.firewall = firewall
        self.ledger = ledger
        self.cache = cache
        self.report = report
        self.stats = stats or Stats()
        self.clock = clock
        # The host's own addresses, kept current by the daemon (egressd.localaddrs): an
        # answer pointing at this host is never granted (egressd.rebind).
        self.local_addresses: frozenset[rebind.IPAddress] = frozenset()
        # Kernel writes under way: a reload waits for them to finish before it reconciles
        # the ledger, so no grant of the old policy lands after the reconcile.
        self.granting = 0
        # Each profile's compiled private_answers, rebuilt when a reload swaps the profile.
        self._exceptions: dict[str, tuple[ProfilePolicy, rebind.Exceptions]] = {}

    def set_local_addresses(self, addresses: frozenset[rebind.IPAddress]) -> bool:
        """Take the host's current addresses; True when they changed."""
        if addresses == self.local_addresses:
            return False
        self.local_addresses = addresses
        # Cached answers were screened against the old addresses: one that now points at
        # this host must not be served from the cache.
        self.cache.clear()
        return True

    async def handle(self, wire: bytes, port: int, client: str = "") -> dns.message.Message | None:
        """Answer one client message; None means drop it (malformed, or not a query)."""
        self.stats.queries += 1
        query = self._parse(wire)
        if query is None:
            return None
        try:
            return await self._answer(query, port, client)
        except Exception as err:  # noqa: BLE001 - a bug must cost one answer, not the daemon
            self.stats.internal_errors += 1
            self.report(Error("pipeline", f"{type(err).__name__}: {err}"))
            return replies.servfail(query, "internal error")

    async def _answer(
        self, query: dns.message.Message, port: int, client: str
    ) -> dns.message.Message:
        for _ in range(STALE_RETRIES):
            try:
                return await self._answer_once(query, port, client, self.ref.generation)
            except _Stale:
                self.stats.stale_answers += 1
        return replies.servfail(query, "the policy kept changing")

    def _check(self, generation: int) -> None:
        if self.ref.generation != generation:
            raise _Stale

    async def _answer_once(
        self, query: dns.message.Message, port: int, client: str, generation: int
    ) -> dns.message.Message:
        pp = self.ref.policy.by_port.get(port)
        if pp is None:  # a listener that a reload is retiring
            self.stats.refused += 1
            return replies.refused(query, "no profile on this port")
        problem = _unsupported(query)
        if problem:
            self.stats.refused += 1
            self.report(QueryRefused(pp.profile.name, problem, client))
            return replies.refused(query, problem)

        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        labels = labels_of(qname)
        decision = decide(pp.matcher, labels)
        if not decision.allowed:
            return self._blocked(query, pp, decision, client)
        ports = ports_of(decision, pp)
        return await self._allowed(query, pp, qname, labels, qtype, client, ports, generation)

    def quick(self, wire: bytes, port: int, client: str = "") -> bytes | None:
        """The blocked path without dnspython (egressd.plainquery): the reply to a plain
        query the policy blocks, as bytes; None for anything else (then call ``handle``).

        The same decision, record and counters as ``_blocked``, at a fifth of the cost:
        parsing and rendering with dnspython were most of a blocked query's time, and a
        flood of blocked names must not take the resolver from allowed lookups
        (docs/design.md, "Listener defences").
        """
        q = plainquery.parse(wire)
        if q is None:
            return None
        pp = self.ref.policy.by_port.get(port)
        if pp is None:
            return None
        decision = decide(pp.matcher, q.labels)
        if decision.allowed:
            return None
        self.stats.queries += 1
        self.stats.blocked += 1
        self.report(
            QueryBlocked(
                profile=pp.profile.name,
                uids=pp.profile.uids,
                qname=q.qname,
                qtype=dns.rdatatype.to_text(dns.rdatatype.RdataType.make(q.qtype)),
                verdict=decision.verdict.value,
                rule=decision.source,
                reason="",
                client=client,
            )
        )
        refused = self.ref.policy.config.daemon.blocked_rcode == "refused"
        return plainquery.blocked_reply(q, dns.rcode.REFUSED if refused else dns.rcode.NXDOMAIN)

    def _parse(self, wire: bytes) -> dns.message.Message | None:
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
            self.stats.malformed += 1
            return None
        if query.flags & dns.flags.QR:  # a response sent to us: never act on it
            self.stats.malformed += 1
            return None
        return query

    def _blocked(
        self,
        query: dns.message.Message,
        pp: ProfilePolicy,
        decision: Decision,
        client: str,
        reason: str = "",
    ) -> dns.message.Message:
        self.stats.blocked += 1
        q = query.question[0]
        self.report(
            QueryBlocked(
                profile=pp.profile.name,
                uids=pp.profile.uids,
                qname=q.name.to_text(omit_final_dot=True),
                qtype=dns.rdatatype.to_text(q.rdtype),
                verdict=decision.verdict.value,
                rule=decision.source,
                reason=reason,
                client=client,
            )
        )
        rcode = (
            dns.rcode.REFUSED
            if self.ref.policy.config.daemon.blocked_rcode == "refused"
            else dns.rcode.NXDOMAIN
        )
        return replies.blocked(query, rcode)

    async def _allowed(
        self,
        query: dns.message.Message,
        pp: ProfilePolicy,
        qname: dns.name.Name,
        labels: Labels,
        qtype: int,
        client: str,
        ports: tuple[int, ...],
        generation: int,
    ) -> dns.message.Message:
        # Per profile: the CNAME chain was checked against this profile's deny rules only.
        key = (pp.profile.name, labels, qtype)
        now = self.clock()
        hit = self.cache.get(key, now)
        if hit is not None:
            self.stats.cache_hits += 1
            entry, age = hit.entry, hit.age
            addrs = [(ip, fam, max(0, ttl - age)) for ip, fam, ttl in entry.addresses]
        else:
            try:
                response = await self.resolver.resolve(
                    qname, qtype, bool(query.flags & dns.flags.RD)
                )
            except UpstreamError as err:
                self.stats.servfail_upstream += 1
                self.report(UpstreamFailed(pp.profile.name, qname.to_text(), str(err)))
                return replies.servfail(query, "upstream failed")
            self._check(generation)  # decided under a policy a reload has replaced since
            ans = answers.extract(response, qname)
            deny = decide_chain(pp.matcher, (labels_of(n) for n in ans.chain[1:]))
            if deny is not None:
                return self._blocked(query, pp, deny, client, reason="CNAME target denied")
            ceiling = self.ref.policy.config.grants.ceiling
            # Rebinding guard: loopback, private, metadata and this host's addresses leave
            # the answer here, before the cache, so neither a grant nor a hit ever sees them.
            screened = self._screen(pp, labels, ans)
            if screened.dropped:
                self._filtered(query, pp, screened, client)
                entry = _screened_entry(
                    response, ans, screened, now, ceiling, self.ref.policy.config.daemon
                )
            else:
                entry = _entry(response, ans, now, ceiling)
            self.cache.put(key, entry)
            age = 0
            addrs = list(entry.addresses)

        # Allow before reply: the addresses are in the kernel set before the agent sees them.
        try:
            await self._grant(pp, addrs, labels, entry.chain, ports, generation)
        except FirewallError as err:
            self.stats.servfail_grant += 1
            self.report(GrantFailed(pp.profile.name, qname.to_text(), str(err)))
            return replies.servfail(query, "could not allow the answer's addresses")
        self._check(generation)  # a reload during the kernel write: decide again
        self.stats.allowed += 1
        return replies.answer(
            query, entry.rcode, aged(entry.answer, age), aged(entry.authority, age)
        )

    def _screen(self, pp: ProfilePolicy, labels: Labels, ans: answers.Answer) -> rebind.Screened:
        if not ans.addresses:
            return rebind.Screened((), ())
        return self._screen_ips(pp, labels, [a.ip for a in ans.addresses])

    def _screen_ips(self, pp: ProfilePolicy, labels: Labels, ips: list[str]) -> rebind.Screened:
        got = self._exceptions.get(pp.profile.name)
        if got is None or got[0] is not pp:
            p = pp.profile
            got = (pp, rebind.Exceptions(p.private_cidrs, p.private_names))
            self._exceptions[p.name] = got
        return rebind.screen(ips, got[1], self.local_addresses, labels)

    def judge(self, reason: Reason) -> list[Write] | None:
        """What the current policy grants for a remembered answer (ledger.reconcile).

        None when the name is no longer allowed (or a CNAME target is now denied);
        else the set entries of the addresses it may still have, on the ports its
        allowlist line now gives.
        """
        pp = self.ref.policy.by_name.get(reason.profile)
        if pp is None:
            return None
        decision = decide(pp.matcher, reason.labels)
        if not decision.allowed or decide_chain(pp.matcher, reason.chain) is not None:
            return None
        ports = ports_of(decision, pp)
        kept = set(self._screen_ips(pp, reason.labels, [ip for ip, _ in reason.addrs]).kept)
        name = name_of(reason.labels)
        return [
            e
            for ip, family in reason.addrs
            if ip in kept
            for e in entries_for(pp.profile, ip, family, ports, name)
        ]

    def _filtered(
        self,
        query: dns.message.Message,
        pp: ProfilePolicy,
        screened: rebind.Screened,
        client: str,
    ) -> None:
        q = query.question[0]
        self.report(
            AnswerFiltered(
                profile=pp.profile.name,
                qname=q.name.to_text(omit_final_dot=True).lower(),
                qtype=dns.rdatatype.to_text(q.rdtype),
                dropped=tuple(d.ip for d in screened.dropped),
                rules=tuple(d.why.rule for d in screened.dropped),
                reason="; ".join(f"{d.ip}: {d.why}" for d in screened.dropped),
                kept=len(screened.kept),
                client=client,
            )
        )

    async def _grant(
        self,
        pp: ProfilePolicy,
        addrs: list[tuple[str, int, int]],
        labels: Labels,
        chain: tuple[Labels, ...],
        ports: tuple[int, ...],
        generation: int,
    ) -> None:
        if not addrs:
            return
        p = pp.profile
        settings = self.ref.policy.config.grants
        now = self.clock()
        name = name_of(labels)
        wanted = [(e, ttl) for ip, fam, ttl in addrs for e in entries_for(p, ip, fam, ports, name)]
        plan = self.ledger.plan(wanted, settings, now)
        self.stats.grant_skips += len(wanted) - len(plan)
        self._check(generation)  # never write a grant of a replaced policy
        reason = Reason(
            p.name,
            labels,
            chain,
            ports,
            {(ip, fam): now + grant_timeout(ttl, settings) for ip, fam, ttl in addrs},
            {e.key for e, _ in wanted},
        )
        if not plan:
            # Nothing to write (a cache hit, mostly): the entries were written for this
            # reason already, unless another name wrote them.
            if not self.ledger.knows(reason):
                self.ledger.justify(reason)
            return
        self.granting += 1
        try:
            await self.firewall.allow(plan)
            self.stats.grant_writes += len(plan)
            self.ledger.commit(plan, now)
            # Recorded before `granting` drops, so a reload's reconcile (which waits for
            # it) sees this reason and judges it by the new policy.
            self.ledger.justify(reason)
        finally:
            self.granting -= 1


def ports_of(decision: Decision, pp: ProfilePolicy) -> tuple[int, ...]:
    """The ports an allowed name's addresses get: its line's, else the profile's (() = all)."""
    rule = decision.rule
    if rule is not None and rule.ports is not None:
        return rule.ports
    return pp.profile.ports


def _unsupported(query: dns.message.Message) -> str:
    if query.opcode() != dns.opcode.QUERY:
        return f"opcode {dns.opcode.to_text(query.opcode())} not supported"
    if len(query.question) != 1:
        return f"{len(query.question)} questions (exactly one is supported)"
    if query.question[0].rdclass != dns.rdataclass.IN:
        return f"class {dns.rdataclass.to_text(query.question[0].rdclass)} not supported"
    if query.question[0].rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
        return "zone transfers are not supported"
    return ""


REBIND_RCODES = {
    "noerror": dns.rcode.NOERROR,
    "nxdomain": dns.rcode.NXDOMAIN,
    "refused": dns.rcode.REFUSED,
    "servfail": dns.rcode.SERVFAIL,
}


def _screened_entry(
    response: dns.message.Message,
    ans: answers.Answer,
    screened: rebind.Screened,
    now: float,
    ceiling: int,
    daemon: DaemonSettings,
) -> Entry:
    """The cache entry of an answer the rebinding guard removed addresses from."""
    drop = {d.ip for d in screened.dropped}
    if not screened.kept:
        # Nothing left to reach: an empty answer (its CNAMEs lead nowhere) with the
        # configured rcode, cached as long as the answer it stands for, like a negative one.
        return Entry(
            rcode=REBIND_RCODES[daemon.rebind_rcode],
            answer=(),
            authority=(),
            addresses=(),
            stored=now,
            ttl=min(ans.min_ttl or 0, ceiling, NEGATIVE_TTL_CAP),
        )
    rrsets = [r for r in (_without(rrset, drop) for rrset in ans.rrsets) if r is not None]
    kept = answers.Answer(
        chain=ans.chain,
        rrsets=tuple(rrsets),
        addresses=tuple(a for a in ans.addresses if a.ip not in drop),
    )
    return _entry(response, kept, now, ceiling)


def _without(rrset: dns.rrset.RRset, drop: set[str]) -> dns.rrset.RRset | None:
    """The rrset without the dropped addresses; None when none is left."""
    if rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return rrset
    keep = [rd for rd in rrset if rd.address not in drop]
    if len(keep) == len(rrset):
        return rrset
    if not keep:
        return None
    return dns.rrset.from_rdata_list(rrset.name, rrset.ttl, keep)


def _entry(response: dns.message.Message, ans: answers.Answer, now: float, ceiling: int) -> Entry:
    rcode = response.rcode()
    if ans.rrsets:
        ttl = min(ans.min_ttl or 0, ceiling)
    else:
        # Negative answer: the SOA's TTL/minimum bounds how long it may be cached (RFC 2308).
        soas = [r for r in response.authority if r.rdtype == dns.rdatatype.SOA]
        ttl = min((min(r.ttl, r[0].minimum) for r in soas if len(r)), default=0)
        ttl = min(ttl, NEGATIVE_TTL_CAP)
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        ttl = 0  # never cache failures
    return Entry(
        rcode=rcode,
        # A client may cache an answer for its TTL; the grant lasts at most ceiling + grace,
        # so a TTL above the ceiling would outlive the grant.
        answer=tuple(capped(r, ceiling) for r in ans.rrsets),
        authority=tuple(r for r in response.authority if r.rdtype == dns.rdatatype.SOA),
        addresses=tuple((a.ip, a.family, a.ttl) for a in ans.addresses),
        stored=now,
        ttl=ttl,
        chain=tuple(labels_of(n) for n in ans.chain[1:]),
    )
