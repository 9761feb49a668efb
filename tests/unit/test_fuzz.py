"""Fuzzing the message path: wire bytes -> Pipeline.handle -> the reply the listener sends.

Two targets, both with recording fakes for the resolver and the firewall: arbitrary bytes
(and valid queries with bytes flipped), and structured messages built with dnspython
(random flags, opcodes, classes, sections, EDNS options, names with odd labels) answered
by a fake upstream that sends random rcodes, CNAME chains, private addresses and junk.

Whatever comes in, these hold:
- no exception escapes handle(), and the reply renders the way the listener renders it
  (UDP within the client's size limit, and TCP), parses back, and carries the query's id;
- a name the allowlist denies never reaches the resolver (an oracle written here, apart
  from egressd's matcher);
- no address reaches the firewall that the fake upstream did not return, nor a private or
  loopback one (the rebinding guard); every address in a reply was granted first.

CI runs a few hundred derandomized examples (seconds). For a long run with fresh random
examples: EGRESSD_FUZZ_EXAMPLES=200000 .venv/bin/python -m pytest -q tests/unit/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.allowlist import parse_lines
from egressd.cache import Cache
from egressd.config import Config, DaemonSettings, GrantSettings, Profile, Upstream
from egressd.errors import FirewallError, UpstreamError
from egressd.events import Event
from egressd.ledger import Ledger
from egressd.pipeline import Pipeline, PolicyRef
from egressd.policy import Policy
from egressd.stats import Stats

_LONG = "EGRESSD_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=int(os.environ.get("EGRESSD_FUZZ_EXAMPLES", "300")),
    deadline=None,  # a shared 2-core machine: slowness is not what is tested here
    derandomize=not _LONG,  # CI: the same examples every run; a long run: fresh ones
    database=None,  # nothing written into the work tree; a failure prints its example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

AGENT_PORT, BUILD_PORT, NO_PROFILE_PORT = 153, 154, 155
AGENT_RULES = "**.example.com\n!ads.example.com\n!**.tracker.example.com\n"
BUILD_RULES = "**.example.net\n"


def make_policy() -> Policy:
    def profile(name: str, uid: int, port: int, rules: str) -> Profile:
        path = f"/etc/egressd/allowlist.d/{name}.txt"
        return Profile(name=name, uids=(uid,), port=port, rules=tuple(parse_lines(rules, path)))

    return Policy(
        Config(
            path="/etc/egressd/egressd.toml",
            daemon=DaemonSettings(upstreams=(Upstream("192.0.2.53"),)),
            grants=GrantSettings(floor=300, ceiling=86400, grace=60, maxelem=65536),
            profiles=(
                profile("agent", 1000, AGENT_PORT, AGENT_RULES),
                profile("build", 1001, BUILD_PORT, BUILD_RULES),
            ),
        )
    )


def allowed(port: int, name: dns.name.Name) -> bool:
    """The oracle: AGENT_RULES and BUILD_RULES by hand (ASCII case-insensitive)."""
    labels = tuple(label.lower() for label in name.labels if label)
    if port == AGENT_PORT:
        return (
            labels[-2:] == (b"example", b"com")
            and labels != (b"ads", b"example", b"com")
            and labels[-3:] != (b"tracker", b"example", b"com")
        )
    if port == BUILD_PORT:
        return labels[-2:] == (b"example", b"net")
    return False


def denied_target(port: int, name: dns.name.Name) -> bool:
    """A CNAME target the profile's deny lines name (chains are checked against those)."""
    labels = tuple(label.lower() for label in name.labels if label)
    return port == AGENT_PORT and (
        labels == (b"ads", b"example", b"com") or labels[-3:] == (b"tracker", b"example", b"com")
    )


NEVER_GRANTED = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
]


# --- fakes -------------------------------------------------------------------------------------


@dataclass
class FakeUpstream:
    """Answers each question with whatever the example draws; remembers what it sent."""

    data: st.DataObject
    asked: list[tuple[int, dns.name.Name]] = field(default_factory=list)
    returned: set[str] = field(default_factory=set)
    # Addresses of answers whose CNAME chain runs through a denied name: never granted.
    tainted: set[str] = field(default_factory=set)
    port: int = 0

    async def resolve(self, labels: tuple[bytes, ...], qtype: int, rd: bool) -> bytes:
        qname = dns.name.Name((*labels, b""))
        self.asked.append((self.port, qname))
        await asyncio.sleep(0)
        if self.data.draw(st.integers(0, 9), label="upstream fails") == 0:
            raise UpstreamError("all upstreams timed out")
        r = dns.message.make_response(dns.message.make_query(qname, dns.rdatatype.A, id=1))
        r.set_rcode(self.data.draw(st.sampled_from(UPSTREAM_RCODES), label="rcode"))
        owner = qname
        targets = self.data.draw(st.lists(NAMES, max_size=3), label="cnames")
        for target in targets:
            add(r.answer, owner, "CNAME", target.to_text())
            owner = target
        tainted = any(denied_target(self.port, t) for t in targets)
        for section, records in (
            (r.answer, st.lists(ADDRESS_RECORDS, min_size=1, max_size=4)),
            (r.answer, st.lists(RECORDS, max_size=2)),
            (r.authority, st.lists(RECORDS, max_size=2)),
            (r.additional, st.lists(RECORDS, max_size=2)),
        ):
            for rtype, rdata in self.data.draw(records, label="records"):
                on_chain = self.data.draw(st.integers(0, 3), label="on the chain") > 0
                add(section, owner if on_chain else JUNK_OWNER, rtype, rdata)
                if rtype in ("A", "AAAA"):
                    ip = str(ipaddress.ip_address(rdata))
                    (self.tainted if tainted else self.returned).add(ip)
        return r.to_wire()


def add(section: list[dns.rrset.RRset], owner: dns.name.Name, rtype: str, rdata: str) -> None:
    rr = dns.rrset.from_text(owner, 300, "IN", rtype, rdata)
    for existing in section:
        if existing.name == rr.name and existing.rdtype == rr.rdtype:
            existing.union_update(rr)
            return
    section.append(rr)


@dataclass
class FakeFirewall:
    data: st.DataObject
    granted: set[str] = field(default_factory=set)

    async def allow(self, writes: Sequence[object]) -> None:
        await asyncio.sleep(0)
        if self.data.draw(st.integers(0, 19), label="ipset add fails") == 0:
            raise FirewallError("ipset add failed: set is full (maxelem)")
        # Normalised: the pipeline may spell an address differently from ipaddress.
        self.granted.update(str(ipaddress.ip_address(getattr(w, "ip"))) for w in writes)  # noqa: B009


# --- strategies --------------------------------------------------------------------------------

UPSTREAM_RCODES = [dns.rcode.NOERROR] * 5 + [
    dns.rcode.NXDOMAIN,
    dns.rcode.SERVFAIL,
    dns.rcode.REFUSED,
]
JUNK_OWNER = dns.name.from_text("ns.evil.example.org")

WORDS = st.sampled_from(
    [b"www", b"ads", b"tracker", b"example", b"com", b"net", b"cdn", b"a", b"EXAMPLE", b"Com"]
)
ODD_LABEL = st.binary(min_size=1, max_size=63)  # dots, NULs, high bytes, spaces
LABELS = st.lists(st.one_of(WORDS, WORDS, ODD_LABEL), min_size=0, max_size=6)


def _name(labels: list[bytes]) -> dns.name.Name | None:
    try:
        return dns.name.Name([*labels, b""])
    except dns.exception.DNSException:  # over 255 octets
        return None


SUFFIXES = st.sampled_from(
    [
        [b"example", b"com"],
        [b"example", b"com"],
        [b"example", b"com"],
        [b"ads", b"example", b"com"],
        [b"tracker", b"example", b"com"],
        [b"example", b"net"],
        [b"example", b"org"],
        [],
    ]
)
NAMES = st.builds(lambda a, b: _name(a + b), LABELS, SUFFIXES).filter(lambda n: n is not None)

ADDRESS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.sampled_from(["127.0.0.1", "10.0.0.5", "169.254.169.254", "::1", "fe80::1", "192.0.2.10"]),
)
ADDRESS_RECORDS = ADDRESS.map(lambda ip: ("AAAA" if ":" in ip else "A", ip))
RECORDS = st.one_of(
    ADDRESS_RECORDS,
    st.sampled_from(
        [
            ("TXT", '"v=spf1 -all"'),
            ("MX", "10 mail.example.com."),
            ("NS", "ns1.example.net."),
            ("SOA", "ns.example.com. host.example.com. 1 7200 900 1209600 86400"),
        ]
    ),
)

RDTYPES = st.one_of(
    st.sampled_from(["A", "AAAA", "CNAME", "TXT", "MX", "ANY", "AXFR", "IXFR", "SOA", "PTR"]).map(
        dns.rdatatype.from_text
    ),
    st.integers(0, 65535).map(dns.rdatatype.RdataType.make),
)
PLAIN_RDTYPES = st.sampled_from(["A", "A", "AAAA", "CNAME", "TXT"]).map(dns.rdatatype.from_text)
RDCLASSES = st.one_of(
    st.sampled_from([dns.rdataclass.IN] * 4 + [dns.rdataclass.CH, dns.rdataclass.ANY]),
    st.integers(0, 65535).map(dns.rdataclass.RdataClass.make),
)
EDNS_OPTIONS = st.lists(
    st.one_of(
        st.builds(
            lambda ip, bits: dns.edns.ECSOption(ip, bits),
            st.sampled_from(["203.0.113.0", "2001:db8::"]),
            st.integers(0, 24),
        ),
        st.builds(lambda t: dns.edns.EDEOption(dns.edns.EDECode.OTHER, t), st.text(max_size=20)),
        st.builds(
            lambda code, data: dns.edns.GenericOption(code, data),
            st.integers(0, 65535),
            st.binary(max_size=40),
        ),
    ),
    max_size=3,
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A query (mostly): random flags, opcode, question count, sections and EDNS."""
    # Most messages are plain queries, so that the upstream, grant and reply paths are
    # reached often; the rest vary the header and sections freely.
    plain = draw(st.integers(0, 9)) < 6
    qname = draw(NAMES)
    q = dns.message.make_query(
        qname,
        draw(PLAIN_RDTYPES if plain else RDTYPES),
        rdclass=dns.rdataclass.IN if plain else draw(RDCLASSES),
        id=draw(st.integers(0, 65535)),
    )
    q.flags = draw(st.integers(0, 0xFFFF)) & ~0x7800  # the opcode bits are set below
    if not plain and draw(st.integers(0, 4)) == 0:
        q.flags |= dns.flags.QR
    else:
        q.flags &= ~dns.flags.QR
    if not plain:
        q.set_opcode(draw(st.sampled_from([dns.opcode.QUERY] * 3 + list(dns.opcode.Opcode))))
        for _ in range(draw(st.sampled_from([0] * 4 + [1, 2]))):  # extra questions
            q.question.append(dns.rrset.RRset(draw(NAMES), dns.rdataclass.IN, draw(RDTYPES)))
        if draw(st.integers(0, 5)) == 0:
            q.question = []
        for section in (q.answer, q.authority):
            for rtype, rdata in draw(st.lists(RECORDS, max_size=2)):
                add(section, draw(NAMES), rtype, rdata)
    if draw(st.booleans()):
        q.use_edns(
            draw(st.sampled_from([0, 0, 0, 1])),
            ednsflags=draw(st.integers(0, 0xFFFF)),
            payload=draw(st.integers(0, 65535)),
            options=draw(EDNS_OPTIONS),
        )
    else:
        q.use_edns(False)
    # dnspython shuffles each rdataset's records with the global `random` as it renders;
    # put its state back, so that an example stays a function of what was drawn.
    state = random.getstate()
    try:
        return q.to_wire()
    except (dns.exception.DNSException, ValueError):
        return b"\x00"  # a message dnspython itself will not render: still some input
    finally:
        random.setstate(state)


@st.composite
def flipped(draw: st.DrawFn) -> bytes:
    """A valid query with a few bytes changed, cut short, or with junk appended."""
    wire = bytearray(draw(messages()))
    for _ in range(draw(st.integers(1, 4))):
        if wire:
            wire[draw(st.integers(0, len(wire) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        wire = wire[: draw(st.integers(0, len(wire)))]
    return bytes(wire) + draw(st.binary(max_size=8))


# --- the property ------------------------------------------------------------------------------


def run_messages(data: st.DataObject, wires: list[tuple[int, bytes]]) -> None:
    upstream = FakeUpstream(data)
    firewall = FakeFirewall(data)
    events: list[Event] = []
    stats = Stats()
    now = [1000.0]
    pipeline = Pipeline(
        PolicyRef(make_policy()),
        upstream,
        firewall,
        Ledger(),
        Cache(16),
        events.append,
        stats,
        lambda: now[0],
    )

    async def one(port: int, wire: bytes) -> None:
        upstream.port = port
        udp = data.draw(st.booleans(), label="over UDP")
        rendered = await pipeline.handle(wire, port, "udp:127.0.0.1:5353", udp=udp)
        if rendered is None:
            return
        # Only a message dnspython reads as a query is ever answered.
        query = dns.message.from_wire(wire)
        assert not query.flags & dns.flags.QR
        reply = dns.message.from_wire(rendered)
        assert reply.id == query.id and reply.flags & dns.flags.QR
        limit = (512 if query.edns < 0 else max(512, min(query.payload, 1232))) if udp else 65535
        assert len(rendered) <= limit
        # Allow before reply: every address the agent is told was granted first.
        for rrset in reply.answer:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                for rd in rrset:
                    assert str(ipaddress.ip_address(rd.address)) in firewall.granted

    async def all_of_them() -> None:
        for port, wire in wires:
            await one(port, wire)
            now[0] += data.draw(st.sampled_from([0, 1, 100, 400]), label="time passes")

    asyncio.run(all_of_them())

    for port, qname in upstream.asked:
        assert allowed(port, qname), f"{qname} (denied on port {port}) reached the resolver"
    # Only what the upstream returned, and nothing reached through a denied CNAME target
    # (unless another, clean answer of this example also returned it).
    assert firewall.granted <= upstream.returned
    for ip in firewall.granted:
        addr = ipaddress.ip_address(ip)
        assert not any(addr in net for net in NEVER_GRANTED), f"{ip} was granted"
    assert stats.internal_errors == 0, [e for e in events if type(e).__name__ == "Error"]


PORTS = st.sampled_from([AGENT_PORT, AGENT_PORT, BUILD_PORT, NO_PROFILE_PORT])


@FUZZ
@given(data=st.data(), wires=st.lists(st.tuples(PORTS, messages()), min_size=1, max_size=3))
def test_fuzz_structured_messages(data: st.DataObject, wires: list[tuple[int, bytes]]) -> None:
    run_messages(data, wires)


@FUZZ
@given(
    data=st.data(),
    wires=st.lists(
        st.tuples(PORTS, st.one_of(st.binary(max_size=600), flipped())), min_size=1, max_size=3
    ),
)
def test_fuzz_arbitrary_bytes(data: st.DataObject, wires: list[tuple[int, bytes]]) -> None:
    run_messages(data, wires)
