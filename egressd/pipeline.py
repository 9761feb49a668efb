"""The spine: query -> policy -> cache or upstream -> grant -> reply, on bytes.

``Pipeline.handle`` reads top to bottom; every step is owned by a named module. The one
invariant that matters most is visible in ``_allowed``: addresses reach the agent only
after ``firewall.allow`` has returned (the kernel holds them), and a failed grant is
SERVFAIL.

Messages stay bytes: ``dnswire`` reads the client's query and the upstream's answer and
writes the reply, and the cache keeps records in wire form. dnspython only reads client
messages of an unusual shape (and refuses the unsupported ones).
"""

from __future__ import annotations

import functools
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import dns.rdatatype

from . import answers, cache, dnswire, rebind
from .allowlist import Labels
from .cache import Cache, Entry
from .dnswire import Query
from .errors import FirewallError, UpstreamError
from .events import (
    AnswerFiltered,
    Error,
    Event,
    GrantFailed,
    QueryAudited,
    QueryBlocked,
    QueryRefused,
    UpstreamFailed,
)
from .firewall.base import Allower, Write, entries_for, family_of
from .ledger import Ledger, Reason, grant_timeout, name_of
from .policy import Decision, Policy, ProfilePolicy, decide, decide_chain
from .stats import Counts, Stats

if TYPE_CHECKING:
    import dns.message

RD = 0x0100
NOERROR, SERVFAIL, REFUSED = 0, 2, 5
# RFC 8914 Extended DNS Error codes egressd sends.
EDE_OTHER, EDE_BLOCKED, EDE_NOT_SUPPORTED = 0, 15, 21


# BlockLog.per_query: (profile, event class name, the record's maker).
PerQuery = Callable[[str, str, Callable[[], Event]], None]


class Resolver(Protocol):
    async def resolve(self, labels: Labels, qtype: int, rd: bool) -> bytes: ...


@dataclass(slots=True)
class PolicyRef:
    """The one mutable reference a reload swaps, and its generation (bumped by each swap).

    A query remembers the generation it started under; an answer from an older
    generation is never cached, granted or served: it is decided again.
    """

    policy: Policy
    generation: int = 0


STALE_RETRIES = 3  # a query overtaken by this many reloads in a row gets SERVFAIL
REPEATS = 4096  # recent replies kept for ``Pipeline.repeat``


@dataclass(frozen=True, slots=True)
class _Repeat:
    """A reply made without waiting, and what it was made under (see Pipeline.repeat)."""

    generation: int
    tail: bytes  # the reply after its id
    # An answer from the cache: the entry, the cache's epoch, the age its TTLs were aged by.
    entry: Entry | None = None
    epoch: int = 0
    age: int = 0
    # A blocked name: its record (the client is the repeat's own).
    blocked: QueryBlocked | None = None
    counts: Counts | None = None  # the profile's counters


@dataclass(slots=True)
class _Ask:
    """One query on its way through the pipeline: what each step needs to know of it."""

    q: Query
    client: str  # "udp:ADDRESS:PORT" / "tcp:...", for records
    limit: int  # the largest reply the client takes
    wait: bool  # may wait for the upstream or the kernel (see Pipeline.handle)
    repeat: tuple[int, bytes] | None  # its key for Pipeline.repeat (UDP only)
    generation: int = 0  # the policy generation it is being decided under


class _Stale(Exception):
    """The policy changed while this answer was being made."""


class _Wait(Exception):
    """The answer needs the upstream or the kernel, and the caller cannot wait now."""


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
        # A reporter with a per-query budget (blocklog.BlockLog) is asked first, so that a
        # record it would not log is never made.
        self._per_query: PerQuery | None = getattr(report, "per_query", None)
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
        # Recent UDP replies served from the cache, by (port, the query's bytes after the
        # id): see ``repeat``.
        self._repeats: dict[tuple[int, bytes], _Repeat] = {}

    def set_local_addresses(self, addresses: frozenset[rebind.IPAddress]) -> bool:
        """Take the host's current addresses; True when they changed."""
        if addresses == self.local_addresses:
            return False
        self.local_addresses = addresses
        # Cached answers were screened against the old addresses: one that now points at
        # this host must not be served from the cache.
        self.cache.clear()
        return True

    def repeat(self, wire: bytes, port: int, addr: tuple[Any, ...]) -> bytes | None:
        """The reply to a repeat of a recent UDP query, without reading it; None: ``handle``.

        A cache hit is most of what an agent asks (every `npm install` asks for the
        registry again and again), a blocked name is what a misbehaving one asks again and
        again, and reading, deciding and rendering such a query was most of its cost. A
        query whose bytes after the id equal those of one answered that way gets the same
        reply with its own id (and a blocked one the same record, counted and rate-limited
        as always), as long as nothing the reply depends on changed: the policy
        (generation); for a cached answer also the cache (cleared on a reload, an address
        change or a re-created set), the whole seconds its TTLs were aged by, and the
        grants (``rearm_at``). Anything else takes the full path.
        """
        got = self._repeats.get((port, wire[2:]))
        if got is None or got.generation != self.ref.generation:
            return None
        stats = self.stats
        b = got.blocked
        if b is not None:
            stats.queries += 1
            stats.blocked += 1
            if got.counts is not None:
                got.counts.blocked += 1

            def record() -> QueryBlocked:
                # The client's text is made here: most repeats of a flood are not recorded.
                client = f"udp:{addr[0]}:{addr[1]}"
                return QueryBlocked(
                    b.profile, b.uids, b.qname, b.qtype, b.verdict, b.rule, "", client
                )

            if self._per_query is not None:
                self._per_query(b.profile, "QueryBlocked", record)
            else:
                self.report(record())
            return wire[:2] + got.tail
        entry = got.entry
        if entry is None:
            return None
        now = self.clock()
        if (
            got.epoch != self.cache.epoch
            or now >= entry.rearm_at
            or int(now - entry.stored) != got.age
        ):
            return None
        stats.queries += 1
        stats.cache_hits += 1
        stats.allowed += 1
        if got.counts is not None:
            got.counts.answered += 1
        return wire[:2] + got.tail

    def _remember(self, key: tuple[int, bytes], made: _Repeat) -> None:
        if len(self._repeats) >= REPEATS:
            self._repeats.clear()  # a bound, not an LRU: the next repeats fill it again
        self._repeats[key] = made

    async def handle(
        self, wire: bytes, port: int, client: str = "", *, udp: bool = True, wait: bool = True
    ) -> bytes | None:
        """The reply to one client message; None means drop it (malformed, not a query).

        ``wait=False``: answer only what needs neither the upstream nor the kernel (a
        blocked name, a refusal, a cache hit whose grants still last), else None; the
        listener asks so when its queries in flight are at their bound.
        """
        self.stats.queries += 1
        q = dnswire.parse_query(wire)
        if q is None:
            odd = self._odd(wire, port, client)
            if not isinstance(odd, Query):
                return odd
            q = odd
        ask = _Ask(
            q,
            client,
            limit=dnswire.udp_limit(q) if udp else 65535,
            wait=wait,
            repeat=(port, wire[2:]) if udp else None,
        )
        try:
            for _ in range(STALE_RETRIES):
                ask.generation = self.ref.generation
                try:
                    return await self._answer(ask, port)
                except _Stale:
                    self.stats.stale_answers += 1
            return self._fail(ask, "the policy kept changing")
        except _Wait:
            self.stats.dropped_busy += 1  # the client retries; better than queueing forever
            return None
        except Exception as err:  # noqa: BLE001 - a bug must cost one answer, not the daemon
            self.stats.internal_errors += 1
            self.report(Error("pipeline", f"{type(err).__name__}: {err}"))
            return self._fail(ask, "internal error")

    async def _answer(self, ask: _Ask, port: int) -> bytes:
        q = ask.q
        pp = self.ref.policy.by_port.get(port)
        if pp is None:  # a listener that a reload is retiring
            self.stats.refused += 1
            return dnswire.reply(
                q, REFUSED, ede=(EDE_NOT_SUPPORTED, "egressd: no profile on this port")
            )
        decision = decide(pp.matcher, q.labels)
        if not decision.allowed:
            if not pp.audit:
                return self._blocked(ask, pp, decision, remember=True)
            self._audited(ask, pp, decision)
        return await self._allowed(ask, pp, decision)

    def _check(self, generation: int) -> None:
        if self.ref.generation != generation:
            raise _Stale

    # --- blocked -----------------------------------------------------------------------------

    def _blocked(
        self,
        ask: _Ask,
        pp: ProfilePolicy,
        decision: Decision,
        reason: str = "",
        *,
        remember: bool = False,
    ) -> bytes:
        """``remember``: a decision of the policy alone (not of an upstream answer's
        CNAME chain), so a repeat of the query may be given the same reply."""
        q = ask.q
        self.stats.blocked += 1
        counts = self.stats.of(pp.profile.name)
        counts.blocked += 1
        record = QueryBlocked(
            profile=pp.profile.name,
            uids=pp.profile.uids,
            qname=dnswire.name_text(q.raw),
            qtype=_type_text(q.qtype),
            verdict=decision.verdict.value,
            rule=decision.source,
            reason=reason,
            client=ask.client,
        )
        self.report(record)
        reply = dnswire.reply(
            q,
            self.ref.policy.blocked_rcode,
            ede=(EDE_BLOCKED, dnswire.BLOCKED_TEXT),
            max_size=ask.limit,
        )
        if remember and ask.repeat is not None:
            made = _Repeat(ask.generation, reply[2:], blocked=record, counts=counts)
            self._remember(ask.repeat, made)
        return reply

    def _audited(self, ask: _Ask, pp: ProfilePolicy, decision: Decision, reason: str = "") -> None:
        """Audit mode: the name is answered (and granted) as if allowed, and what enforcing
        mode would have done is recorded, with the line it would need. Such a reply is
        never a repeat (``Pipeline.repeat``): each query is recorded, like a blocked one."""
        q = ask.q
        ask.repeat = None
        self.stats.of(pp.profile.name).audited += 1
        name = dnswire.name_text(q.raw).lower()
        self.report(
            QueryAudited(
                profile=pp.profile.name,
                uids=pp.profile.uids,
                qname=name,
                qtype=_type_text(q.qtype),
                verdict=decision.verdict.value,
                rule=decision.source,
                # A deny line wins over any allow line: nothing to add, the deny must go.
                needed="" if decision.rule is not None else name,
                client=ask.client,
            )
        )

    # --- allowed -----------------------------------------------------------------------------

    async def _allowed(self, ask: _Ask, pp: ProfilePolicy, decision: Decision) -> bytes:
        """Look up or resolve, grant, reply (and remember the reply for ``repeat``)."""
        q = ask.q
        now = self.clock()
        # Per profile: the CNAME chain was checked against this profile's deny rules only.
        key = (pp.profile.name, q.labels, q.qtype)
        hit = self.cache.get(key, now)
        if hit is not None:
            self.stats.cache_hits += 1
            entry, age = hit.entry, hit.age
        elif not ask.wait:
            raise _Wait
        else:
            resolved = await self._resolve(ask, pp, now)
            if isinstance(resolved, bytes):
                return resolved  # SERVFAIL, or blocked by a CNAME target
            entry, age = resolved, 0
            self.cache.put(key, entry)

        # Allow before reply: the addresses are in the kernel set before the agent sees them.
        try:
            if now >= entry.rearm_at:
                await self._grant(ask, pp, entry, age, ports_of(decision, pp))
        except FirewallError as err:
            self.stats.servfail_grant += 1
            self.stats.of(pp.profile.name).servfail += 1
            self.report(GrantFailed(pp.profile.name, dnswire.name_text(q.raw), str(err)))
            return self._fail(ask, "could not allow the answer's addresses")
        self._check(ask.generation)  # a reload during the kernel write: decide again
        self.stats.allowed += 1
        counts = self.stats.of(pp.profile.name)
        counts.answered += 1
        an, ancount, ns, nscount = entry.sections(age, q.labels)
        reply = dnswire.reply(q, entry.rcode, an, ancount, ns, nscount, max_size=ask.limit)
        if ask.repeat is not None and entry.rearm_at > now:
            made = _Repeat(ask.generation, reply[2:], entry, self.cache.epoch, age, counts=counts)
            self._remember(ask.repeat, made)
        return reply

    async def _resolve(self, ask: _Ask, pp: ProfilePolicy, now: float) -> Entry | bytes:
        """Ask the upstream; the entry to serve (and cache), or the reply that ends the query."""
        q = ask.q
        try:
            wire = await self.resolver.resolve(q.labels, q.qtype, bool(q.flags & RD))
            response = dnswire.parse_response(wire)
        except (UpstreamError, dnswire.WireError) as err:
            self.stats.servfail_upstream += 1
            self.stats.of(pp.profile.name).servfail += 1
            what = str(err) if isinstance(err, UpstreamError) else f"malformed answer: {err}"
            self.report(UpstreamFailed(pp.profile.name, dnswire.name_text(q.raw) + ".", what))
            return self._fail(ask, "upstream failed")
        self._check(ask.generation)  # decided under a policy a reload has replaced since
        ans = answers.extract(response)
        deny = decide_chain(pp.matcher, ans.chain[1:])
        if deny is not None:
            if not pp.audit:
                return self._blocked(ask, pp, deny, reason="CNAME target denied")
            self._audited(ask, pp, deny)
        ceiling = self.ref.policy.config.grants.ceiling
        # Rebinding guard: loopback, private, metadata and this host's addresses leave the
        # answer here, before the cache, so neither a grant nor a hit ever sees them.
        screened = self._screen(pp, q.labels, [a.ip for a in ans.addresses])
        if not screened.dropped:
            return cache.entry(response, ans, now, ceiling)
        self._filtered(ask, pp, screened)
        if not screened.kept:
            return cache.emptied(ans, self.ref.policy.rebind_rcode, now, ceiling)
        return cache.entry(response, ans.without({d.ip for d in screened.dropped}), now, ceiling)

    def _screen(self, pp: ProfilePolicy, labels: Labels, ips: list[str]) -> rebind.Screened:
        if not ips:
            return rebind.Screened((), ())
        got = self._exceptions.get(pp.profile.name)
        if got is None or got[0] is not pp:
            p = pp.profile
            got = (pp, rebind.Exceptions(p.private_cidrs, p.private_names))
            self._exceptions[p.name] = got
        return rebind.screen(ips, got[1], self.local_addresses, labels)

    def _filtered(self, ask: _Ask, pp: ProfilePolicy, screened: rebind.Screened) -> None:
        q = ask.q
        self.report(
            AnswerFiltered(
                profile=pp.profile.name,
                qname=dnswire.name_text(q.raw).lower(),
                qtype=_type_text(q.qtype),
                dropped=tuple(d.ip for d in screened.dropped),
                rules=tuple(d.why.rule for d in screened.dropped),
                reason="; ".join(f"{d.ip}: {d.why}" for d in screened.dropped),
                kept=len(screened.kept),
                client=ask.client,
            )
        )

    async def _grant(
        self, ask: _Ask, pp: ProfilePolicy, entry: Entry, age: int, ports: tuple[int, ...]
    ) -> None:
        addrs = entry.addresses_at(age)
        if not addrs:
            entry.rearm_at = math.inf
            return
        p = pp.profile
        settings = self.ref.policy.config.grants
        now = self.clock()
        name = name_of(ask.q.labels)
        wanted = [
            (e, a.ttl) for a in addrs for e in entries_for(p.name, a.ip, a.family, ports, name)
        ]
        plan = self.ledger.plan(wanted, settings, now)
        self.stats.grant_skips += len(wanted) - len(plan)
        self._check(ask.generation)  # never write a grant of a replaced policy
        reason = Reason(
            p.name,
            name,
            entry.chain,
            ports,
            {a.ip: now + grant_timeout(a.ttl, settings) for a in addrs},
        )
        if plan:
            if not ask.wait:
                raise _Wait
            self.granting += 1
            try:
                await self.firewall.allow(plan)
                self.stats.grant_writes += len(plan)
                self.ledger.commit(plan, now)
                # Recorded before `granting` drops, so a reload's reconcile (which waits
                # for it) sees this reason and judges it by the new policy.
                self.ledger.justify(reason)
            finally:
                self.granting -= 1
        elif not self.ledger.knows(reason):
            # Nothing to write (the entries last long enough), but another name wrote them.
            self.ledger.justify(reason)
        # Later hits skip all of this while the ledger's plan would write nothing: while
        # every entry has at least the longest grant a later hit can ask for (the TTLs
        # left now: they only shrink) minus the plan's slack left. Expiries in the ledger
        # only grow; a reload, or a set re-created behind egressd's back, clears the cache.
        # (The reason's recorded expiry is then not re-armed by those hits; it lags by at
        # most that window, and only a reload reads it: the entry is re-timed, never
        # extended.)
        longest = grant_timeout(max(a.ttl for a in addrs), settings)
        until = self.ledger.until([e.key for e, _ in wanted])
        entry.rearm_at = until - longest + settings.grace // 2

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
        denied = not decision.allowed or decide_chain(pp.matcher, reason.chain) is not None
        if denied and not pp.audit:  # audit mode grants every name
            return None
        ports = ports_of(decision, pp)
        kept = self._screen(pp, reason.labels, [ip for ip, _ in reason.items()]).kept
        return [
            e
            for ip in kept
            for e in entries_for(reason.profile, ip, family_of(ip), ports, reason.name)
        ]

    # --- the rest ----------------------------------------------------------------------------

    def _fail(self, ask: _Ask, text: str) -> bytes:
        return dnswire.reply(
            ask.q, SERVFAIL, ede=(EDE_OTHER, f"egressd: {text}"), max_size=ask.limit
        )

    def _odd(self, wire: bytes, port: int, client: str) -> Query | bytes | None:
        """A message dnswire does not read: dnspython parses it; a supported query comes
        back as a Query, an unsupported one gets REFUSED, anything else is dropped.

        dnspython's message module is imported here, on the first such message: the
        common path never needs it, and importing it costs the start ~12 ms.
        """
        import dns.exception
        import dns.flags
        import dns.message

        from . import replies

        try:
            m = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
            self.stats.malformed += 1
            return None
        if m.flags & dns.flags.QR:  # a response sent to us: never act on it
            self.stats.malformed += 1
            return None
        pp = self.ref.policy.by_port.get(port)
        problem = "no profile on this port" if pp is None else _unsupported(m)
        if problem:
            self.stats.refused += 1
            if pp is not None:
                self.stats.of(pp.profile.name).refused += 1
                self.report(QueryRefused(pp.profile.name, problem, client))
            r = replies.refused(m, problem)
            return replies.to_wire(r, replies.udp_limit(r))
        return _query_of(m)


def udp_client(addr: tuple[Any, ...]) -> str:
    """How records name a UDP client: "udp:ADDRESS:PORT" (TCP ones: "tcp:...")."""
    return f"udp:{addr[0]}:{addr[1]}"


def ports_of(decision: Decision, pp: ProfilePolicy) -> tuple[int, ...]:
    """The ports an allowed name's addresses get: its line's, else the profile's (() = all)."""
    rule = decision.rule
    if rule is not None and rule.ports is not None:
        return rule.ports
    return pp.profile.ports


@functools.cache
def _type_text(qtype: int) -> str:
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(qtype))


def _unsupported(query: dns.message.Message) -> str:
    import dns.opcode
    import dns.rdataclass

    if query.opcode() != dns.opcode.QUERY:
        return f"opcode {dns.opcode.to_text(query.opcode())} not supported"
    if len(query.question) != 1:
        return f"{len(query.question)} questions (exactly one is supported)"
    if query.question[0].rdclass != dns.rdataclass.IN:
        return f"class {dns.rdataclass.to_text(query.question[0].rdclass)} not supported"
    if query.question[0].rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
        return "zone transfers are not supported"
    return ""


def _query_of(m: dns.message.Message) -> Query:
    """The Query of a supported message dnspython read (one IN question)."""
    question = m.question[0]
    raw = question.name.labels[:-1] if question.name.is_absolute() else question.name.labels
    edns = m.edns >= 0
    name = question.name.to_wire()
    assert name is not None  # to_wire() without a file returns the bytes
    return Query(
        qid=m.id,
        flags=m.flags,
        labels=tuple(label.lower() for label in raw),
        raw=tuple(raw),
        qtype=question.rdtype,
        question=name + struct.pack("!HH", question.rdtype, question.rdclass),
        edns=edns,
        payload=max(512, m.payload) if edns else 512,
    )
