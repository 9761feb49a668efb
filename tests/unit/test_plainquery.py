"""The cheap blocked path's reader and writer: the same reply as the full path, or None."""

from __future__ import annotations

import itertools
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest

from egressd import replies
from egressd.allowlist import labels_of
from egressd.plainquery import blocked_reply, parse

NAMES = ["x.example", "Foo.Example.COM", "a-b_c.d9.test", "a" * 63 + ".test", "single"]
TYPES = ["A", "AAAA", "HTTPS", "TXT", "ANY", "TYPE65280"]
SHAPES = [
    {},
    {"use_edns": 0, "payload": 1232},
    {"use_edns": 0, "payload": 512, "want_dnssec": True},
    {"use_edns": 0, "payload": 65535},
]


@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.REFUSED])
def test_plain_queries_get_the_full_paths_reply_byte_for_byte(rcode: int) -> None:
    checked = 0
    for name, qtype, shape, rd, cd in itertools.product(
        NAMES, TYPES, SHAPES, (True, False), (True, False)
    ):
        query = dns.message.make_query(name, qtype, **shape)  # type: ignore[arg-type]
        if not rd:
            query.flags &= ~dns.flags.RD
        if cd:
            query.flags |= dns.flags.CD
        wire = query.to_wire()
        q = parse(wire)
        assert q is not None, (name, qtype, shape)
        assert q.labels == labels_of(query.question[0].name)
        assert q.qname == query.question[0].name.to_text(omit_final_dot=True)
        assert q.qtype == query.question[0].rdtype
        full = replies.blocked(dns.message.from_wire(wire), rcode).to_wire()
        assert blocked_reply(q, rcode) == full, (name, qtype, shape, rd, cd)
        checked += 1
    assert checked == len(NAMES) * len(TYPES) * len(SHAPES) * 4


def raw(qd: int = 1, an: int = 0, flags: int = 0x0100, body: bytes = b"") -> bytes:
    return struct.pack("!HHHHHH", 7, flags, qd, an, 0, 0) + body


QUESTION = b"\x01x\x07example\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"", id="empty"),
        pytest.param(raw(body=QUESTION)[:-1], id="truncated"),
        pytest.param(raw(body=QUESTION + b"\x00"), id="trailing byte"),
        pytest.param(raw(qd=2, body=QUESTION + QUESTION), id="two questions"),
        pytest.param(raw(qd=0), id="no question"),
        pytest.param(raw(an=1, body=QUESTION), id="answer count"),
        pytest.param(raw(flags=0x8100, body=QUESTION), id="a response"),
        pytest.param(raw(flags=0x2800, body=QUESTION), id="opcode UPDATE"),
        pytest.param(raw(body=b"\x01x\xc0\x0c\x00\x01\x00\x01"), id="compression pointer"),
        pytest.param(raw(body=b"\x03a.b\x00\x00\x01\x00\x01"), id="a dot in a label"),
        pytest.param(raw(body=b"\x02\xc3\xa9\x00\x00\x01\x00\x01"), id="non-ascii"),
        pytest.param(raw(body=b"\x00\x00\x01\x00\x01"), id="the root"),
        pytest.param(raw(body=b"\x01x\x00\x00\x01\x00\x03"), id="class CH"),
        pytest.param(raw(body=b"\x01x\x00\x00\xfc\x00\x01"), id="AXFR"),
        pytest.param(raw(body=b"\x01x\x00\x00\xfb\x00\x01"), id="IXFR"),
    ],
)
def test_anything_but_the_plain_shape_is_left_to_the_full_path(wire: bytes) -> None:
    assert parse(wire) is None


def test_edns_other_than_a_bare_version_0_opt_is_left_to_the_full_path() -> None:
    def with_opt(opt: bytes) -> bytes:
        return struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 1) + QUESTION + opt

    bare = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    assert parse(with_opt(bare)) is not None  # positive twin: the bare OPT is plain
    cookie = dns.message.make_query("x.example", "A", use_edns=0, options=[])
    cookie.use_edns(0, options=[dns.edns.GenericOption(10, b"12345678")])
    assert parse(cookie.to_wire()) is None  # an option (a cookie)
    assert parse(with_opt(b"\x00" + struct.pack("!HHIH", 41, 1232, 0x00010000, 0))) is None
    assert parse(with_opt(b"\x00" + struct.pack("!HHIH", 1, 1, 0, 0))) is None  # not OPT
    assert parse(with_opt(b"\x01x" + bare[1:])) is None  # owner not the root
    assert parse(with_opt(bare + b"\x00")) is None  # trailing byte
