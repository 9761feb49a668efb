"""dnswire against dnspython as the oracle: the same queries read, the same replies written,
the same records read from compressed answers; malformed input is a WireError, never a hang."""

from __future__ import annotations

import itertools
import random
import struct
import timeit
import types
from collections.abc import Iterable
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.ipv6
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd import replies
from egressd.allowlist import labels_of
from egressd.dnswire import (
    Query,
    Record,
    WireError,
    name_text,
    parse_query,
    parse_response,
    record_wire,
    reply,
    udp_limit,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,  # a shared 2-core machine; a hang would still show as a stuck test
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAMES = [
    "x.example",
    "Foo.Example.COM",
    "a-b_c.d9.test",
    "single",
    r"a\ b.example",  # a space inside a label
    r"a\.b.Example",  # a dot inside a label
    r"\000\255.x.test",  # bytes 0 and 255
    r"*.wild.test",
    "\\195\\169t\\195\\169.example",  # UTF-8 bytes, as an IDN label would not be sent
    "a" * 63 + ".test",
    ".".join(["b" * 63] * 3 + ["c" * 61]),  # 255 bytes in wire form: the longest name
]
TYPES = ["A", "AAAA", "HTTPS", "TXT", "ANY", "PTR", "TYPE65280"]
ECS = dns.edns.ECSOption("192.0.2.0", 24)
COOKIE = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, bytes(range(8)))
NSID = dns.edns.GenericOption(dns.edns.OptionType.NSID, b"")
SHAPES: list[dict[str, object]] = [
    {},
    {"use_edns": 0, "payload": 1232},
    {"use_edns": 0, "payload": 4096, "want_dnssec": True},
    {"use_edns": 0, "payload": 100},  # below 512: counts as 512
    {"use_edns": 0, "payload": 65535},
    {"use_edns": 0, "payload": 1232, "options": [ECS]},
    {"use_edns": 0, "payload": 1400, "options": [COOKIE, NSID, ECS]},
]


def queries() -> Iterable[tuple[bytes, dns.message.Message]]:
    """Every name x type x EDNS shape x RD x CD, as wire and as dnspython reads it."""
    for i, (name, qtype, shape, rd, cd) in enumerate(
        itertools.product(NAMES, TYPES, SHAPES, (True, False), (True, False))
    ):
        query = dns.message.make_query(name, qtype, **shape)  # type: ignore[arg-type]
        query.id = i * 7919 % 65536
        if not rd:
            query.flags &= ~dns.flags.RD
        if cd:
            query.flags |= dns.flags.CD
        wire = query.to_wire()
        yield wire, dns.message.from_wire(wire)


QUERIES = list(queries())


def must_parse(wire: bytes) -> Query:
    q = parse_query(wire)
    assert q is not None, wire
    return q


def test_queries_read_as_dnspython_reads_them() -> None:
    count = 0
    for wire, msg in QUERIES:
        q = must_parse(wire)
        name = msg.question[0].name
        assert q.qid == msg.id
        assert q.flags == struct.unpack_from("!H", wire, 2)[0]
        assert q.labels == labels_of(name)
        assert q.raw == name.labels[:-1]
        assert q.qtype == msg.question[0].rdtype
        assert q.question == name.to_wire() + struct.pack("!HH", q.qtype, 1)
        assert q.edns == (msg.edns >= 0)
        assert q.payload == (max(512, msg.payload) if msg.edns >= 0 else 512)
        assert name_text(q.raw) == name.to_text(omit_final_dot=True)
        count += 1
    assert count == len(NAMES) * len(TYPES) * len(SHAPES) * 4


def test_udp_limit_is_the_replies_one() -> None:
    for wire, msg in QUERIES:
        response = dns.message.make_response(msg, our_payload=replies.OUR_PAYLOAD)
        assert udp_limit(must_parse(wire)) == replies.udp_limit(response)


def header(qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", 7, flags, qd, an, ns, ar)


QUESTION = b"\x01x\x07example\x00\x00\x01\x00\x01"
OPT = b"\x00\x00\x29\x04\xd0" + bytes(6)  # root, OPT, 1232, ext-rcode, version, flags, rdlength


def opt(rdata: bytes = b"", ttl: bytes = b"\x00\x00\x00\x00") -> bytes:
    return OPT[:5] + ttl + struct.pack("!H", len(rdata)) + rdata


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"", id="empty"),
        pytest.param(header() + QUESTION[:-1], id="truncated"),
        pytest.param(header() + QUESTION + b"\x00", id="trailing byte"),
        pytest.param(header(qd=2) + QUESTION + QUESTION, id="two questions"),
        pytest.param(header(qd=0) + QUESTION, id="no question"),
        pytest.param(header(an=1) + QUESTION, id="answer count"),
        pytest.param(header(ns=1) + QUESTION, id="authority count"),
        pytest.param(header(flags=0x8100) + QUESTION, id="a response"),
        pytest.param(header(flags=0x2800) + QUESTION, id="opcode UPDATE"),
        pytest.param(header() + b"\x01x\xc0\x0c\x00\x01\x00\x01", id="compression pointer"),
        pytest.param(header() + b"\x01x\x40" + b"\x00" * 8, id="extended label type"),
        pytest.param(header() + b"\x00\x00\x01\x00\x01", id="the root"),
        pytest.param(header() + b"\x01x\x00\x00\x01\x00\x03", id="class CH"),
        pytest.param(header() + b"\x01x\x00\x00\xfc\x00\x01", id="AXFR"),
        pytest.param(header() + b"\x01x\x00\x00\xfb\x00\x01", id="IXFR"),
        pytest.param(header() + b"\x01x\x00\x00\x29\x00\x01", id="qtype OPT"),
        pytest.param(
            header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", id="name > 255"
        ),
        pytest.param(header(ar=1) + QUESTION, id="OPT counted, missing"),
        pytest.param(header(ar=1) + QUESTION + OPT[:-1], id="OPT cut off"),
        pytest.param(header(ar=1) + QUESTION + OPT + b"\x00", id="trailing after OPT"),
        pytest.param(header(ar=2) + QUESTION + OPT + OPT, id="two OPTs"),
        pytest.param(header(ar=1) + QUESTION + b"\x01a" + OPT, id="OPT owner not root"),
        pytest.param(
            header(ar=1) + QUESTION + b"\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00",
            id="additional A",
        ),
        pytest.param(header(ar=1) + QUESTION + opt(ttl=b"\x00\x01\x00\x00"), id="EDNS v1"),
        pytest.param(header(ar=1) + QUESTION + opt(ttl=b"\x01\x00\x00\x00"), id="ext-rcode"),
        pytest.param(
            header(ar=1) + QUESTION + opt(b"\x00\x0a\x00\x09" + b"c" * 8), id="option overruns"
        ),
        pytest.param(header(ar=1) + QUESTION + opt(b"\x00\x0a\x00"), id="option header cut"),
        pytest.param(header(ar=1) + QUESTION + opt(b"\x00\x0c\x00\x02\x00\x00"), id="PADDING"),
    ],
)
def test_other_shapes_are_left_to_dnspython(wire: bytes) -> None:
    assert parse_query(wire) is None


def test_a_bare_opt_and_any_options_are_the_common_shape() -> None:
    assert must_parse(header(ar=1) + QUESTION + OPT).edns
    options = b"\x00\x03\x00\x00" + b"\xfd\xe9\x00\x02ab"  # NSID, a local option
    q = must_parse(header(ar=1) + QUESTION + opt(options, ttl=b"\x00\x00\x80\x00"))  # DO
    assert (q.edns, q.payload, q.labels) == (True, 1232, (b"x", b"example"))


# ---- replies: byte for byte what replies.py renders through dnspython


REASONS = ["zone transfers are not offered", "upstream timed out", "caf\u00e9"]  # UTF-8 too


def test_blocked_refused_servfail_replies_are_the_replies_ones() -> None:
    for wire, msg in QUERIES[::3]:  # every name, type, shape and flag still comes up
        q = must_parse(wire)
        for rcode in (dns.rcode.NXDOMAIN, dns.rcode.REFUSED):
            want = replies.to_wire(replies.blocked(dns.message.from_wire(wire), rcode))
            assert reply(q, rcode, ede=(15, replies.BLOCKED_TEXT)) == want
        for text in REASONS:
            want = replies.to_wire(replies.servfail(dns.message.from_wire(wire), text))
            assert reply(q, dns.rcode.SERVFAIL, ede=(0, f"egressd: {text}")) == want
            want = replies.to_wire(replies.refused(dns.message.from_wire(wire), text))
            assert reply(q, dns.rcode.REFUSED, ede=(21, f"egressd: {text}")) == want
        want = replies.to_wire(replies.answer(msg, dns.rcode.NXDOMAIN, [], []))
        assert reply(q, dns.rcode.NXDOMAIN) == want


def a_rrset(name: dns.name.Name, n: int, ttl: int = 300) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, ttl, "IN", "A", *(f"192.0.2.{i + 1}" for i in range(n)))


def upstream_records(msg: dns.message.Message) -> tuple[Record, ...]:
    return parse_response(msg.to_wire(max_size=65535)).answer


@pytest.fixture
def no_shuffle(monkeypatch: pytest.MonkeyPatch) -> None:
    # dnspython shuffles the records of an rrset each time it renders one; dnswire keeps
    # the upstream's order. Rendered in order, the bytes can be compared.
    monkeypatch.setattr(dns.rdataset, "random", types.SimpleNamespace(shuffle=lambda _: None))


@pytest.mark.parametrize("count", [1, 2, 20, 40, 80])
@pytest.mark.parametrize("limit", [512, 1232, 65535])
@pytest.mark.usefixtures("no_shuffle")
def test_address_answers_are_the_replies_ones_and_truncate_alike(count: int, limit: int) -> None:
    # Owners equal to the question: both write 0xC00C, so the bytes are the same, and
    # so is the size at which a reply is cut to an empty one with TC.
    for wire, msg in itertools.islice(QUERIES, 0, None, 13):
        qname = msg.question[0].name
        upstream = dns.message.make_response(msg)
        upstream.answer.append(a_rrset(qname, count))
        q = must_parse(wire)
        answer = b"".join(record_wire(r, 77, q.labels) for r in upstream_records(upstream))
        want = replies.to_wire(
            replies.answer(msg, 0, [a_rrset(qname, count, ttl=77)], []), max_size=limit
        )
        assert reply(q, 0, answer, count, max_size=limit) == want


def oracle_equal(ours: bytes, want: bytes) -> None:
    a, b = dns.message.from_wire(ours), dns.message.from_wire(want)
    assert (a.id, a.flags, a.ednsflags, a.payload, a.options) == (
        b.id,
        b.flags,
        b.ednsflags,
        b.payload,
        b.options,
    )
    assert (a.question, a.answer, a.authority, a.additional) == (
        b.question,
        b.answer,
        b.authority,
        b.additional,
    )
    for x, y in zip(a.answer + a.authority, b.answer + b.authority, strict=True):
        assert (x.name.labels, x.ttl) == (y.name.labels, y.ttl)  # the case too


def test_chains_and_negative_answers_say_what_the_replies_ones_say() -> None:
    # dnspython compresses more (suffixes, names in rdata), so these are compared parsed.
    for wire, msg in itertools.islice(QUERIES, 0, None, 11):
        qname = msg.question[0].name
        upstream = dns.message.make_response(msg)
        cdn = dns.name.from_text("Edge.CDN.example.net")
        upstream.answer.append(dns.rrset.from_text(qname, 60, "IN", "CNAME", "cdn.example.net."))
        upstream.answer.append(
            dns.rrset.from_text("CDN.example.net.", 60, "IN", "CNAME", cdn.to_text())
        )
        upstream.answer.append(a_rrset(cdn, 3))
        soa = "ns.example.net. host\\.master.example.net. 1 2 3 4 5"
        upstream.authority.append(dns.rrset.from_text("example.NET.", 30, "IN", "SOA", soa))
        upstream_wire = upstream.to_wire(max_size=65535)
        parsed = parse_response(upstream_wire)
        upstream = dns.message.from_wire(upstream_wire)  # names as the pipeline sees them
        q = must_parse(wire)
        answer = b"".join(record_wire(r, r.ttl, q.labels) for r in parsed.answer)
        authority = b"".join(record_wire(r, r.ttl, q.labels) for r in parsed.authority)
        for rcode in (0, 3):
            want = replies.to_wire(
                replies.answer(msg, rcode, upstream.answer, upstream.authority), max_size=65535
            )
            got = reply(q, rcode, answer, 5, authority, 1)
            oracle_equal(got, want)
            negative = replies.to_wire(replies.answer(msg, rcode, [], upstream.authority))
            oracle_equal(reply(q, rcode, authority=authority, nscount=1), negative)


# ---- upstream answers: compressed everywhere, read as dnspython reads them


def _name_wire(name: dns.name.Name, out: bytearray, table: dict[dns.name.Name, int]) -> None:
    """Write ``name`` with compression against every suffix written so far (any field)."""
    labels = name.labels
    for i in range(len(labels) - 1):
        suffix = dns.name.Name(labels[i:])
        if suffix in table:
            out += struct.pack("!H", 0xC000 | table[suffix])
            return
        if len(out) < 0x3FFF:
            table[suffix] = len(out)
        out += bytes([len(labels[i])]) + labels[i]
    out += b"\x00"


def _cstr(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def _rdata_wire(rd: Any, out: bytearray, table: dict[dns.name.Name, int]) -> None:
    t, d = rd.rdtype, dns.rdatatype
    # DNAME and KX stay uncompressed: dnspython refuses to decompress them (dnswire does).
    if t in (d.CNAME, d.NS, d.PTR):
        _name_wire(rd.target, out, table)
    elif t == d.SOA:
        _name_wire(rd.mname, out, table)
        _name_wire(rd.rname, out, table)
        out += struct.pack("!IIIII", rd.serial, rd.refresh, rd.retry, rd.expire, rd.minimum)
    elif t in (d.MX, d.RT, d.AFSDB):
        out += struct.pack("!H", rd.preference)
        _name_wire(rd.exchange, out, table)
    elif t == d.SRV:
        out += struct.pack("!HHH", rd.priority, rd.weight, rd.port)
        _name_wire(rd.target, out, table)
    elif t == d.NAPTR:
        out += struct.pack("!HH", rd.order, rd.preference)
        out += _cstr(rd.flags) + _cstr(rd.service) + _cstr(rd.regexp)
        _name_wire(rd.replacement, out, table)
    elif t == d.RP:
        _name_wire(rd.mbox, out, table)
        _name_wire(rd.txt, out, table)
    elif t == d.PX:
        out += struct.pack("!H", rd.preference)
        _name_wire(rd.map822, out, table)
        _name_wire(rd.mapx400, out, table)
    else:
        out += rd.to_wire()


def compressed(msg: dns.message.Message) -> bytes:
    """The message with every name compressed, in rdata too (dnspython leaves SRV etc.)."""
    sections = (msg.question, msg.answer, msg.authority, msg.additional)
    out = bytearray(struct.pack("!HH", msg.id, msg.flags) + bytes(8))
    counts = [len(msg.question), 0, 0, 0]
    table: dict[dns.name.Name, int] = {}
    for rrset in msg.question:
        _name_wire(rrset.name, out, table)
        out += struct.pack("!HH", rrset.rdtype, rrset.rdclass)
    for i, section in enumerate(sections[1:], 1):
        for rrset in section:
            for rd in rrset:
                _name_wire(rrset.name, out, table)
                out += struct.pack("!HHI", rrset.rdtype, rrset.rdclass, rrset.ttl)
                at = len(out)
                out += b"\x00\x00"
                _rdata_wire(rd, out, table)
                out[at : at + 2] = struct.pack("!H", len(out) - at - 2)
                counts[i] += 1
    out[4:12] = struct.pack("!HHHH", *counts)
    return bytes(out)


RECORDS = [
    ("{q}", "CNAME", ["Alias.Example.org."]),
    ("alias.example.ORG.", "CNAME", ["edge.cdn.example.org."]),
    ("Edge.cdn.example.org.", "A", ["192.0.2.1", "198.51.100.7"]),
    ("edge.cdn.example.org.", "AAAA", ["2001:db8::1", "::ffff:192.0.2.9", "::1.2.3.4"]),
    ("{q}", "TXT", ['"v=spf1 -all" "x"', '""']),
    ("{q}", "MX", ["10 mail.example.org.", "20 {q}"]),
    ("_sip._tcp.example.org.", "SRV", ["1 2 5060 sip.Example.org.", "0 0 0 ."]),
    ("example.org.", "NAPTR", ['100 10 "S" "SIP+D2U" "" _sip._udp.example.org.']),
    ("example.org.", "NS", ["ns1.example.org.", "ns2.EXAMPLE.org."]),
    ("4.3.2.1.in-addr.arpa.", "PTR", ["host.example.org."]),
    ("d.example.org.", "DNAME", ["example.net."]),
    ("example.org.", "RP", ["admin.example.org. txt.example.org."]),
    ("example.org.", "AFSDB", ["1 afs.example.org."]),
    ("example.org.", "RT", ["2 relay.example.org."]),
    ("example.org.", "KX", ["3 kx.example.org."]),
    ("example.org.", "PX", ["4 map.example.org. x400.example.org."]),
    ("example.org.", "HINFO", ['"cpu" "os"']),
    ("example.org.", "CAA", ['0 issue "ca.example.net"']),
    (r"odd\.label\ x.example.org.", "CNAME", [r"t\.x.\000.example.org."]),
]


def upstream_message(
    qname: str, compress: bool, additional: bool = True
) -> tuple[bytes, dns.message.Message]:
    query = dns.message.make_query(qname, "A")
    msg = dns.message.make_response(query)
    msg.set_rcode(dns.rcode.NXDOMAIN if "nx" in qname else dns.rcode.NOERROR)
    for owner, rtype, texts in RECORDS:
        name = owner.replace("{q}", qname + ".")
        msg.answer.append(
            dns.rrset.from_text(
                name, 3600, "IN", rtype, *(t.replace("{q}", qname + ".") for t in texts)
            )
        )
    soa = "ns1.example.org. hostmaster.example.org. 2024 7200 900 1209600 300"
    msg.authority.append(dns.rrset.from_text("Example.org.", 300, "IN", "SOA", soa))
    if additional:
        glue = dns.rrset.from_text("ns1.example.org.", 300, "IN", "A", "192.0.2.53")
        msg.additional.append(glue)
    return (compressed(msg) if compress else msg.to_wire()), msg


def flat(section: list[dns.rrset.RRset]) -> list[tuple[dns.rrset.RRset, dns.rdata.Rdata]]:
    return [(rrset, rd) for rrset in section for rd in rrset]


@pytest.mark.parametrize("compress", [True, False], ids=["compressed everywhere", "dnspython"])
@pytest.mark.parametrize("qname", ["WWW.Example.org", "www.example.org", "nx.example.org"])
def test_records_read_as_dnspython_reads_them(qname: str, compress: bool) -> None:
    wire, _ = upstream_message(qname, compress)
    oracle = dns.message.from_wire(wire)
    got = parse_response(wire)
    assert (got.qid, got.flags, got.rcode) == (oracle.id, oracle.flags, oracle.rcode())
    assert (got.labels, got.qtype) == (labels_of(oracle.question[0].name), 1)
    for records, section in ((got.answer, oracle.answer), (got.authority, oracle.authority)):
        pairs = flat(section)
        assert len(records) == len(pairs)
        for r, (rrset, rd) in zip(records, pairs, strict=True):
            assert r.owner == labels_of(rrset.name)
            assert r.owner_wire == rrset.name.to_wire()
            assert (r.rtype, r.rclass, r.ttl) == (rrset.rdtype, rrset.rdclass, rrset.ttl)
            assert r.rdata == rd.to_wire(), (rrset.name, rd)
            if r.rtype in (dns.rdatatype.CNAME, dns.rdatatype.DNAME):
                assert r.target == labels_of(rd.target)  # type: ignore[attr-defined]
            if r.rtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                assert r.address == rd.address  # type: ignore[attr-defined]
    assert len(got.answer) == sum(len(texts) for _, _, texts in RECORDS)
    if compress:  # the test's encoder did compress names inside SRV, NAPTR, RP...
        assert len(wire) < len(dns.message.from_wire(wire).to_wire())


ANS = 12 + len(QUESTION)  # where the first answer record starts in ``response``


def ptr(offset: int) -> bytes:
    return struct.pack("!H", 0xC000 | offset)


def response(body: bytes, an: int = 1, ns: int = 0, qd: int = 1) -> bytes:
    return struct.pack("!HHHHHH", 7, 0x8180, qd, an, ns, 0) + QUESTION + body


A_RDATA = b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x01"  # A, IN, 60, 192.0.2.1


def test_minfo_and_mb_names_are_expanded_too() -> None:
    # dnspython treats these RFC 1035 types as opaque, so the expected rdata is written here.
    owner = ptr(12) + struct.pack("!HHIH", 14, 1, 60, 2 + 4)  # MINFO at offset ANS
    minfo = b"\x01r" + ptr(14) + ptr(12)  # r.example. (the question's suffix), x.example.
    mb = ptr(ANS) + struct.pack("!HHIH", 7, 1, 60, 2) + ptr(ANS + 12)  # MB: r.example.
    got = parse_response(response(owner + minfo + mb, an=2)).answer
    assert got[0].rdata == b"\x01r\x07example\x00" + QUESTION[:-4]
    assert (got[1].owner, got[1].rdata) == ((b"x", b"example"), b"\x01r\x07example\x00")


def test_dname_and_kx_names_are_expanded_though_dnspython_refuses_them() -> None:
    # RFC 6672 and RFC 2230 say senders must not compress these; one that does anyway
    # gets its names expanded rather than a pointer copied into a reply.
    dname = ptr(12) + struct.pack("!HHIH", 39, 1, 60, 4) + b"\x01d" + ptr(14)
    kx = ptr(12) + struct.pack("!HHIH", 36, 1, 60, 4) + b"\x00\x07" + ptr(12)
    got = parse_response(response(dname + kx, an=2)).answer
    assert got[0].rdata == b"\x01d\x07example\x00"
    assert got[0].target == (b"d", b"example")
    assert got[1].rdata == b"\x00\x07" + QUESTION[:-4]


def test_target_and_address_only_where_they_exist() -> None:
    mx = Record((b"x",), b"\x01x\x00", 15, 1, 0, b"\x00\x01\x00")
    with pytest.raises(ValueError):
        _ = mx.target
    with pytest.raises(ValueError):
        _ = mx.address


def test_aaaa_addresses_are_written_as_dnspython_writes_them() -> None:
    rng = random.Random(7)
    samples = [bytes(16), bytes(15) + b"\x01", bytes(10) + b"\xff\xff" + bytes(4)]
    for _ in range(3000):
        # Few distinct 16-bit groups, so zero runs of every length and place come up.
        samples.append(
            b"".join(
                rng.choice([b"\x00\x00", b"\x00\x01", b"\xff\xff", b"\x12\x00"]) for _ in range(8)
            )
        )
        samples.append(rng.randbytes(16))
    for rdata in samples:
        assert Record((), b"\x00", 28, 1, 0, rdata).address == dns.ipv6.inet_ntoa(rdata)


def test_record_wire_points_at_the_question_only_for_its_own_name() -> None:
    wire, _ = upstream_message("WWW.Example.org", compress=True)
    records = parse_response(wire).answer
    q = (b"www", b"example", b"org")
    assert (
        record_wire(records[0], 5, q)
        == b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 5, len(records[0].rdata)) + records[0].rdata
    )
    other = record_wire(records[1], 5, q)
    assert other.startswith(b"\x05Alias\x07Example\x03org\x00\x00\x05\x00\x01\x00\x00\x00\x05")


# ---- malformed answers: WireError, and nothing else


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"\x00" * 11, id="short header"),
        pytest.param(response(b"", an=0, qd=0), id="no question"),
        pytest.param(response(QUESTION, an=0, qd=2), id="two questions"),
        pytest.param(response(b"")[:-2], id="question cut off"),
        pytest.param(response(b""), id="counted answer missing"),
        pytest.param(response(b"\xc0\x0c" + A_RDATA[:-1]), id="rdlength past the end"),
        pytest.param(response(b"\xc0\x0c" + A_RDATA[:5]), id="record cut off"),
        pytest.param(response(b"\xc0"), id="pointer cut off"),
        pytest.param(response(ptr(ANS) + A_RDATA), id="pointer to itself"),
        pytest.param(response(b"\xc0\x40" + A_RDATA), id="forward pointer"),
        pytest.param(response(b"\xc0\x05" + A_RDATA), id="pointer into the header"),
        pytest.param(response(b"\x01a" + ptr(ANS) + A_RDATA), id="loop through a label"),
        pytest.param(response(b"\x40" + b"a" * 64 + b"\x00" + A_RDATA), id="label of 64"),
        pytest.param(response(b"\x80\x00" + A_RDATA), id="label type 0x80"),
        pytest.param(
            response(b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x0c\x00\x00"),
            id="CNAME rdata with bytes left over",
        ),
        pytest.param(
            response(b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x00\x3c\x00\x02\x01a\x00"),
            id="CNAME name runs past its rdata",
        ),
        pytest.param(
            response(b"\xc0\x0c\x00\x0f\x00\x01\x00\x00\x00\x3c\x00\x01\x00"), id="MX of 1 byte"
        ),
        pytest.param(
            response(b"\xc0\x0c\x00\x06\x00\x01\x00\x00\x00\x3c\x00\x06\x00\x00" + bytes(4)),
            id="SOA without its numbers",
        ),
        pytest.param(
            response(
                b"\xc0\x0c\x00\x23\x00\x01\x00\x00\x00\x3c\x00\x06" + b"\x00\x01\x00\x02\x05a"
            ),
            id="NAPTR string past its rdata",
        ),
        pytest.param(response(b"\xc0\x0c" + A_RDATA, an=1, ns=1), id="counted authority missing"),
        pytest.param(
            response(b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x05" + bytes(5)),
            id="A of 5 bytes",
        ),
        pytest.param(
            response(b"\xc0\x0c\x00\x1c\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes(4)),
            id="AAAA of 4 bytes",
        ),
    ],
)
def test_malformed_answers_are_wire_errors(wire: bytes) -> None:
    with pytest.raises(WireError):
        parse_response(wire)


def test_names_longer_than_255_bytes_are_refused_even_when_compressed() -> None:
    # Each owner is a 63-byte label in front of the previous owner, through a pointer:
    # the fourth is 4 * 64 bytes + the question's 11, over 255; the third is fine.
    body = bytearray()
    prev = 12
    for _ in range(4):
        at = ANS + len(body)
        body += b"\x3f" + b"a" * 63 + ptr(prev) + struct.pack("!HHIH", 16, 1, 60, 0)  # TXT
        prev = at
    with pytest.raises(WireError, match="longer than 255"):
        parse_response(response(bytes(body), an=4))
    assert len(parse_response(response(bytes(body), an=3)).answer[2].owner_wire) == 203


def chained(hops: int) -> bytes:
    """Two records: the first's rdata holds "a." and 3000 pointers, each to the one before;
    the second's owner points at pointer number ``hops``."""
    base = ANS + 2 + 10  # the first record's rdata
    chain = bytearray(b"\x01a\x00" + ptr(base))
    for i in range(1, 3000):
        chain += ptr(base + 3 + 2 * (i - 1))
    first = ptr(12) + struct.pack("!HHIH", 65280, 1, 60, len(chain)) + chain
    return response(first + ptr(base + 3 + 2 * hops) + A_RDATA, an=2)


def test_a_long_pointer_chain_ends_in_a_wire_error() -> None:
    with pytest.raises(WireError, match="pointers"):
        parse_response(chained(2999))
    assert parse_response(chained(10)).answer[1].owner == (b"a",)  # the positive twin


def test_every_truncation_of_an_answer_is_a_wire_error() -> None:
    wire, _ = upstream_message("www.example.org", compress=True, additional=False)
    assert parse_response(wire).authority  # the positive twin
    for cut in range(len(wire)):
        with pytest.raises(WireError):
            parse_response(wire[:cut])


def test_the_additional_section_is_not_read() -> None:
    wire, _ = upstream_message("www.example.org", compress=True)
    assert parse_response(wire + b"\xff" * 20).answer == parse_response(wire).answer


# ---- fuzz: random bytes and mutated valid messages


def _queries_pool() -> list[bytes]:
    return [wire for wire, _ in QUERIES[::37]]


QUERY_POOL = _queries_pool()
RESPONSE_POOL = [
    upstream_message(n, c)[0] for n in ("a.example.org", "NX.Example.org") for c in (True, False)
]


@st.composite
def mutated(draw: st.DrawFn, pool: list[bytes]) -> bytes:
    wire = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "cut", "pointer"]))
        at = draw(st.integers(0, max(len(wire) - 1, 0)))
        if kind == "set" and wire:
            wire[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            wire[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and wire:
            del wire[at]
        elif kind == "cut":
            del wire[at:]
        elif kind == "pointer" and len(wire) > at + 1:
            wire[at : at + 2] = struct.pack("!H", 0xC000 | draw(st.integers(0, len(wire) + 4)))
    return bytes(wire)


def check_query(wire: bytes) -> None:
    q = parse_query(wire)  # None or a Query; any exception fails the test
    if q is None:
        return
    try:
        msg = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        # The one leniency: EDNS options are not looked into (dnspython parses some).
        assert q.edns and len(wire) > 12 + len(q.question) + 11
        return
    assert (q.qid, q.labels, q.qtype) == (
        msg.id,
        labels_of(msg.question[0].name),
        msg.question[0].rdtype,
    )
    dns.message.from_wire(reply(q, 3, ede=(15, "x")))


def check_response(wire: bytes) -> None:
    try:
        got = parse_response(wire)
    except WireError:
        return
    for r in got.answer + got.authority:
        if r.rtype in (dns.rdatatype.CNAME, dns.rdatatype.DNAME):
            _ = r.target


@FUZZ
@given(st.binary(max_size=120))
def test_random_bytes_never_raise_anything_but_wire_error(wire: bytes) -> None:
    check_query(wire)
    check_response(wire)
    check_response(response(wire, an=3, ns=2))


@FUZZ
@given(mutated(QUERY_POOL))
def test_mutated_queries_are_read_or_left_alone(wire: bytes) -> None:
    check_query(wire)


@FUZZ
@given(mutated(RESPONSE_POOL))
def test_mutated_answers_are_read_or_refused(wire: bytes) -> None:
    check_response(wire)


# ---- speed (issue 7): generous bounds, about 10 times what a loaded 2-core machine needs


def per_call_us(fn: object, n: int = 2000) -> float:
    return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6  # type: ignore[arg-type]


def test_the_hot_functions_are_cheap() -> None:
    query = dns.message.make_query("www.Example.com", "A", use_edns=0, payload=1232)
    wire = query.to_wire()
    upstream = dns.message.make_response(query)
    upstream.answer.append(
        dns.rrset.from_text("www.example.com.", 60, "IN", "CNAME", "c.example.net.")
    )
    upstream.answer.append(a_rrset(dns.name.from_text("c.example.net."), 2))
    answer_wire = upstream.to_wire()
    q = must_parse(wire)
    assert per_call_us(lambda: parse_query(wire)) < 30
    assert per_call_us(lambda: reply(q, 3, ede=(15, replies.BLOCKED_TEXT))) < 20
    assert per_call_us(lambda: parse_response(answer_wire)) < 100
