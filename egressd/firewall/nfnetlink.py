"""nfnetlink framing shared by the hand-built messages (pure: no sockets): the netlink and
nfgenmsg headers, attributes, and a request around a subsystem's command.

Used by ipsetmsg (the hot path's set writes) and nflog (the rejected packets' reader).
"""

from __future__ import annotations

import struct

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian where it matters)
NLA = struct.Struct("=HH")  # length, type
NLMSGERR = struct.Struct("=i")  # the (negative) errno of an NLMSG_ERROR


def pad(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute: header, payload, zero padding to 4 bytes (the header's length
    counts the payload but not the padding, as the kernel and pyroute2 do)."""
    n = 4 + len(payload)
    return NLA.pack(n, kind) + payload + b"\0" * (pad(n) - n)


def request(subsys: int, command: int, body: bytes, seq: int) -> bytes:
    """A request (ACK asked for) of ``command`` to nfnetlink subsystem ``subsys``;
    ``body`` starts with the nfgenmsg header."""
    header = NLMSGHDR.pack(
        NLMSGHDR.size + len(body), (subsys << 8) | command, NLM_F_REQUEST | NLM_F_ACK, seq, 0
    )
    return header + body
