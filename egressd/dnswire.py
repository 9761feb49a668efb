"""DNS messages as bytes: the client's query in, egressd's reply out, the upstream's answer read.

The hot path of every query (pure, no I/O). dnspython builds an object per name, rrset and
rdata and costs tens of microseconds per message; here a query is a header unpack and a
loop over its labels, a reply is a header and a few precomputed byte strings, and an
upstream answer is read into flat records whose rdata is ready to be copied into a reply.

Only the common query shape is read (``parse_query`` returns None for the rest, which the
caller leaves to dnspython). Replies are byte for byte what ``egressd.replies`` renders
through dnspython for the same inputs (the unit tests hold them to that).

Names in upstream answers may be compressed. Compression pointers are followed only
backward, each strictly before the start of the name (or name suffix) that holds it, the
rule dnspython applies too: so a chain of pointers always ends, and a hop limit bounds it
as well. Names inside rdata (the RFC 3597 section 4 types) are expanded, so a record's
rdata never refers to the upstream's message and can be placed into any reply.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from functools import lru_cache

import dns.ipv6
import dns.name

Labels = tuple[bytes, ...]  # egressd.allowlist.Labels: lower-cased, leftmost first

OUR_PAYLOAD = 1232  # the DNS flag day 2020 size: no IP fragmentation of UDP messages

_HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
_TYPE_CLASS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_OPTION = struct.Struct("!HH")  # EDNS option code, length

_QR, _TC, _RD, _RA = 0x8000, 0x0200, 0x0100, 0x0080
_QR_OPCODE = 0xF800  # QR and the four opcode bits: a query has them all clear (opcode QUERY)
_TYPE_OPT, _CLASS_IN = 41, 1
_REFUSED_QTYPES = frozenset((41, 251, 252))  # OPT, IXFR, AXFR: the full path's business
_OPTION_PADDING = 12  # RFC 7830: dnspython pads a reply to such a query (see parse_query)
_OPTION_EDE = 15  # RFC 8914
BLOCKED_TEXT = "blocked by egressd policy"  # the EDE text of a blocked name (RFC 8914)
_MAX_NAME = 255  # RFC 1035 2.3.4, in wire form including the root label
_MAX_HOPS = 64  # compression pointers followed for one name (no real name needs more)
_TYPE_A, _TYPE_AAAA, _TYPE_CNAME, _TYPE_DNAME = 1, 28, 5, 39

# The OPT record of every EDNS reply without EDE: root owner, payload, ext-rcode 0,
# version 0, no flags (dnspython's make_response does not echo DO), no options.
_OPT_PLAIN = b"\x00" + _RR_FIXED.pack(_TYPE_OPT, OUR_PAYLOAD, 0, 0)

# Where names sit inside the rdata of the types whose names may be compressed (RFC 3597
# section 4, plus RFC 1035's obsolete MD and MF): a fixed number of bytes, a name (N), a
# character string (S). The rdata must end right after the last item.
_N, _S = -1, -2
_RDATA_NAMES: dict[int, tuple[int, ...]] = {
    2: (_N,),  # NS
    3: (_N,),  # MD
    4: (_N,),  # MF
    5: (_N,),  # CNAME
    6: (_N, _N, 20),  # SOA: mname, rname, serial refresh retry expire minimum
    7: (_N,),  # MB
    8: (_N,),  # MG
    9: (_N,),  # MR
    12: (_N,),  # PTR
    14: (_N, _N),  # MINFO
    15: (2, _N),  # MX
    17: (_N, _N),  # RP
    18: (2, _N),  # AFSDB
    21: (2, _N),  # RT
    26: (2, _N, _N),  # PX
    33: (6, _N),  # SRV: priority, weight, port, target
    35: (4, _S, _S, _S, _N),  # NAPTR: order, preference, flags, services, regexp, name
    36: (2, _N),  # KX
    39: (_N,),  # DNAME
}


class WireError(ValueError):
    """A malformed DNS message (the text says what and where)."""


@dataclass(frozen=True, slots=True)
class Query:
    qid: int
    flags: int  # the client's 16-bit header flags word as sent
    labels: Labels  # lower-cased
    raw: tuple[bytes, ...]  # the labels as the client spelled them (case kept)
    qtype: int
    question: bytes  # the question section as sent: uncompressed name + type + class IN
    edns: bool  # the client sent an OPT record
    payload: int  # the client's UDP payload size (512 without EDNS; never below 512)


def parse_query(wire: bytes) -> Query | None:
    """The query if it has the common shape; None: leave it to dnspython.

    The shape: QR clear, opcode QUERY, one question of class IN (not AXFR, IXFR or OPT),
    its name uncompressed and not the root (any label bytes), no answer or authority
    records, at most one additional record which is an OPT (root owner, EDNS version 0,
    ext-rcode 0, well-formed options, which are ignored), no trailing bytes.

    A PADDING option (RFC 7830) is the one exception among options: dnspython pads some
    replies to such a query to 468 bytes, which ``reply`` does not do.
    """
    n = len(wire)
    if n < 17:  # a header, a one-byte label, the root, type and class
        return None
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(wire)
    if flags & _QR_OPCODE or qd != 1 or an or ns or ar > 1:
        return None
    last = n - 4  # the root label must come before this offset (type and class follow)
    off = 12
    raw: list[bytes] = []
    while True:
        if off >= last:
            return None  # truncated
        length = wire[off]
        if length == 0:
            break
        if length > 63:
            return None  # a compression pointer, or an extended label type
        start = off + 1
        off = start + length
        raw.append(wire[start:off])
    qend = off + 5
    if not raw or qend - 16 > _MAX_NAME:  # the root: rare for an agent, dnspython does it
        return None
    qtype, qclass = _TYPE_CLASS.unpack_from(wire, off + 1)
    if qclass != _CLASS_IN or qtype in _REFUSED_QTYPES:
        return None
    payload = 512
    if ar:
        # One OPT record: the root name, then type, class (= payload), ttl (= ext-rcode,
        # version, flags), rdlength; its options exactly fill the rdata, nothing follows.
        rdata = qend + 11
        if rdata > n or wire[qend] != 0:
            return None
        rtype, size, ttl, rdlength = _RR_FIXED.unpack_from(wire, qend + 1)
        if rtype != _TYPE_OPT or ttl & 0xFFFF0000 or rdata + rdlength != n:
            return None
        pos = rdata
        while pos < n:
            if pos + 4 > n:
                return None
            code, olen = _OPTION.unpack_from(wire, pos)
            if code == _OPTION_PADDING:
                return None
            pos += 4 + olen
        if pos != n:
            return None
        if size > 512:
            payload = size
    elif qend != n:
        return None  # trailing bytes: the full path drops such a message
    return Query(
        qid,
        flags,
        tuple(map(bytes.lower, raw)),
        tuple(raw),
        qtype,
        wire[12:qend],
        bool(ar),
        payload,
    )


def name_text(raw: tuple[bytes, ...]) -> str:
    """The name as dnspython writes it (escapes included), without the final dot.

    For log records; a flood of blocked names writes one each, so plain names (letters,
    digits, '-', '_') take a short cut, and the rest goes through dnspython.
    """
    if all(map(_PLAIN.issuperset, raw)):
        return b".".join(raw).decode("ascii")
    return dns.name.Name(raw + (b"",)).to_text(omit_final_dot=True)


_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def udp_limit(q: Query) -> int:
    """Largest UDP reply the client accepts: 512 without EDNS, else its size up to ours."""
    if not q.edns:
        return 512
    return max(512, min(q.payload, OUR_PAYLOAD))


@lru_cache(maxsize=256)
def _opt_with_ede(code: int, text: str) -> bytes:
    # The texts are a handful of fixed strings and reasons: cached, built once each.
    value = text.encode("utf-8")
    option = _OPTION.pack(_OPTION_EDE, 2 + len(value)) + code.to_bytes(2, "big") + value
    return b"\x00" + _RR_FIXED.pack(_TYPE_OPT, OUR_PAYLOAD, 0, len(option)) + option


def reply(
    q: Query,
    rcode: int,
    answer: bytes = b"",
    ancount: int = 0,
    authority: bytes = b"",
    nscount: int = 0,
    ede: tuple[int, str] | None = None,
    max_size: int = 65535,
) -> bytes:
    """The reply to ``q``: what ``replies`` + ``replies.to_wire`` render, as bytes.

    Header: the client's id, QR, RA, the client's RD (nothing else of its flags, as
    dnspython's make_response), ``rcode`` (0-15); the client's question; the answer and
    authority sections as given (records from ``record_wire``); then, only for an EDNS
    client, an OPT record (payload 1232) with the Extended DNS Error ``ede`` if given.
    Larger than ``max_size`` (clamped to 512..65535 as dnspython does): the same reply
    without answer and authority, with TC set (the client retries over TCP).
    """
    if not 0 <= rcode <= 15:
        raise ValueError(f"rcode {rcode} needs the OPT record's extended bits")
    flags = _QR | _RA | (q.flags & _RD) | rcode
    if q.edns:
        opt = _OPT_PLAIN if ede is None else _opt_with_ede(*ede)
        arcount = 1
    else:
        opt = b""
        arcount = 0
    if max_size < 512:
        max_size = 512
    elif max_size > 65535:
        max_size = 65535
    if 12 + len(q.question) + len(answer) + len(authority) + len(opt) > max_size:
        return _HEADER.pack(q.qid, flags | _TC, 1, 0, 0, arcount) + q.question + opt
    return (
        _HEADER.pack(q.qid, flags, 1, ancount, nscount, arcount)
        + q.question
        + answer
        + authority
        + opt
    )


def _labels_of(name: bytes) -> Labels:
    # An uncompressed wire name that this module wrote (well-formed): its lower-cased labels.
    labels: list[bytes] = []
    off = 0
    length = name[0]
    while length:
        start = off + 1
        off = start + length
        labels.append(name[start:off].lower())
        length = name[off]
    return tuple(labels)


@dataclass(frozen=True, slots=True)
class Record:
    owner: Labels  # lower-cased
    owner_wire: bytes  # the owner as received, uncompressed wire form (case kept)
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes  # every compressed name inside expanded (the RFC 3597 section 4 types)

    @property
    def target(self) -> Labels:
        """The lower-cased labels of a CNAME's or DNAME's target."""
        if self.rtype != _TYPE_CNAME and self.rtype != _TYPE_DNAME:
            raise ValueError(f"type {self.rtype} record has no target")
        return _labels_of(self.rdata)

    @property
    def address(self) -> str:
        """An A or AAAA record's address, written as dnspython writes it."""
        rdata = self.rdata
        if self.rtype == _TYPE_A and len(rdata) == 4:
            return f"{rdata[0]}.{rdata[1]}.{rdata[2]}.{rdata[3]}"
        if self.rtype == _TYPE_AAAA and len(rdata) == 16:
            if rdata.startswith(b"\x00" * 10):
                # dnspython writes IPv4-mapped and -compatible forms dotted
                # (::ffff:1.2.3.4); ipaddress on Python 3.11 does not.
                return dns.ipv6.inet_ntoa(rdata)
            return str(ipaddress.IPv6Address(rdata))
        raise ValueError(f"type {self.rtype} record of {len(rdata)} bytes has no address")


@dataclass(frozen=True, slots=True)
class Response:
    qid: int
    flags: int
    rcode: int  # the header's rcode (4 bits)
    labels: Labels  # the question's
    qtype: int
    answer: tuple[Record, ...]
    authority: tuple[Record, ...]


# A name read from a message: its uncompressed wire form (case kept), its lower-cased
# labels, and the offset just after it where it was read.
_Name = tuple[bytes, Labels, int]


def _name(wire: bytes, start: int, seen: dict[int, _Name], hops: int = 0) -> _Name:
    """The name at ``start``; ``seen`` holds the names already read in this message.

    A pointer is followed only to an offset before ``start`` (and after the header), so
    each hop goes strictly backward; the hop limit bounds the recursion besides.
    """
    hit = seen.get(start)
    if hit is not None:
        return hit
    n = len(wire)
    off = start
    labels: list[bytes] = []
    while True:
        if off >= n:
            raise WireError(f"name at offset {start} runs past the end of the message")
        length = wire[off]
        if length == 0:
            end = off + 1
            suffix_wire = b"\x00"
            suffix: Labels = ()
            break
        if length < 64:
            label_start = off + 1
            off = label_start + length
            labels.append(wire[label_start:off])
            continue
        if length < 0xC0:
            raise WireError(f"name at offset {start}: unknown label type {length:#x}")
        if off + 1 >= n:
            raise WireError(f"name at offset {start}: compression pointer cut off")
        target = ((length & 0x3F) << 8) | wire[off + 1]
        if target >= start or target < 12:
            raise WireError(
                f"name at offset {start}: compression pointer to {target} does not point "
                "back into the message"
            )
        if hops >= _MAX_HOPS:
            raise WireError(f"name at offset {start}: more than {_MAX_HOPS} pointers")
        suffix_wire, suffix, _ = _name(wire, target, seen, hops + 1)
        end = off + 2
        break
    if labels:
        form = wire[start:off] + suffix_wire
        if len(form) > _MAX_NAME:
            raise WireError(f"name at offset {start} is longer than {_MAX_NAME} bytes")
        result = (form, tuple(map(bytes.lower, labels)) + suffix, end)
    else:
        result = (suffix_wire, suffix, end)
    seen[start] = result
    return result


def _expand(
    wire: bytes, off: int, end: int, shape: tuple[int, ...], seen: dict[int, _Name]
) -> bytes:
    """The rdata at ``off``..``end`` with every name in it written out in full."""
    parts: list[bytes] = []
    for item in shape:
        if item == _N:
            form, _, after = _name(wire, off, seen)
            if after > end:
                raise WireError(f"name at offset {off} runs past its record's rdata")
            parts.append(form)
            off = after
            continue
        if item == _S:
            if off >= end:
                raise WireError(f"character string at offset {off} past its record's rdata")
            after = off + 1 + wire[off]
        else:
            after = off + item
        if after > end:
            raise WireError(f"rdata at offset {off} is shorter than its type requires")
        parts.append(wire[off:after])
        off = after
    if off != end:
        raise WireError(f"rdata ending at offset {end} has {end - off} bytes left over")
    return b"".join(parts)


_ADDRESS_SIZE = {_TYPE_A: 4, _TYPE_AAAA: 16}


def _records(wire: bytes, off: int, count: int, seen: dict[int, _Name], out: list[Record]) -> int:
    n = len(wire)
    for _ in range(count):
        # Most owners are one pointer to a name already read (the question's, a CNAME's
        # target): taken from ``seen`` directly, under _name's rule (it points back).
        hit = None
        if off + 1 < n and wire[off] >= 0xC0:
            target = ((wire[off] & 0x3F) << 8) | wire[off + 1]
            if 12 <= target < off:
                hit = seen.get(target)
        if hit is not None:
            owner_wire, owner, _ = hit
            off += 2
        else:
            owner_wire, owner, off = _name(wire, off, seen)
        rdata_start = off + 10
        if rdata_start > n:
            raise WireError(f"record at offset {off} is cut off")
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, off)
        off = rdata_start + rdlength
        if off > n:
            raise WireError(f"rdata at offset {rdata_start} runs past the end of the message")
        if rclass == _CLASS_IN and _ADDRESS_SIZE.get(rtype, rdlength) != rdlength:
            # An address of the wrong size: nothing to grant, and no reply may carry it.
            raise WireError(f"type {rtype} record at offset {rdata_start} has {rdlength} bytes")
        shape = _RDATA_NAMES.get(rtype)
        if shape is None:
            rdata = wire[rdata_start:off]
        else:
            rdata = _expand(wire, rdata_start, off, shape, seen)
        out.append(Record(owner, owner_wire, rtype, rclass, ttl, rdata))
    return off


def parse_response(wire: bytes) -> Response:
    """The header, the question and the answer and authority records of a response.

    Raises WireError for anything malformed in what is read (the additional section is
    not read). Exactly one question is required.
    """
    if len(wire) < 12:
        raise WireError(f"message of {len(wire)} bytes is shorter than a header")
    qid, flags, qd, an, ns, _ = _HEADER.unpack_from(wire)
    if qd != 1:
        raise WireError(f"message has {qd} questions, not one")
    seen: dict[int, _Name] = {}
    _, labels, off = _name(wire, 12, seen)
    if off + 4 > len(wire):
        raise WireError("question is cut off")
    qtype = _TYPE_CLASS.unpack_from(wire, off)[0]
    answer: list[Record] = []
    off = _records(wire, off + 4, an, seen, answer)
    authority: list[Record] = []
    if ns:
        _records(wire, off, ns, seen, authority)
    return Response(qid, flags, flags & 0xF, labels, qtype, tuple(answer), tuple(authority))


def record_wire(r: Record, ttl: int, qlabels: Labels) -> bytes:
    """The record for a reply: a pointer to the question's name as owner when it is that.

    The reply's question always starts at offset 12 (0xC00C).
    """
    owner = b"\xc0\x0c" if r.owner == qlabels else r.owner_wire
    return owner + _RR_FIXED.pack(r.rtype, r.rclass, ttl, len(r.rdata)) + r.rdata
