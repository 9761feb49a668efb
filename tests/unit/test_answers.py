"""What an upstream answer grants (egressd.answers)."""

from __future__ import annotations

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from egressd import dnswire
from egressd.allowlist import Labels, labels_of
from egressd.answers import MAX_CHAIN, Address, extract


def response(qname: str, qtype: str, *records: tuple[str, int, str, str]) -> dnswire.Response:
    """An upstream response to (qname, qtype) whose answer section holds ``records``
    (name, ttl, type, rdata), one rrset per record (same name+type are merged), as
    egressd reads it off the wire."""
    return dnswire.parse_response(message(qname, qtype, *records).to_wire())


def message(qname: str, qtype: str, *records: tuple[str, int, str, str]) -> dns.message.Message:
    q = dns.message.make_query(qname, qtype)
    r = dns.message.make_response(q)
    for name, ttl, rtype, rdata in records:
        rrset = dns.rrset.from_text(name, ttl, "IN", rtype, rdata)
        existing = r.find_rrset(r.answer, rrset.name, rrset.rdclass, rrset.rdtype, create=True)
        existing.update_ttl(ttl)
        existing.union_update(rrset)
    return r


def name(text: str) -> Labels:
    return labels_of(dns.name.from_text(text))


def test_plain_addresses() -> None:
    r = response(
        "www.example.com",
        "A",
        ("www.example.com.", 300, "A", "192.0.2.1"),
        ("www.example.com.", 300, "A", "192.0.2.2"),
    )
    ans = extract(r)
    assert ans.chain == (name("www.example.com"),)
    assert sorted(a.ip for a in ans.addresses) == ["192.0.2.1", "192.0.2.2"]
    assert all(a == Address(a.ip, 4, 300) for a in ans.addresses)
    assert len(ans.records) == 2
    assert ans.min_ttl == 300


def test_cname_chain_collects_only_addresses_on_the_chain() -> None:
    r = response(
        "www.example.com",
        "A",
        ("www.example.com.", 3600, "CNAME", "a.cdn.example.net."),
        ("a.cdn.example.net.", 600, "CNAME", "b.edge.example.org."),
        ("b.edge.example.org.", 60, "A", "192.0.2.10"),
        ("b.edge.example.org.", 120, "AAAA", "2001:db8::10"),
        # not on the chain: must be dropped
        ("unrelated.example.", 300, "A", "198.51.100.66"),
        ("a.cdn.example.net.evil.", 300, "A", "198.51.100.67"),
        ("c.other.example.", 300, "CNAME", "b.edge.example.org."),
    )
    ans = extract(r)
    assert ans.chain == (
        name("www.example.com"),
        name("a.cdn.example.net"),
        name("b.edge.example.org"),
    )
    assert ans.addresses == (
        Address("192.0.2.10", 4, 60),
        Address("2001:db8::10", 6, 120),
    )
    kept = [(r.owner, dns.rdatatype.to_text(r.rtype)) for r in ans.records]
    assert kept == [
        (name("www.example.com"), "CNAME"),
        (name("a.cdn.example.net"), "CNAME"),
        (name("b.edge.example.org"), "A"),
        (name("b.edge.example.org"), "AAAA"),
    ]
    assert ans.min_ttl == 60


def test_unrelated_addresses_only() -> None:
    r = response("www.example.com", "A", ("evil.example.", 300, "A", "198.51.100.1"))
    ans = extract(r)
    assert ans.addresses == () and ans.records == ()
    assert ans.min_ttl is None
    assert ans.chain == (name("www.example.com"),)


def test_empty_answer() -> None:
    ans = extract(response("nx.example", "A"))
    assert ans.addresses == () and ans.records == () and ans.min_ttl is None


def test_case_insensitive_names() -> None:
    r = response(
        "WwW.Example.COM",
        "A",
        ("www.EXAMPLE.com.", 300, "CNAME", "A.Cdn.Example.NET."),
        ("a.cdn.example.net.", 300, "A", "192.0.2.1"),
    )
    ans = extract(r)
    assert [a.ip for a in ans.addresses] == ["192.0.2.1"]
    assert len(ans.chain) == 2 and ans.chain[1] == name("a.cdn.example.net")


def test_cname_loop_terminates() -> None:
    r = response(
        "a.example",
        "A",
        ("a.example.", 300, "CNAME", "b.example."),
        ("b.example.", 300, "CNAME", "c.example."),
        ("c.example.", 300, "CNAME", "A.example."),
        ("c.example.", 300, "A", "192.0.2.3"),
    )
    ans = extract(r)
    assert ans.chain == (name("a.example"), name("b.example"), name("c.example"))
    assert [a.ip for a in ans.addresses] == ["192.0.2.3"]
    assert len(ans.records) == 4  # each record once


def test_self_cname_terminates() -> None:
    r = response("a.example", "A", ("a.example.", 300, "CNAME", "a.example."))
    ans = extract(r)
    assert ans.chain == (name("a.example"),)
    assert len(ans.records) == 1


def test_long_chain_is_cut() -> None:
    hops = MAX_CHAIN + 5
    records = [(f"n{i}.example.", 300, "CNAME", f"n{i + 1}.example.") for i in range(hops)]
    records.append((f"n{hops}.example.", 300, "A", "192.0.2.99"))
    ans = extract(response("n0.example", "A", *records))
    assert len(ans.chain) == MAX_CHAIN + 1  # the name and MAX_CHAIN targets
    assert ans.chain[-1] == name(f"n{MAX_CHAIN}.example")
    assert ans.addresses == ()  # the address at the end was never reached
    # every kept rrset is on the followed part of the chain
    assert {r.owner for r in ans.records} <= set(ans.chain)


def test_chain_of_exactly_max_chain_hops_is_followed() -> None:
    records = [(f"n{i}.example.", 300, "CNAME", f"n{i + 1}.example.") for i in range(MAX_CHAIN)]
    records.append((f"n{MAX_CHAIN}.example.", 300, "A", "192.0.2.99"))
    ans = extract(response("n0.example", "A", *records))
    assert [a.ip for a in ans.addresses] == ["192.0.2.99"]
    assert len(ans.chain) == MAX_CHAIN + 1


def test_other_classes_are_ignored() -> None:
    m = message("a.example", "A", ("a.example.", 300, "A", "192.0.2.1"))
    m.answer.append(dns.rrset.from_text("a.example.", 300, "CH", "A", "a.example. 1"))
    ans = extract(dnswire.parse_response(m.to_wire()))
    assert [a.ip for a in ans.addresses] == ["192.0.2.1"]
    assert all(r.rclass == dns.rdataclass.IN for r in ans.records)


def test_other_types_on_the_chain_are_kept_but_grant_nothing() -> None:
    r = response("a.example", "TXT", ("a.example.", 30, "TXT", '"hello"'))
    ans = extract(r)
    assert ans.addresses == ()
    assert len(ans.records) == 1 and ans.min_ttl == 30


def test_min_ttl_over_the_chain() -> None:
    r = response(
        "a.example",
        "A",
        ("a.example.", 20, "CNAME", "b.example."),
        ("b.example.", 500, "A", "192.0.2.1"),
        ("zzz.example.", 1, "A", "192.0.2.2"),  # off chain: does not count
    )
    assert extract(r).min_ttl == 20


def test_cname_target_without_records() -> None:
    r = response("a.example", "A", ("a.example.", 300, "CNAME", "gone.example."))
    ans = extract(r)
    assert ans.chain == (name("a.example"), name("gone.example"))
    assert ans.addresses == ()
