"""A plain query read without dnspython, and its blocked reply written without it (pure).

The cheap blocked path: parsing a query and rendering its reply with dnspython is about
60% of what a blocked query costs (measured with py-spy, see docs/design.md "Listener
defences"), and a flood of blocked names is all blocked queries. Only the common, plain
shape is read here: one IN question of letters, digits, '-' and '_', no compression, no
answer or authority records, at most a bare EDNS0 OPT record (no options). Anything else
(None) takes the full path, which handles every case; so this never has to. The reply is
byte for byte what ``replies.blocked`` renders (a unit test holds them to that).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .replies import BLOCKED_TEXT, OUR_PAYLOAD

_HEADER = struct.Struct("!HHHHHH")
_OPT_FIXED = struct.Struct("!HHIH")  # type, class (= payload), ttl (= ext rcode, flags), rdlen
_EDE_BLOCKED = 15  # RFC 8914 info code "Blocked"
_OPTION_EDE = 15
_QR, _OPCODE, _RD, _RA = 0x8000, 0x7800, 0x0100, 0x0080
_TYPE_OPT, _CLASS_IN = 41, 1
_ZONE_TRANSFERS = (251, 252)  # IXFR, AXFR: refused on the full path
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_EDE = struct.pack("!HHH", _OPTION_EDE, 2 + len(BLOCKED_TEXT), _EDE_BLOCKED) + BLOCKED_TEXT.encode()


@dataclass(frozen=True, slots=True)
class PlainQuery:
    wire: bytes
    qid: int
    rd: bool
    labels: tuple[bytes, ...]  # lower-cased, leftmost first (allowlist.Labels)
    qname: str  # as the client spelled it, without the final dot
    qtype: int
    question_end: int  # the question's bytes are wire[12:question_end]
    edns: bool


def parse(wire: bytes) -> PlainQuery | None:
    """The query, if it has the plain shape; None: leave it to the full path."""
    if len(wire) < 17:
        return None
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(wire)
    if flags & (_QR | _OPCODE) or qd != 1 or an or ns or ar > 1:
        return None
    off = 12
    labels: list[bytes] = []
    while True:
        n = wire[off]
        off += 1
        if n == 0:
            break
        if n > 63 or off + n > len(wire):  # a compression pointer (>= 0xC0) or truncated
            return None
        label = wire[off : off + n]
        if not _PLAIN.issuperset(label):
            return None  # escapes in the name's text: leave it to dnspython
        labels.append(label)
        off += n
    if not labels or off - 12 > 255 or off + 4 > len(wire):
        return None
    qtype, qclass = struct.unpack_from("!HH", wire, off)
    off += 4
    if qclass != _CLASS_IN or qtype in _ZONE_TRANSFERS or qtype == _TYPE_OPT:
        return None
    question_end = off
    if ar:
        # Exactly one bare OPT: root owner, version 0, no options, nothing after it.
        if wire[off : off + 1] != b"\0" or len(wire) != off + 1 + _OPT_FIXED.size:
            return None
        rtype, _payload, ttl, rdlen = _OPT_FIXED.unpack_from(wire, off + 1)
        if rtype != _TYPE_OPT or ttl & 0xFFFF0000 or rdlen:  # ext rcode, version 0
            return None
    elif off != len(wire):
        return None  # trailing bytes: the full path drops such a message
    text = b".".join(labels).decode("ascii")
    return PlainQuery(
        wire=wire,
        qid=qid,
        rd=bool(flags & _RD),
        labels=tuple(label.lower() for label in labels),
        qname=text,
        qtype=qtype,
        question_end=question_end,
        edns=bool(ar),
    )


def blocked_reply(q: PlainQuery, rcode: int) -> bytes:
    """NXDOMAIN (or REFUSED) with EDE 15 "Blocked" for an EDNS client: replies.blocked."""
    flags = _QR | _RA | (_RD if q.rd else 0) | (rcode & 0xF)
    head = _HEADER.pack(q.qid, flags, 1, 0, 0, 1 if q.edns else 0)
    out = head + q.wire[12 : q.question_end]
    if q.edns:
        out += b"\0" + _OPT_FIXED.pack(_TYPE_OPT, OUR_PAYLOAD, 0, len(_EDE)) + _EDE
    return out
