"""The upstream query is rebuilt from the question alone (egressd.upstream).

UpstreamResolver is exercised with dns.asyncquery.udp_with_fallback replaced by a fake:
no sockets.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from egressd import upstream
from egressd.config import Upstream
from egressd.errors import UpstreamError
from egressd.upstream import OUR_PAYLOAD, UpstreamResolver, build_query


def client_query() -> dns.message.Message:
    """A client message carrying everything that must not be forwarded."""
    q = dns.message.make_query(
        "WwW.Example.COM",
        "AAAA",
        use_edns=0,
        payload=4096,
        want_dnssec=True,
        options=[
            dns.edns.ECSOption("203.0.113.0", 24),
            dns.edns.CookieOption(b"clientck", b""),
            dns.edns.GenericOption(65001, b"secret-client-data"),
        ],
    )
    q.id = 0x1234
    q.flags |= dns.flags.CD | dns.flags.AD
    q.additional.append(dns.rrset.from_text("leak.example.", 60, "IN", "TXT", '"secret"'))
    q.authority.append(dns.rrset.from_text("auth.example.", 60, "IN", "NS", "ns.leak.example."))
    return dns.message.from_wire(q.to_wire())


def rebuild(q: dns.message.Message) -> dns.message.Message:
    qn = q.question[0]
    return build_query(qn.name, qn.rdtype, bool(q.flags & dns.flags.RD))


def test_client_query_really_carries_the_extras() -> None:
    q = client_query()
    assert len(q.options) == 3 and q.additional and q.authority
    assert q.ednsflags & dns.flags.DO and q.flags & dns.flags.CD


def test_build_query_takes_only_the_question() -> None:
    client = client_query()
    out = dns.message.from_wire(rebuild(client).to_wire())
    assert len(out.question) == 1
    qn = out.question[0]
    assert qn.name == dns.name.from_text("www.example.com")
    assert qn.rdtype == dns.rdatatype.AAAA
    assert qn.rdclass == dns.rdataclass.IN
    assert out.answer == [] and out.authority == [] and out.additional == []
    assert out.edns == 0
    assert out.payload == OUR_PAYLOAD == 1232
    assert out.options == ()
    assert not out.ednsflags & dns.flags.DO
    assert out.flags & dns.flags.RD
    assert not out.flags & (dns.flags.CD | dns.flags.AD | dns.flags.QR)
    wire = rebuild(client).to_wire()
    for secret in (b"secret", b"clientck", b"leak", b"auth", b"\xcb\x00\x71"):
        assert secret not in wire


def test_build_query_copies_rd() -> None:
    name = dns.name.from_text("a.example")
    assert build_query(name, dns.rdatatype.A, True).flags & dns.flags.RD
    assert not build_query(name, dns.rdatatype.A, False).flags & dns.flags.RD


def test_build_query_new_random_id() -> None:
    client = client_query()
    ids = [rebuild(client).id for _ in range(64)]
    assert len(set(ids)) > 1  # random, not a constant
    assert ids.count(client.id) <= 1  # not the client's id


def test_build_query_keeps_name_case() -> None:
    # the name is passed on as asked (0x20 case randomisation by the client survives)
    q = build_query(dns.name.from_text("WwW.Example.COM"), dns.rdatatype.A, True)
    assert q.question[0].name.to_text() == "WwW.Example.COM."


# --- UpstreamResolver with a fake transport -----------------------------------------------------


class FakeTransport:
    """Stands in for dns.asyncquery.udp_with_fallback; scripted per server address."""

    def __init__(self, script: dict[str, list[object]]) -> None:
        self.script = script
        self.calls: list[tuple[str, int, dns.message.Message]] = []

    async def __call__(
        self, q: dns.message.Message, where: str, **kw: Any
    ) -> tuple[dns.message.Message, bool]:
        self.calls.append((where, kw["port"], q))
        outcome = self.script[where].pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, int)
        r = dns.message.make_response(q)
        r.set_rcode(dns.rcode.Rcode(outcome))
        return r, False


def resolve(res: UpstreamResolver, name: str = "a.example") -> dns.message.Message:
    return asyncio.run(res.resolve(dns.name.from_text(name), dns.rdatatype.A, True))


S1, S2 = Upstream("192.0.2.1"), Upstream("192.0.2.2", 5353)


def test_resolver_first_server_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTransport({"192.0.2.1": [dns.rcode.NOERROR]})
    monkeypatch.setattr(upstream.dns.asyncquery, "udp_with_fallback", fake)
    r = resolve(UpstreamResolver((S1, S2), timeout=1.0, tries=3))
    assert r.rcode() == dns.rcode.NOERROR
    assert [(w, p) for w, p, _ in fake.calls] == [("192.0.2.1", 53)]
    sent = fake.calls[0][2]
    assert sent.edns == 0 and sent.options == () and sent.payload == OUR_PAYLOAD


def test_resolver_fails_over_and_prefers_the_server_that_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeTransport(
        {
            "192.0.2.1": [dns.exception.Timeout(), dns.rcode.NOERROR],
            "192.0.2.2": [dns.rcode.NOERROR, dns.rcode.NOERROR],
        }
    )
    monkeypatch.setattr(upstream.dns.asyncquery, "udp_with_fallback", fake)
    res = UpstreamResolver((S1, S2), timeout=1.0, tries=3)
    assert resolve(res).rcode() == dns.rcode.NOERROR
    assert resolve(res).rcode() == dns.rcode.NOERROR
    assert [(w, p) for w, p, _ in fake.calls] == [
        ("192.0.2.1", 53),
        ("192.0.2.2", 5353),
        ("192.0.2.2", 5353),
    ]
    ids = [q.id for _, _, q in fake.calls]
    assert len(set(ids)) >= 2  # a fresh query (and id) per try


def test_resolver_servfail_counts_as_failed_try(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTransport(
        {
            "192.0.2.1": [dns.rcode.SERVFAIL],
            "192.0.2.2": [dns.rcode.NXDOMAIN],
        }
    )
    monkeypatch.setattr(upstream.dns.asyncquery, "udp_with_fallback", fake)
    assert resolve(UpstreamResolver((S1, S2), 1.0, 3)).rcode() == dns.rcode.NXDOMAIN


def test_resolver_returns_last_bad_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTransport(
        {
            "192.0.2.1": [dns.rcode.REFUSED, OSError("unreachable")],
            "192.0.2.2": [dns.rcode.SERVFAIL],
        }
    )
    monkeypatch.setattr(upstream.dns.asyncquery, "udp_with_fallback", fake)
    r = resolve(UpstreamResolver((S1, S2), 1.0, 3))
    assert r.rcode() == dns.rcode.SERVFAIL
    assert len(fake.calls) == 3


def test_resolver_raises_when_nobody_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTransport({"192.0.2.1": [dns.exception.Timeout(), EOFError(), OSError("x")]})
    monkeypatch.setattr(upstream.dns.asyncquery, "udp_with_fallback", fake)
    with pytest.raises(UpstreamError) as exc:
        resolve(UpstreamResolver((S1,), 1.0, 3))
    assert "192.0.2.1:53" in str(exc.value)
    assert len(fake.calls) == 3


def test_resolver_tries_every_server_at_least_once(monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = Upstream("192.0.2.3")
    fake = FakeTransport(
        {
            "192.0.2.1": [dns.exception.Timeout()],
            "192.0.2.2": [dns.exception.Timeout()],
            "192.0.2.3": [dns.rcode.NOERROR],
        }
    )
    monkeypatch.setattr(upstream.dns.asyncquery, "udp_with_fallback", fake)
    assert resolve(UpstreamResolver((S1, S2, s3), 1.0, tries=1)).rcode() == dns.rcode.NOERROR


def test_resolver_needs_servers() -> None:
    with pytest.raises(ValueError):
        UpstreamResolver((), 1.0, 1)
