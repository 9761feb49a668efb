"""egressd's replies built with dnspython: the reference for ``dnswire`` (pure, no I/O).

The daemon writes its replies with ``dnswire``; it uses this module only to refuse client
messages of a shape ``dnswire`` does not read (several questions, another opcode or
class), which dnspython reads. The rest (``blocked``, ``servfail``, ``answer``) is the
specification ``dnswire.reply`` is held to byte for byte (tests/unit/test_dnswire.py).

Every reply is made from the client's own query (its id and question, as the client spelled
it) plus egressd's own flags and EDNS; nothing of an upstream message is passed on except
the answer rrsets on the CNAME chain and the SOA that makes negative answers cacheable.
"""

from __future__ import annotations

from collections.abc import Iterable

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from .dnswire import BLOCKED_TEXT, OUR_PAYLOAD


def udp_limit(reply: dns.message.Message) -> int:
    """Largest UDP reply the client accepts: 512 without EDNS, else its size up to ours.

    Works on the reply: make_response keeps the client's EDNS presence and its payload
    size (``request_payload``).
    """
    if reply.edns < 0:
        return 512
    return max(512, min(reply.request_payload, OUR_PAYLOAD))


def _response(query: dns.message.Message, rcode: dns.rcode.Rcode | int) -> dns.message.Message:
    # make_response copies id, question, RD and the client's EDNS presence.
    r = dns.message.make_response(query, recursion_available=True, our_payload=OUR_PAYLOAD)
    r.set_rcode(dns.rcode.Rcode(rcode))
    return r


def _with_ede(r: dns.message.Message, query: dns.message.Message, code: int, text: str) -> None:
    # RFC 8914: an EDE option may only go to a client that used EDNS itself.
    if query.edns >= 0:
        r.use_edns(
            0,
            payload=OUR_PAYLOAD,
            request_payload=query.payload,
            options=[dns.edns.EDEOption(dns.edns.EDECode(code), text)],
        )


def blocked(query: dns.message.Message, rcode: int) -> dns.message.Message:
    """NXDOMAIN (or REFUSED) with Extended DNS Error 15 "Blocked"."""
    r = _response(query, rcode)
    _with_ede(r, query, dns.edns.EDECode.BLOCKED, BLOCKED_TEXT)
    return r


def refused(query: dns.message.Message, text: str) -> dns.message.Message:
    r = _response(query, dns.rcode.REFUSED)
    _with_ede(r, query, dns.edns.EDECode.NOT_SUPPORTED, f"egressd: {text}")
    return r


def servfail(query: dns.message.Message, text: str) -> dns.message.Message:
    r = _response(query, dns.rcode.SERVFAIL)
    _with_ede(r, query, dns.edns.EDECode.OTHER, f"egressd: {text}")
    return r


def answer(
    query: dns.message.Message,
    rcode: int,
    answer_rrsets: Iterable[dns.rrset.RRset],
    authority: Iterable[dns.rrset.RRset],
) -> dns.message.Message:
    r = _response(query, rcode)
    r.answer = list(answer_rrsets)
    r.authority = [rrset for rrset in authority if rrset.rdtype == dns.rdatatype.SOA]
    return r


def to_wire(r: dns.message.Message, max_size: int = 65535) -> bytes:
    """Render; a reply too big for ``max_size`` goes out empty with TC set (retry over TCP)."""
    try:
        return r.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        r.answer = []
        r.authority = []
        r.additional = []
        r.flags |= dns.flags.TC
        return r.to_wire(max_size=max_size)
