"""Pipeline.handle end to end with recording fakes: no sockets, no firewall, no clock."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update
import pytest

from egressd.allowlist import parse_lines
from egressd.cache import Cache
from egressd.config import Config, DaemonSettings, GrantSettings, Profile, Upstream
from egressd.errors import FirewallError, UpstreamError
from egressd.events import (
    AnswerFiltered,
    Error,
    Event,
    GrantFailed,
    QueryAudited,
    QueryBlocked,
    QueryRefused,
    UpstreamFailed,
)
from egressd.firewall.base import TCP, UDP, Write
from egressd.ledger import Ledger
from egressd.pipeline import Pipeline, PolicyRef
from egressd.policy import Policy
from egressd.stats import Stats

AGENT_LIST = "/etc/egressd/allowlist.d/agent.txt"
AGENT_RULES = """\
# agent
**.example.com
!ads.example.com
*.cdn.example.net
**.negative.example
"""
BUILD_LIST = "/etc/egressd/allowlist.d/build.txt"
BUILD_RULES = """\
**.example.com
!**.tracker.example
"""

GRANTS = GrantSettings(floor=300, ceiling=86400, grace=60, maxelem=65536)


def make_policy(blocked_rcode: str = "nxdomain") -> Policy:
    agent = Profile(
        name="agent", uids=(1000,), port=153, rules=tuple(parse_lines(AGENT_RULES, AGENT_LIST))
    )
    build = Profile(
        name="build", uids=(1001,), port=154, rules=tuple(parse_lines(BUILD_RULES, BUILD_LIST))
    )
    return Policy(
        Config(
            path="/etc/egressd/egressd.toml",
            daemon=DaemonSettings(upstreams=(Upstream("192.0.2.53"),), blocked_rcode=blocked_rcode),
            grants=GRANTS,
            profiles=(agent, build),
        )
    )


def line(text: str, pattern: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if ln.strip() == pattern)


# --- fakes -------------------------------------------------------------------------------------

Records = Sequence[tuple[str, int, str, str]]  # (owner, ttl, type, rdata)


@dataclass
class FakeResolver:
    log: list[str]
    answers: dict[tuple[str, int], Callable[[dns.message.Message], dns.message.Message]] = field(
        default_factory=dict
    )
    calls: list[tuple[dns.name.Name, int, bool]] = field(default_factory=list)
    error: Exception | None = None

    def add(
        self,
        name: str,
        rdtype: str,
        records: Records,
        *,
        rcode: int = dns.rcode.NOERROR,
        authority: Records = (),
        additional: Records = (),
    ) -> None:
        def build(q: dns.message.Message) -> dns.message.Message:
            r = dns.message.make_response(q)
            r.set_rcode(dns.rcode.Rcode(rcode))
            for section, recs in (
                (r.answer, records),
                (r.authority, authority),
                (r.additional, additional),
            ):
                for owner, ttl, rtype, rdata in recs:
                    rr = dns.rrset.from_text(owner, ttl, "IN", rtype, rdata)
                    merged = r.find_rrset(section, rr.name, rr.rdclass, rr.rdtype, create=True)
                    merged.update_ttl(ttl)
                    merged.union_update(rr)
            return r

        self.answers[(name.lower().rstrip("."), dns.rdatatype.from_text(rdtype))] = build

    async def resolve(self, labels: tuple[bytes, ...], qtype: int, rd: bool) -> bytes:
        qname = dns.name.Name((*labels, b""))
        self.log.append("resolve")
        self.calls.append((qname, qtype, rd))
        if self.error is not None:
            raise self.error
        q = dns.message.make_query(qname, dns.rdatatype.RdataType(qtype))
        key = (qname.to_text(omit_final_dot=True).lower(), qtype)
        return self.answers[key](q).to_wire()


@dataclass
class FakeFirewall:
    log: list[str]
    calls: list[list[Write]] = field(default_factory=list)
    fail: bool = False

    async def allow(self, writes: Sequence[Write]) -> None:
        self.calls.append(list(writes))
        # The kernel's acknowledgement is a round trip: the pipeline gets control back in
        # between, so a pipeline that replied without waiting for it would reply first.
        await asyncio.sleep(0)
        if self.fail:
            raise FirewallError("ipset add to egressd-agent-v4 failed: set is full (maxelem)")
        self.log.append("allow")  # recorded once the addresses are "in the kernel"


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    pipeline: Pipeline
    resolver: FakeResolver
    firewall: FakeFirewall
    events: list[Event]
    clock: Clock
    log: list[str]
    ledger: Ledger
    stats: Stats

    def ask(
        self, wire: bytes, port: int = 153, client: str = "udp:127.0.0.1:5555"
    ) -> dns.message.Message | None:
        async def handled() -> dns.message.Message | None:
            reply = await self.pipeline.handle(wire, port, client)
            # Recorded the moment the reply is handed back (where the listener sends it),
            # inside the loop: after asyncio.run, a grant still pending in a task would
            # already have been cancelled or finished, and the order would prove nothing.
            self.log.append("reply")
            return None if reply is None else dns.message.from_wire(reply)

        return asyncio.run(handled())


def rig(blocked_rcode: str = "nxdomain", cache_entries: int = 100) -> Rig:
    log: list[str] = []
    resolver = FakeResolver(log)
    firewall = FakeFirewall(log)
    events: list[Event] = []
    clock = Clock()
    ledger = Ledger()
    stats = Stats()
    p = Pipeline(
        PolicyRef(make_policy(blocked_rcode)),
        resolver,
        firewall,
        ledger,
        Cache(cache_entries),
        events.append,
        stats,
        clock,
    )
    return Rig(p, resolver, firewall, events, clock, log, ledger, stats)


def wire(
    name: str,
    rdtype: str = "A",
    *,
    edns: int = 0,
    qid: int = 0xBEEF,
    rd: bool = True,
    rdclass: str = "IN",
) -> bytes:
    q = dns.message.make_query(
        name,
        rdtype,
        rdclass=rdclass,
        use_edns=edns,
        options=[dns.edns.ECSOption("203.0.113.0", 24)] if edns >= 0 else None,
    )
    q.id = qid
    if not rd:
        q.flags &= ~dns.flags.RD
    return q.to_wire()


def by_ip(writes: Sequence[Write]) -> list[Write]:
    """Writes in address order (the upstream's record order is not the test's concern)."""
    return sorted(writes, key=lambda w: (w.ip, w.proto, w.port))


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(
        rd.address
        for rr in reply.answer
        if rr.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rd in rr
    )


def ede_codes(reply: dns.message.Message) -> list[int]:
    return [o.code for o in reply.options if isinstance(o, dns.edns.EDEOption)]


CHAIN = (
    ("www.example.com.", 3600, "CNAME", "e1.cdn-provider.example."),
    ("e1.cdn-provider.example.", 120, "A", "192.0.2.10"),
    ("e1.cdn-provider.example.", 120, "A", "192.0.2.11"),
    ("unrelated.example.", 300, "A", "198.51.100.66"),  # not on the chain
)


# --- allowed -------------------------------------------------------------------------------------


def test_allowed_name_is_granted_before_the_reply() -> None:
    r = rig()
    r.resolver.add(
        "www.example.com", "A", CHAIN, additional=(("ns.evil.", 300, "A", "198.51.100.77"),)
    )
    reply = r.ask(wire("WwW.Example.COM", qid=0x4242))
    assert reply is not None
    assert r.log == ["resolve", "allow", "reply"]
    # the resolver saw the rebuilt question only
    assert r.resolver.calls == [(dns.name.from_text("www.example.com"), dns.rdatatype.A, True)]
    # the firewall got exactly the chain's addresses, clamped to the floor plus grace
    assert [by_ip(c) for c in r.firewall.calls] == [
        [
            Write("egressd-agent-v4", 4, "192.0.2.10", 360),
            Write("egressd-agent-v4", 4, "192.0.2.11", 360),
        ]
    ]
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.id == 0x4242
    assert reply.question[0].name.to_text() == "WwW.Example.COM."
    assert addresses(reply) == ["192.0.2.10", "192.0.2.11"]
    # The queried name as the client spelled it (its question's), the chain as answered.
    assert [str(rr.name) for rr in reply.answer] == ["WwW.Example.COM.", "e1.cdn-provider.example."]
    assert reply.additional == []
    assert reply.options == ()  # the client's ECS option is not echoed
    assert r.ledger.remaining(("egressd-agent-v4", "192.0.2.10", 0, 0), r.clock.now) == 360
    assert r.ledger.names(("egressd-agent-v4", "192.0.2.10", 0, 0), r.clock.now) == [
        "www.example.com"
    ]
    assert r.events == []
    assert (r.stats.queries, r.stats.allowed, r.stats.grant_writes) == (1, 1, 2)


def test_allowed_aaaa_goes_to_the_v6_set() -> None:
    r = rig()
    r.resolver.add("v6.example.com", "AAAA", (("v6.example.com.", 7200, "AAAA", "2001:db8::1"),))
    reply = r.ask(wire("v6.example.com", "AAAA"))
    assert reply is not None and addresses(reply) == ["2001:db8::1"]
    assert r.firewall.calls == [[Write("egressd-agent-v6", 6, "2001:db8::1", 7260)]]


def test_rd_flag_is_passed_on() -> None:
    r = rig()
    r.resolver.add("norec.example.com", "A", (("norec.example.com.", 300, "A", "192.0.2.1"),))
    r.ask(wire("norec.example.com", rd=False))
    assert r.resolver.calls[0][2] is False


def test_answer_without_addresses_needs_no_grant() -> None:
    r = rig()
    r.resolver.add("txt.example.com", "TXT", (("txt.example.com.", 300, "TXT", '"v=spf1"'),))
    reply = r.ask(wire("txt.example.com", "TXT"))
    assert reply is not None and reply.rcode() == dns.rcode.NOERROR
    assert r.firewall.calls == []
    assert len(reply.answer) == 1


# --- blocked / denied ----------------------------------------------------------------------------


def test_blocked_name_never_reaches_the_resolver() -> None:
    r = rig()
    reply = r.ask(wire("www.example.org", qid=7))
    assert reply is not None
    assert r.resolver.calls == [] and r.firewall.calls == []
    assert reply.rcode() == dns.rcode.NXDOMAIN and reply.id == 7
    assert ede_codes(reply) == [dns.edns.EDECode.BLOCKED]
    assert reply.answer == []
    (ev,) = r.events
    assert isinstance(ev, QueryBlocked)
    assert (ev.profile, ev.uids, ev.qname, ev.qtype, ev.verdict, ev.rule) == (
        "agent",
        (1000,),
        "www.example.org",
        "A",
        "block",
        "",
    )
    assert ev.client == "udp:127.0.0.1:5555"
    assert r.stats.blocked == 1


def test_blocked_without_edns_has_no_ede() -> None:
    r = rig()
    reply = r.ask(wire("www.example.org", edns=-1))
    assert reply is not None and reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.edns == -1 and ede_codes(reply) == []


def test_deny_rule_reports_its_file_and_line() -> None:
    r = rig()
    reply = r.ask(wire("ads.example.com"))
    assert reply is not None and reply.rcode() == dns.rcode.NXDOMAIN
    assert r.resolver.calls == []
    (ev,) = r.events
    assert isinstance(ev, QueryBlocked)
    assert ev.verdict == "deny"
    assert ev.rule == f"{AGENT_LIST}:{line(AGENT_RULES, '!ads.example.com')}" == f"{AGENT_LIST}:3"


def test_blocked_rcode_refused() -> None:
    r = rig(blocked_rcode="refused")
    reply = r.ask(wire("www.example.org"))
    assert reply is not None and reply.rcode() == dns.rcode.REFUSED
    assert ede_codes(reply) == [dns.edns.EDECode.BLOCKED]


def test_profiles_are_told_apart_by_port() -> None:
    r = rig()
    r.resolver.add("x.cdn.example.net", "A", (("x.cdn.example.net.", 300, "A", "192.0.2.5"),))
    assert r.ask(wire("x.cdn.example.net"), port=153).rcode() == dns.rcode.NOERROR  # type: ignore[union-attr]
    assert r.ask(wire("x.cdn.example.net"), port=154).rcode() == dns.rcode.NXDOMAIN  # type: ignore[union-attr]
    ev = r.events[-1]
    assert isinstance(ev, QueryBlocked) and ev.profile == "build" and ev.uids == (1001,)


def test_unknown_port_is_refused() -> None:
    r = rig()
    reply = r.ask(wire("www.example.com"), port=999)
    assert reply is not None and reply.rcode() == dns.rcode.REFUSED
    assert r.resolver.calls == []
    assert r.stats.refused == 1


# --- CNAME targets ------------------------------------------------------------------------


def test_denied_cname_target_blocks_the_answer() -> None:
    r = rig()
    r.resolver.add(
        "promo.example.com",
        "A",
        (
            ("promo.example.com.", 300, "CNAME", "x.ads.example.com."),
            ("x.ads.example.com.", 300, "CNAME", "ADS.example.com."),
            ("ads.example.com.", 300, "A", "198.51.100.1"),
        ),
    )
    reply = r.ask(wire("promo.example.com"))
    assert reply is not None
    assert reply.rcode() == dns.rcode.NXDOMAIN and addresses(reply) == []
    assert r.firewall.calls == []
    (ev,) = r.events
    assert isinstance(ev, QueryBlocked)
    assert ev.verdict == "deny" and ev.rule == f"{AGENT_LIST}:3"
    assert ev.reason == "CNAME target denied"
    assert ev.qname == "promo.example.com"
    # not cached: asking again asks upstream again
    r.ask(wire("promo.example.com"))
    assert len(r.resolver.calls) == 2


def test_unlisted_cname_target_inherits_the_allow() -> None:
    r = rig()
    r.resolver.add("www.example.com", "A", CHAIN)
    reply = r.ask(wire("www.example.com"))
    assert reply is not None and addresses(reply) == ["192.0.2.10", "192.0.2.11"]


def test_cache_does_not_leak_a_chain_across_profiles() -> None:
    """Profile build denies **.tracker.example; agent does not. An answer cached for agent
    must not be served to build without the CNAME check."""
    r = rig()
    r.resolver.add(
        "img.example.com",
        "A",
        (
            ("img.example.com.", 300, "CNAME", "pixel.tracker.example."),
            ("pixel.tracker.example.", 300, "A", "198.51.100.9"),
        ),
    )
    agent = r.ask(wire("img.example.com"), port=153)
    assert agent is not None and addresses(agent) == ["198.51.100.9"]
    build = r.ask(wire("img.example.com"), port=154)
    assert build is not None
    assert build.rcode() == dns.rcode.NXDOMAIN and addresses(build) == []
    assert all(w.set_name != "egressd-build-v4" for call in r.firewall.calls for w in call)
    ev = r.events[-1]
    assert isinstance(ev, QueryBlocked) and ev.profile == "build" and ev.verdict == "deny"
    assert ev.rule == f"{BUILD_LIST}:2"


# --- failures ------------------------------------------------------------------------------------


def test_firewall_error_is_servfail_without_addresses() -> None:
    r = rig()
    r.resolver.add("www.example.com", "A", CHAIN)
    r.firewall.fail = True
    reply = r.ask(wire("www.example.com"))
    assert reply is not None
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.answer == [] and addresses(reply) == []
    assert ede_codes(reply) == [dns.edns.EDECode.OTHER]
    (ev,) = r.events
    assert isinstance(ev, GrantFailed)
    assert ev.profile == "agent" and "maxelem" in ev.error
    assert r.stats.servfail_grant == 1 and r.stats.allowed == 0
    # nothing was recorded as granted: the next try writes again
    assert r.ledger.remaining(("egressd-agent-v4", "192.0.2.10", 0, 0), r.clock.now) == 0
    r.firewall.fail = False
    again = r.ask(wire("www.example.com"))
    assert again is not None and addresses(again) == ["192.0.2.10", "192.0.2.11"]
    assert len(r.firewall.calls) == 2


def test_upstream_error_is_servfail() -> None:
    r = rig()
    r.resolver.error = UpstreamError("no answer from 192.0.2.53:53: Timeout")
    reply = r.ask(wire("www.example.com"))
    assert reply is not None and reply.rcode() == dns.rcode.SERVFAIL
    assert r.firewall.calls == []
    (ev,) = r.events
    assert isinstance(ev, UpstreamFailed) and "Timeout" in ev.error and ev.profile == "agent"
    assert r.stats.servfail_upstream == 1


def test_a_bug_costs_one_servfail() -> None:
    r = rig()
    r.resolver.error = RuntimeError("boom")
    reply = r.ask(wire("www.example.com"))
    assert reply is not None and reply.rcode() == dns.rcode.SERVFAIL and reply.answer == []
    assert r.firewall.calls == []
    (ev,) = r.events
    assert isinstance(ev, Error) and "RuntimeError: boom" in ev.error
    assert r.stats.internal_errors == 1


def test_upstream_servfail_is_passed_on_and_not_cached() -> None:
    r = rig()
    r.resolver.add("broken.example.com", "A", (), rcode=dns.rcode.SERVFAIL)
    for _ in range(2):
        reply = r.ask(wire("broken.example.com"))
        assert reply is not None and reply.rcode() == dns.rcode.SERVFAIL
    assert len(r.resolver.calls) == 2


# --- cache ---------------------------------------------------------------------------------------


def test_cache_hit_ages_ttls_and_skips_fresh_grants() -> None:
    r = rig()
    r.resolver.add("www.example.com", "A", CHAIN)
    r.ask(wire("www.example.com"))
    assert len(r.firewall.calls) == 1
    r.clock.now += 10.5
    reply = r.ask(wire("WWW.EXAMPLE.COM", qid=99))
    assert reply is not None and reply.id == 99
    assert len(r.resolver.calls) == 1  # from the cache
    assert [rr.ttl for rr in reply.answer] == [3600 - 10, 120 - 10]
    assert addresses(reply) == ["192.0.2.10", "192.0.2.11"]
    assert reply.question[0].name.to_text() == "WWW.EXAMPLE.COM."
    # the grants (360 s) still have 349.5 s left, more than 360 - 30: no kernel write, and
    # within that window (rearm_at) the hit does not even ask the ledger
    assert len(r.firewall.calls) == 1
    assert r.stats.cache_hits == 1 and r.stats.grant_skips == 0
    # At the window's end (30 s, half the grace) the ledger is asked again; 330 s are left
    # of 360, just enough: planned, skipped, no write.
    r.clock.now += 19.5
    assert r.ask(wire("www.example.com")) is not None
    assert len(r.firewall.calls) == 1 and r.stats.grant_skips == 2


def test_cache_hit_rearms_grants_that_run_out() -> None:
    r = rig()
    r.resolver.add("www.example.com", "A", CHAIN)
    r.ask(wire("www.example.com"))
    r.clock.now += 100
    reply = r.ask(wire("www.example.com"))
    assert reply is not None
    assert len(r.resolver.calls) == 1
    assert [rr.ttl for rr in reply.answer] == [3500, 20]
    assert r.log == ["resolve", "allow", "reply", "allow", "reply"]
    assert by_ip(r.firewall.calls[1]) == [
        Write("egressd-agent-v4", 4, "192.0.2.10", 360),
        Write("egressd-agent-v4", 4, "192.0.2.11", 360),
    ]
    assert r.ledger.remaining(("egressd-agent-v4", "192.0.2.10", 0, 0), r.clock.now) == 360


def test_cache_entry_expires_with_the_shortest_ttl() -> None:
    r = rig()
    r.resolver.add("www.example.com", "A", CHAIN)
    r.ask(wire("www.example.com"))
    r.clock.now += 120  # the A records' TTL
    r.ask(wire("www.example.com"))
    assert len(r.resolver.calls) == 2


def test_cache_firewall_error_on_hit() -> None:
    r = rig()
    r.resolver.add("www.example.com", "A", CHAIN)
    r.ask(wire("www.example.com"))
    r.clock.now += 100
    r.firewall.fail = True
    reply = r.ask(wire("www.example.com"))
    assert reply is not None and reply.rcode() == dns.rcode.SERVFAIL and reply.answer == []


def test_negative_answer_is_cached_with_soa() -> None:
    r = rig()
    soa = (("negative.example.", 900, "SOA", "ns. host. 1 2 3 4 60"),)
    r.resolver.add("nx.negative.example", "A", (), rcode=dns.rcode.NXDOMAIN, authority=soa)
    reply = r.ask(wire("nx.negative.example"))
    assert reply is not None and reply.rcode() == dns.rcode.NXDOMAIN
    assert [rr.rdtype for rr in reply.authority] == [dns.rdatatype.SOA]
    assert r.firewall.calls == []
    r.clock.now += 59
    assert r.ask(wire("nx.negative.example")).rcode() == dns.rcode.NXDOMAIN  # type: ignore[union-attr]
    assert len(r.resolver.calls) == 1
    r.clock.now += 1  # SOA minimum (60) reached
    r.ask(wire("nx.negative.example"))
    assert len(r.resolver.calls) == 2


def test_cache_disabled() -> None:
    r = rig(cache_entries=0)
    r.resolver.add("www.example.com", "A", CHAIN)
    r.ask(wire("www.example.com"))
    r.ask(wire("www.example.com"))
    assert len(r.resolver.calls) == 2
    assert len(r.firewall.calls) == 1  # the ledger still skips the second write


# --- refused before policy ----------------------------------------------------------------


def two_questions() -> bytes:
    q = dns.message.make_query("a.example.com", "A")
    q.question.append(
        dns.rrset.RRset(dns.name.from_text("b.example.com"), dns.rdataclass.IN, dns.rdatatype.A)
    )
    return q.to_wire()


def opcode(op: dns.opcode.Opcode) -> bytes:
    q = dns.message.make_query("www.example.com", "A")
    q.set_opcode(op)
    return q.to_wire()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (two_questions, "2 questions"),
        (lambda: wire("version.bind", "TXT", rdclass="CH"), "class CH"),
        (lambda: wire("www.example.com", rdclass="ANY"), "class ANY"),
        (lambda: opcode(dns.opcode.NOTIFY), "opcode NOTIFY"),
        (lambda: dns.update.UpdateMessage("example.com").to_wire(), "opcode UPDATE"),
        (lambda: opcode(dns.opcode.IQUERY), "opcode IQUERY"),
        (lambda: wire("example.com", "AXFR"), "zone transfers"),
        (lambda: wire("example.com", "IXFR"), "zone transfers"),
        (lambda: dns.message.Message().to_wire(), "0 questions"),
    ],
)
def test_unsupported_queries_are_refused(make: Callable[[], bytes], words: str) -> None:
    r = rig()
    reply = r.ask(make())
    assert reply is not None and reply.rcode() == dns.rcode.REFUSED
    assert r.resolver.calls == [] and r.firewall.calls == []
    (ev,) = r.events
    assert isinstance(ev, QueryRefused) and words in ev.reason and ev.profile == "agent"
    assert r.stats.refused == 1


# --- malformed -----------------------------------------------------------------------------------


def qr_set() -> bytes:
    q = dns.message.make_query("www.example.com", "A")
    q.flags |= dns.flags.QR
    return q.to_wire()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"garbage bytes, not DNS",
        b"\xff" * 12,
        wire("www.example.com")[:-3],
        wire("www.example.com") + b"trailing",
        qr_set(),
    ],
)
def test_malformed_is_dropped(data: bytes) -> None:
    r = rig()
    assert r.ask(data) is None
    assert r.stats.malformed == 1 and r.stats.queries == 1
    assert r.resolver.calls == [] and r.firewall.calls == [] and r.events == []


def test_response_to_a_blocked_name_is_dropped_not_answered() -> None:
    q = dns.message.make_query("www.example.org", "A")
    resp = dns.message.make_response(q)
    r = rig()
    assert r.ask(resp.to_wire()) is None
    assert r.events == []


def test_reply_ttl_never_outlives_the_grant() -> None:
    r = rig()
    r.resolver.add("long.example.com", "A", (("long.example.com.", 500000, "A", "192.0.2.40"),))
    reply = r.ask(wire("long.example.com"))
    assert reply is not None
    assert [rr.ttl for rr in reply.answer] == [GRANTS.ceiling]
    (write,) = r.firewall.calls[0]
    assert write.timeout == GRANTS.ceiling + GRANTS.grace >= reply.answer[0].ttl


# --- rebinding guard -----------------------------------------------------------------------------


def rebind_rig(
    rcode: str = "noerror", private: tuple[str, ...] = (), cache_entries: int = 100
) -> Rig:
    """A rig whose agent profile has `private_answers` (CIDRs and patterns) and rebind_rcode."""
    import dataclasses
    import ipaddress

    from egressd.allowlist import parse_pattern
    from egressd.config import IPNetwork

    r = rig(cache_entries=cache_entries)
    cfg = r.pipeline.ref.policy.config
    cidrs: list[IPNetwork] = []
    names = []
    for item in private:
        if "/" in item:
            cidrs.append(ipaddress.ip_network(item))
        else:
            names.append(parse_pattern(item, "/etc/egressd/egressd.toml:9"))
    agent = dataclasses.replace(
        cfg.profiles[0], private_cidrs=tuple(cidrs), private_names=tuple(names)
    )
    r.pipeline.ref.policy = Policy(
        dataclasses.replace(
            cfg,
            daemon=dataclasses.replace(cfg.daemon, rebind_rcode=rcode),
            profiles=(agent, *cfg.profiles[1:]),
        )
    )
    return r


def granted(r: Rig) -> list[str]:
    return sorted(w.ip for call in r.firewall.calls for w in call)


MIXED = (
    ("www.example.com.", 3600, "CNAME", "e1.cdn-provider.example."),
    ("e1.cdn-provider.example.", 120, "A", "192.0.2.10"),
    ("e1.cdn-provider.example.", 120, "A", "127.0.0.1"),
    ("e1.cdn-provider.example.", 120, "A", "169.254.169.254"),
    ("e1.cdn-provider.example.", 120, "A", "10.0.0.5"),
)


def test_private_addresses_are_removed_and_never_granted() -> None:
    r = rebind_rig()
    r.resolver.add("www.example.com", "A", MIXED)
    reply = r.ask(wire("www.example.com"))
    assert reply is not None and reply.rcode() == dns.rcode.NOERROR
    assert addresses(reply) == ["192.0.2.10"]
    assert [str(rr.name) for rr in reply.answer] == ["www.example.com.", "e1.cdn-provider.example."]
    assert [rr.ttl for rr in reply.answer] == [3600, 120]
    assert granted(r) == ["192.0.2.10"]
    assert r.log == ["resolve", "allow", "reply"]
    (ev,) = r.events
    assert isinstance(ev, AnswerFiltered) and ev.PER_QUERY
    assert (ev.profile, ev.qname, ev.qtype, ev.kept) == ("agent", "www.example.com", "A", 1)
    # (dropped, rule) pairs in the order of the upstream's records
    assert sorted(zip(ev.dropped, ev.rules, strict=True)) == [
        ("10.0.0.5", "10.0.0.0/8"),
        ("127.0.0.1", "127.0.0.0/8"),
        ("169.254.169.254", "169.254.0.0/16"),
    ]
    assert "169.254.169.254: 169.254.0.0/16 (link-local" in ev.reason
    assert ev.client == "udp:127.0.0.1:5555"
    assert r.stats.allowed == 1


@pytest.mark.parametrize(
    "bad",
    ["::1", "::ffff:10.77.0.5", "::ffff:127.0.0.1", "fd00::5", "fe80::1", "64:ff9b::a9fe:a9fe"],
)
def test_private_aaaa_is_removed(bad: str) -> None:
    r = rebind_rig()
    r.resolver.add(
        "v6.example.com",
        "AAAA",
        (("v6.example.com.", 300, "AAAA", "2001:db8::1"), ("v6.example.com.", 300, "AAAA", bad)),
    )
    reply = r.ask(wire("v6.example.com", "AAAA"))
    assert reply is not None and addresses(reply) == ["2001:db8::1"]
    assert granted(r) == ["2001:db8::1"]
    (ev,) = r.events
    assert isinstance(ev, AnswerFiltered) and len(ev.dropped) == 1


@pytest.mark.parametrize(
    ("rcode", "expected"),
    [
        ("noerror", dns.rcode.NOERROR),
        ("nxdomain", dns.rcode.NXDOMAIN),
        ("refused", dns.rcode.REFUSED),
        ("servfail", dns.rcode.SERVFAIL),
    ],
)
def test_answer_left_without_addresses_is_empty_with_the_configured_rcode(
    rcode: str, expected: int
) -> None:
    r = rebind_rig(rcode)
    r.resolver.add(
        "meta.example.com",
        "A",
        (
            ("meta.example.com.", 300, "CNAME", "x.attacker.example."),
            ("x.attacker.example.", 300, "A", "169.254.169.254"),
        ),
    )
    for _ in range(2):  # the second from the cache: still nothing
        reply = r.ask(wire("meta.example.com"))
        assert reply is not None and reply.rcode() == expected
        assert reply.answer == [] and addresses(reply) == []
    assert r.firewall.calls == []
    assert len(r.resolver.calls) == 1
    (ev,) = r.events
    assert isinstance(ev, AnswerFiltered) and ev.kept == 0 and ev.dropped == ("169.254.169.254",)
    assert "no address left" in ev.message()


def test_cache_hit_never_grants_or_serves_a_dropped_address() -> None:
    r = rebind_rig()
    r.resolver.add("www.example.com", "A", MIXED)
    r.ask(wire("www.example.com"))
    r.clock.now += 100  # the grant needs re-arming: the hit writes again
    reply = r.ask(wire("www.example.com"))
    assert reply is not None and addresses(reply) == ["192.0.2.10"]
    assert len(r.resolver.calls) == 1 and r.stats.cache_hits == 1
    assert len(r.firewall.calls) == 2
    assert granted(r) == ["192.0.2.10", "192.0.2.10"]


def test_cidr_exception_keeps_its_addresses() -> None:
    r = rebind_rig(private=("10.0.0.0/24", "fd00::/8"))
    r.resolver.add("www.example.com", "A", MIXED)
    reply = r.ask(wire("www.example.com"))
    assert reply is not None and addresses(reply) == ["10.0.0.5", "192.0.2.10"]
    assert granted(r) == ["10.0.0.5", "192.0.2.10"]
    (ev,) = r.events
    assert isinstance(ev, AnswerFiltered) and sorted(ev.dropped) == ["127.0.0.1", "169.254.169.254"]
    # the exception is the agent profile's only
    reply = r.ask(wire("www.example.com"), port=154)
    assert reply is not None and addresses(reply) == ["192.0.2.10"]


def test_name_exception_lets_the_answer_carry_private_addresses_but_not_this_host() -> None:
    r = rebind_rig(private=("**.lab.example.com",))
    r.resolver.add("git.lab.example.com", "A", (("git.lab.example.com.", 300, "A", "10.9.8.7"),))
    r.resolver.add(
        "lo.lab.example.com",
        "A",
        (
            ("lo.lab.example.com.", 300, "A", "127.0.0.1"),
            ("lo.lab.example.com.", 300, "A", "10.1.1.1"),
        ),
    )
    r.resolver.add("www.example.com", "A", MIXED)
    assert addresses(r.ask(wire("git.lab.example.com"))) == ["10.9.8.7"]  # type: ignore[arg-type]
    assert addresses(r.ask(wire("lo.lab.example.com"))) == ["10.1.1.1"]  # type: ignore[arg-type]
    assert addresses(r.ask(wire("www.example.com"))) == ["192.0.2.10"]  # type: ignore[arg-type]
    assert granted(r) == ["10.1.1.1", "10.9.8.7", "192.0.2.10"]
    assert [tuple(sorted(e.dropped)) for e in r.events if isinstance(e, AnswerFiltered)] == [
        ("127.0.0.1",),
        ("10.0.0.5", "127.0.0.1", "169.254.169.254"),
    ]


def test_the_hosts_own_addresses_are_removed_and_a_change_empties_the_cache() -> None:
    import ipaddress

    r = rebind_rig()
    r.resolver.add("www.example.com", "A", CHAIN)
    assert addresses(r.ask(wire("www.example.com"))) == ["192.0.2.10", "192.0.2.11"]  # type: ignore[arg-type]
    # 192.0.2.11 becomes one of the host's addresses: the cached answer must not serve it
    assert r.pipeline.set_local_addresses(frozenset({ipaddress.ip_address("192.0.2.11")}))
    assert not r.pipeline.set_local_addresses(frozenset({ipaddress.ip_address("192.0.2.11")}))
    r.clock.now += 100
    reply = r.ask(wire("www.example.com"))
    assert reply is not None and addresses(reply) == ["192.0.2.10"]
    assert len(r.resolver.calls) == 2
    assert "192.0.2.11" not in [w.ip for w in r.firewall.calls[-1]]
    ev = r.events[-1]
    assert isinstance(ev, AnswerFiltered) and ev.rules == ("own-address",)


def test_public_answers_are_untouched() -> None:
    r = rebind_rig()
    r.resolver.add("www.example.com", "A", CHAIN)
    reply = r.ask(wire("www.example.com"))
    assert reply is not None and addresses(reply) == ["192.0.2.10", "192.0.2.11"]
    assert r.events == []


# --- per-line ports, generations, judging on reload ---------------------------------------------

PORT_RULES = """\
pypi.example ports=443
files.example
**.cdn.example ports=80
"""


def port_policy(rules: str = PORT_RULES, ports: tuple[int, ...] = ()) -> Policy:
    agent = Profile(
        name="agent",
        uids=(1000,),
        port=153,
        ports=ports,
        rules=tuple(parse_lines(rules, AGENT_LIST)),
    )
    return Policy(
        Config(
            path="/etc/egressd/egressd.toml",
            daemon=DaemonSettings(upstreams=(Upstream("192.0.2.53"),)),
            grants=GRANTS,
            profiles=(agent,),
        )
    )


def port_rig(ports: tuple[int, ...] = ()) -> Rig:
    r = rig()
    r.pipeline.ref.policy = port_policy(ports=ports)
    return r


P4 = "egressd-agent-p4"


def test_a_lines_ports_limit_its_grants_to_those_ports() -> None:
    r = port_rig()
    r.resolver.add("pypi.example", "A", [("pypi.example.", 300, "A", "192.0.2.20")])
    r.resolver.add("files.example", "A", [("files.example.", 300, "A", "192.0.2.21")])
    assert addresses(r.ask(wire("pypi.example"))) == ["192.0.2.20"]
    assert addresses(r.ask(wire("files.example"))) == ["192.0.2.21"]
    assert r.firewall.calls == [
        [Write(P4, 4, "192.0.2.20", 360, TCP, 443), Write(P4, 4, "192.0.2.20", 360, UDP, 443)],
        [Write("egressd-agent-v4", 4, "192.0.2.21", 360)],  # no ports=: every port
    ]


def test_the_profiles_ports_are_the_default_for_lines_without_ports() -> None:
    r = port_rig(ports=(22,))
    r.resolver.add("files.example", "A", [("files.example.", 300, "A", "192.0.2.21")])
    r.ask(wire("files.example"))
    assert r.firewall.calls == [
        [Write(P4, 4, "192.0.2.21", 360, TCP, 22), Write(P4, 4, "192.0.2.21", 360, UDP, 22)]
    ]


def test_ports_come_from_the_queried_names_line_not_the_cname_targets() -> None:
    r = port_rig()
    r.resolver.add(
        "pypi.example",
        "A",
        [
            ("pypi.example.", 300, "CNAME", "edge.cdn.example."),
            ("edge.cdn.example.", 300, "A", "192.0.2.22"),
        ],
    )
    r.ask(wire("pypi.example"))
    assert {w.port for w in r.firewall.calls[0]} == {443}  # not 80 from **.cdn.example


def test_an_answer_overtaken_by_a_reload_is_decided_again_never_served_or_cached() -> None:
    r = port_rig()
    denied = port_policy(rules="files.example\n")  # pypi.example no longer allowed

    def reload_meanwhile(q: dns.message.Message) -> dns.message.Message:
        # The upstream answers after a reload swapped the policy.
        r.pipeline.ref.policy = denied
        r.pipeline.ref.generation += 1
        resp = dns.message.make_response(q)
        resp.answer.append(dns.rrset.from_text("pypi.example.", 300, "IN", "A", "192.0.2.20"))
        return resp

    r.resolver.answers[("pypi.example", dns.rdatatype.A)] = reload_meanwhile
    reply = r.ask(wire("pypi.example"))
    assert reply is not None and reply.rcode() == dns.rcode.NXDOMAIN
    assert r.firewall.calls == [] and len(r.pipeline.cache) == 0
    assert r.stats.stale_answers == 1
    assert [type(e) for e in r.events] == [QueryBlocked]


def test_a_reload_during_the_kernel_write_decides_again() -> None:
    r = port_rig()
    r.resolver.add("files.example", "A", [("files.example.", 300, "A", "192.0.2.21")])
    real_allow = r.firewall.allow

    async def allow_and_reload(writes: Sequence[Write]) -> None:
        if not r.firewall.calls:  # the first write: a reload happens meanwhile
            r.pipeline.ref.generation += 1
        await real_allow(writes)

    r.firewall.allow = allow_and_reload  # type: ignore[method-assign]
    reply = r.ask(wire("files.example"))
    assert addresses(reply) == ["192.0.2.21"]  # decided again under the new generation
    assert r.stats.stale_answers == 1
    assert r.log.index("allow") < r.log.index("reply")


def test_judge_says_what_the_current_policy_grants_for_a_remembered_answer() -> None:
    r = port_rig()
    r.resolver.add("pypi.example", "A", [("pypi.example.", 300, "A", "192.0.2.20")])
    r.ask(wire("pypi.example"))
    (reason,) = r.ledger._reasons["agent"].values()
    assert {w.port for w in r.pipeline.judge(reason) or []} == {443}
    r.pipeline.ref.policy = port_policy(rules="pypi.example ports=8443\n")
    assert {(w.set_name, w.proto, w.port) for w in r.pipeline.judge(reason) or []} == {
        (P4, TCP, 8443),
        (P4, UDP, 8443),
    }
    r.pipeline.ref.policy = port_policy(rules="pypi.example\n")
    assert r.pipeline.judge(reason) == [Write("egressd-agent-v4", 4, "192.0.2.20", 0)]
    r.pipeline.ref.policy = port_policy(rules="pypi.example\n!pypi.example\n")
    assert r.pipeline.judge(reason) is None
    r.pipeline.ref.policy = port_policy(rules="files.example\n")
    assert r.pipeline.judge(reason) is None


# --- repeats of cached answers -------------------------------------------------------------------


def test_a_repeat_of_a_cached_answer_gets_the_same_reply_with_its_own_id() -> None:
    r = rig()
    r.resolver.add("www.example.com", "A", (("www.example.com.", 3600, "A", "192.0.2.10"),))
    first = r.ask(wire("www.example.com", qid=1))
    assert first is not None
    again = r.pipeline.repeat(wire("www.example.com", qid=2), 153, ("127.0.0.1", 5555))
    assert again is not None
    reply = dns.message.from_wire(again)
    assert reply.id == 2 and addresses(reply) == ["192.0.2.10"]
    assert again[2:] == first.to_wire()[2:]
    assert (r.stats.queries, r.stats.cache_hits, r.stats.allowed) == (2, 1, 2)
    # Other bytes after the id (another EDNS size, another port): not a repeat.
    assert r.pipeline.repeat(wire("www.example.com", edns=-1), 153, ("127.0.0.1", 5555)) is None
    assert r.pipeline.repeat(wire("www.example.com"), 154, ("127.0.0.1", 5555)) is None


def test_a_repeat_is_not_served_once_what_its_reply_depends_on_changed() -> None:
    r = rig()
    r.resolver.add("www.example.com", "A", (("www.example.com.", 3600, "A", "192.0.2.10"),))
    q = wire("www.example.com")

    def fresh() -> bytes | None:
        """Ask through the full path (which remembers the reply), then as a repeat."""
        assert r.ask(q) is not None
        return r.pipeline.repeat(q, 153, ("127.0.0.1", 5555))

    assert r.pipeline.repeat(q, 153, ("127.0.0.1", 5555)) is None  # nothing answered yet
    assert fresh() is not None  # the positive twin of each case below
    r.clock.now += 1  # one more whole second of age: the TTLs change
    assert r.pipeline.repeat(q, 153, ("127.0.0.1", 5555)) is None
    assert fresh() is not None
    r.pipeline.ref.generation += 1  # a reload
    assert r.pipeline.repeat(q, 153, ("127.0.0.1", 5555)) is None
    assert fresh() is not None
    r.pipeline.cache.clear()  # an address change, or a set re-created
    assert r.pipeline.repeat(q, 153, ("127.0.0.1", 5555)) is None
    assert fresh() is not None
    r.clock.now += 3000  # past the grant window: the ledger must be asked again
    assert r.pipeline.repeat(q, 153, ("127.0.0.1", 5555)) is None
    skips = r.stats.grant_skips
    assert fresh() is not None and r.stats.grant_skips == skips + 1


def test_tcp_answers_are_never_repeats() -> None:
    r = rig()
    r.resolver.add("www.example.com", "A", (("www.example.com.", 3600, "A", "192.0.2.10"),))
    q = wire("www.example.com")

    async def over_tcp() -> bytes | None:
        return await r.pipeline.handle(q, 153, "tcp:127.0.0.1:5555", udp=False)

    assert asyncio.run(over_tcp()) is not None
    assert r.pipeline.repeat(q, 153, ("127.0.0.1", 5555)) is None
    assert r.ask(q) is not None  # positive twin: the same query over UDP
    assert r.pipeline.repeat(q, 153, ("127.0.0.1", 5555)) is not None


def test_a_repeated_blocked_name_is_answered_recorded_and_counted_as_the_first() -> None:
    r = rig()
    first = r.ask(wire("ads.example.com", qid=1), client="udp:127.0.0.1:1111")
    assert first is not None and first.rcode() == dns.rcode.NXDOMAIN
    again = r.pipeline.repeat(wire("ads.example.com", qid=2), 153, ("127.0.0.1", 2222))
    assert again is not None and dns.message.from_wire(again).id == 2
    assert again[2:] == first.to_wire()[2:]
    one, two = r.events
    assert isinstance(one, QueryBlocked) and isinstance(two, QueryBlocked)
    assert two == dataclasses.replace(one, client="udp:127.0.0.1:2222")
    assert (r.stats.queries, r.stats.blocked) == (2, 2)
    assert r.resolver.calls == []
    # A reload may have allowed it: not a repeat any more, decided again.
    r.pipeline.ref.generation += 1
    assert r.pipeline.repeat(wire("ads.example.com"), 153, ("127.0.0.1", 2222)) is None


def test_a_blocked_repeat_over_the_log_budget_is_counted_not_recorded() -> None:
    from egressd.blocklog import BlockLog

    r = rig()
    made: list[Event] = []
    log = BlockLog(made.append, rate=0.0, burst=2.0, clock=r.clock)
    p = Pipeline(r.pipeline.ref, r.resolver, r.firewall, r.ledger, Cache(10), log, r.stats, r.clock)

    async def first() -> bytes | None:
        return await p.handle(wire("ads.example.com"), 153, "udp:127.0.0.1:1")

    assert asyncio.run(first()) is not None  # the full path: 1 token of 2 spent
    q = wire("ads.example.com", qid=7)
    assert p.repeat(q, 153, ("127.0.0.1", 2)) is not None  # the second token
    for _ in range(5):
        assert p.repeat(q, 153, ("127.0.0.1", 3)) is not None  # answered, not recorded
    assert [e.client for e in made if isinstance(e, QueryBlocked)] == [
        "udp:127.0.0.1:1",
        "udp:127.0.0.1:2",
    ]
    assert log.unlogged == 5 and r.stats.blocked == 7
    log.flush()
    assert "agent:QueryBlocked=5" in str(made[-1])


# --- audit mode and per-profile counts -----------------------------------------------------------


def audit_rig() -> Rig:
    r = rig()
    policy = r.pipeline.ref.policy
    agent = dataclasses.replace(policy.by_name["agent"].profile, mode="audit")
    profiles = (agent, policy.by_name["build"].profile)
    r.pipeline.ref.policy = Policy(dataclasses.replace(policy.config, profiles=profiles))
    return r


def test_audit_mode_answers_and_grants_what_enforcing_mode_blocks_and_records_it() -> None:
    r = audit_rig()
    r.resolver.add("www.example.org", "A", (("www.example.org.", 300, "A", "192.0.2.30"),))
    reply = r.ask(wire("www.example.org", qid=7))
    assert reply is not None and reply.rcode() == dns.rcode.NOERROR
    assert addresses(reply) == ["192.0.2.30"]
    assert [w.ip for w in r.firewall.calls[0]] == ["192.0.2.30"]
    assert r.log == ["resolve", "allow", "reply"]  # granted before the reply, as allowed names
    (ev,) = r.events
    assert isinstance(ev, QueryAudited)
    assert (ev.profile, ev.qname, ev.qtype, ev.verdict, ev.rule, ev.needed) == (
        "agent",
        "www.example.org",
        "A",
        "block",
        "",
        "www.example.org",
    )
    # Each query is recorded (no repeat shortcut), like a blocked one in enforcing mode.
    assert r.pipeline.repeat(wire("www.example.org"), 153, ("127.0.0.1", 5555)) is None
    r.ask(wire("www.example.org"))
    assert [type(e) for e in r.events] == [QueryAudited, QueryAudited]
    assert r.stats.of("agent").audited == 2 and r.stats.of("agent").answered == 2
    # The ledger's reason survives a reconcile while the profile audits ...
    (reason,) = r.ledger._reasons["agent"].values()
    assert r.pipeline.judge(reason) == [Write("egressd-agent-v4", 4, "192.0.2.30", 0)]
    # ... and is revoked once it enforces (the positive twin of the line above).
    r.pipeline.ref.policy = make_policy()
    assert r.pipeline.judge(reason) is None


def test_audit_mode_records_a_deny_with_its_rule_and_nothing_to_add() -> None:
    r = audit_rig()
    r.resolver.add("ads.example.com", "A", (("ads.example.com.", 300, "A", "192.0.2.31"),))
    reply = r.ask(wire("ads.example.com"))
    assert reply is not None and addresses(reply) == ["192.0.2.31"]
    (ev,) = r.events
    assert isinstance(ev, QueryAudited)
    assert (ev.verdict, ev.rule, ev.needed) == ("deny", f"{AGENT_LIST}:3", "")


def test_audit_mode_is_per_profile() -> None:
    r = audit_rig()
    reply = r.ask(wire("www.example.org"), port=154)  # build enforces
    assert reply is not None and reply.rcode() == dns.rcode.NXDOMAIN
    assert r.resolver.calls == []
    (ev,) = r.events
    assert isinstance(ev, QueryBlocked) and ev.profile == "build"


def test_counts_per_profile_include_repeats() -> None:
    r = rig()
    r.resolver.add("www.example.com", "A", (("www.example.com.", 3600, "A", "192.0.2.10"),))
    r.ask(wire("www.example.com"))
    assert r.pipeline.repeat(wire("www.example.com"), 153, ("127.0.0.1", 1)) is not None
    r.ask(wire("www.example.org"))
    assert r.pipeline.repeat(wire("www.example.org"), 153, ("127.0.0.1", 1)) is not None
    r.ask(wire("www.tracker.example"), port=154)
    r.resolver.error = UpstreamError("timed out")
    r.ask(wire("new.example.com"), port=154)
    agent, build = r.stats.of("agent"), r.stats.of("build")
    assert (agent.answered, agent.blocked, agent.servfail) == (2, 2, 0)
    assert (build.answered, build.blocked, build.servfail) == (0, 1, 1)
