"""Replies to the agent (egressd.replies)."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from egressd import replies


def query(
    name: str = "WwW.Example.COM",
    rdtype: str = "A",
    edns: int = -1,
    payload: int = 1232,
    qid: int = 4242,
) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload)
    q.id = qid
    # what the listener hands the pipeline: the parsed wire form
    return dns.message.from_wire(q.to_wire())


def ede(m: dns.message.Message) -> list[dns.edns.EDEOption]:
    return [o for o in m.options if isinstance(o, dns.edns.EDEOption)]


def roundtrip(m: dns.message.Message) -> dns.message.Message:
    return dns.message.from_wire(replies.to_wire(m))


def assert_echoes(reply: dns.message.Message, q: dns.message.Message) -> None:
    assert reply.id == q.id
    assert reply.flags & dns.flags.QR
    assert len(reply.question) == 1
    assert reply.question[0].name.to_text() == q.question[0].name.to_text()  # case kept
    assert reply.question[0].rdtype == q.question[0].rdtype


# --- blocked -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.REFUSED])
def test_blocked_with_edns_carries_ede_15(rcode: dns.rcode.Rcode) -> None:
    q = query(edns=0, payload=4096)
    r = roundtrip(replies.blocked(q, rcode))
    assert r.rcode() == rcode
    assert_echoes(r, q)
    assert r.question[0].name.to_text() == "WwW.Example.COM."
    assert r.edns == 0
    (opt,) = ede(r)
    assert opt.code == dns.edns.EDECode.BLOCKED == 15
    assert opt.text == replies.BLOCKED_TEXT
    assert r.payload == replies.OUR_PAYLOAD
    assert r.answer == [] and r.authority == [] and r.additional == []


def test_blocked_without_edns_has_no_opt_at_all() -> None:
    q = query(edns=-1)
    r = replies.blocked(q, dns.rcode.NXDOMAIN)
    assert r.edns == -1 and r.opt is None and r.options == ()
    wire = replies.to_wire(r)
    parsed = dns.message.from_wire(wire)
    assert parsed.edns == -1
    assert parsed.rcode() == dns.rcode.NXDOMAIN
    assert_echoes(parsed, q)
    # no OPT record in the additional section of the wire message (ARCOUNT 0)
    assert wire[10:12] == b"\x00\x00"


def test_blocked_does_not_echo_client_options() -> None:
    q = dns.message.make_query(
        "a.example",
        "A",
        use_edns=0,
        options=[dns.edns.ECSOption("192.0.2.0", 24), dns.edns.CookieOption(b"c" * 8, b"")],
    )
    q = dns.message.from_wire(q.to_wire())
    r = roundtrip(replies.blocked(q, dns.rcode.NXDOMAIN))
    assert [o.otype for o in r.options] == [dns.edns.OptionType.EDE]


def test_flags() -> None:
    q = query()
    r = replies.blocked(q, dns.rcode.NXDOMAIN)
    assert r.flags & dns.flags.RA
    assert r.flags & dns.flags.RD  # copied from the query
    q.flags &= ~dns.flags.RD
    assert not replies.blocked(q, dns.rcode.NXDOMAIN).flags & dns.flags.RD
    assert not r.flags & dns.flags.AA
    assert not r.flags & dns.flags.TC


# --- servfail / refused ------------------------------------------------------------------------


def test_servfail() -> None:
    q = query(edns=0)
    r = roundtrip(replies.servfail(q, "upstream failed"))
    assert r.rcode() == dns.rcode.SERVFAIL
    assert_echoes(r, q)
    (opt,) = ede(r)
    assert opt.code == dns.edns.EDECode.OTHER
    assert opt.text == "egressd: upstream failed"
    assert r.answer == []


def test_refused() -> None:
    q = query(edns=0)
    r = roundtrip(replies.refused(q, "class CH not supported"))
    assert r.rcode() == dns.rcode.REFUSED
    assert_echoes(r, q)
    (opt,) = ede(r)
    assert opt.code == dns.edns.EDECode.NOT_SUPPORTED
    assert "class CH" in (opt.text or "")


@pytest.mark.parametrize("make", [replies.servfail, replies.refused])
def test_errors_without_edns_have_no_opt(make: object) -> None:
    r = make(query(edns=-1), "x")  # type: ignore[operator]
    assert r.edns == -1 and r.options == ()


# --- answer ------------------------------------------------------------------------------------


def test_answer_keeps_only_soa_in_authority() -> None:
    q = query(name="nx.example", edns=0)
    soa = dns.rrset.from_text("example.", 60, "IN", "SOA", "ns. host. 1 2 3 4 5")
    ns = dns.rrset.from_text("example.", 60, "IN", "NS", "ns.example.")
    a = dns.rrset.from_text("nx.example.", 60, "IN", "A", "192.0.2.1")
    r = roundtrip(replies.answer(q, dns.rcode.NOERROR, [a], [soa, ns]))
    assert r.rcode() == dns.rcode.NOERROR
    assert [rr.rdtype for rr in r.answer] == [dns.rdatatype.A]
    assert [rr.rdtype for rr in r.authority] == [dns.rdatatype.SOA]
    assert r.additional == []
    assert ede(r) == []


def test_answer_nxdomain() -> None:
    q = query(name="nx.example")
    r = roundtrip(replies.answer(q, dns.rcode.NXDOMAIN, [], []))
    assert r.rcode() == dns.rcode.NXDOMAIN and r.answer == []


# --- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edns", "payload", "limit"),
    [
        (-1, 0, 512),
        (0, 100, 512),
        (0, 512, 512),
        (0, 1000, 1000),
        (0, 1232, 1232),
        (0, 4096, 1232),
        (0, 65535, 1232),
    ],
)
def test_udp_limit(edns: int, payload: int, limit: int) -> None:
    q = query(edns=edns, payload=payload)
    for r in (
        replies.blocked(q, dns.rcode.NXDOMAIN),
        replies.answer(q, 0, [], []),
        replies.servfail(q, "x"),
    ):
        assert replies.udp_limit(r) == limit


def big_answer(q: dns.message.Message, n: int = 100) -> dns.message.Message:
    rr = dns.rrset.from_text(
        q.question[0].name, 300, "IN", "A", *[f"10.0.{i // 256}.{i % 256}" for i in range(n)]
    )
    soa = dns.rrset.from_text("example.", 60, "IN", "SOA", "ns. host. 1 2 3 4 5")
    return replies.answer(q, dns.rcode.NOERROR, [rr], [soa])


@pytest.mark.parametrize("edns", [-1, 0])
def test_to_wire_truncates_when_too_big(edns: int) -> None:
    q = query(name="big.example", edns=edns, payload=1232)
    r = big_answer(q)
    limit = replies.udp_limit(r)
    wire = replies.to_wire(r, limit)
    assert len(wire) <= limit
    parsed = dns.message.from_wire(wire)
    assert parsed.flags & dns.flags.TC
    assert parsed.answer == [] and parsed.authority == [] and parsed.additional == []
    assert_echoes(parsed, q)
    assert parsed.edns == edns  # EDNS presence kept, so the client learns our size


def test_to_wire_keeps_what_fits() -> None:
    q = query(name="big.example", edns=0, payload=4096)
    r = big_answer(q, n=10)
    parsed = dns.message.from_wire(replies.to_wire(r, replies.udp_limit(r)))
    assert not parsed.flags & dns.flags.TC
    assert len(parsed.answer[0]) == 10


def test_to_wire_default_is_the_tcp_limit() -> None:
    q = query(name="big.example", edns=-1)
    r = big_answer(q, n=100)  # > 512 bytes, far below 65535
    parsed = dns.message.from_wire(replies.to_wire(r))
    assert not parsed.flags & dns.flags.TC
    assert len(parsed.answer[0]) == 100
