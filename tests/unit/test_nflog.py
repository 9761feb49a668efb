"""NFLOG messages (egressd.firewall.nflog): the parser against hand-built kernel messages,
the config requests byte by byte, and the reader's dispatch and counting over a socketpair.
The real kernel path is tests/integration/test_blocked_connections.py."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

import pytest

from egressd.firewall import nflog
from egressd.firewall.nflog import Ack, Blocked, Malformed, NflogReader, config_message, parse
from egressd.stats import Stats

GROUP = 16391
UID = 64123


def attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (((n + 3) & ~3) - n)


def nlmsg(kind: int, body: bytes, seq: int = 0) -> bytes:
    n = 16 + len(body)
    return struct.pack("=IHHII", n, kind, 0, seq, 0) + body + b"\0" * (((n + 3) & ~3) - n)


def packet_msg(
    payload: bytes,
    *,
    family: int = socket.AF_INET,
    group: int = GROUP,
    uid: int | None = UID,
    extra: bytes = b"",
) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(group))
    # What the kernel sends before the payload: packet header, mark, outdev, prefix.
    body += attr(1, struct.pack(">HBx", 0x0800, 3))
    body += attr(5, struct.pack(">I", 2))
    body += extra
    body += attr(nflog.NFULA_PAYLOAD, payload)
    if uid is not None:
        body += attr(nflog.NFULA_UID, struct.pack(">I", uid))
        body += attr(14, struct.pack(">I", UID))  # NFULA_GID
    return nlmsg(nflog.NFNL_SUBSYS_ULOG << 8 | nflog.NFULNL_MSG_PACKET, body)


def ipv4(proto: int, l4: bytes, *, dst: str = "203.0.113.66", frag: int = 0, ihl: int = 5) -> bytes:
    opts = b"\x01" * ((ihl - 5) * 4)
    hdr = struct.pack(
        ">BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        20 + len(opts) + len(l4),
        1,
        frag,
        64,
        proto,
        0,
        socket.inet_aton("198.51.100.2"),
        socket.inet_aton(dst),
    )
    return hdr + opts + l4


def ipv6(nxt: int, rest: bytes, *, dst: str = "2001:db8:113::66") -> bytes:
    return (
        struct.pack(">IHBB", 6 << 28, len(rest), nxt, 64)
        + socket.inet_pton(socket.AF_INET6, "2001:db8:100::2")
        + socket.inet_pton(socket.AF_INET6, dst)
        + rest
    )


def tcp(dport: int) -> bytes:
    return struct.pack(">HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)


def udp(dport: int) -> bytes:
    return struct.pack(">HHHH", 40001, dport, 9, 0) + b"x"


def one(data: bytes) -> nflog.Message:
    msgs = list(parse(data))
    assert len(msgs) == 1, msgs
    return msgs[0]


# --- packets ---------------------------------------------------------------------------------


def test_ipv4_tcp() -> None:
    assert one(packet_msg(ipv4(6, tcp(8080)))) == Blocked(
        GROUP, UID, "198.51.100.2", "203.0.113.66", "tcp", 8080
    )


def test_ipv4_udp_with_options() -> None:
    got = one(packet_msg(ipv4(17, udp(9999), ihl=7)))
    assert isinstance(got, Blocked) and (got.protocol, got.port) == ("udp", 9999)


def test_ipv4_icmp_has_no_port() -> None:
    got = one(packet_msg(ipv4(1, struct.pack(">BBHHH", 8, 0, 0, 1, 1))))
    assert isinstance(got, Blocked) and (got.protocol, got.port) == ("icmp", 0)


def test_ipv4_non_first_fragment_has_no_port() -> None:
    got = one(packet_msg(ipv4(17, b"\0" * 8, frag=185)))
    assert isinstance(got, Blocked) and (got.protocol, got.port) == ("udp", 0)


def test_unknown_protocol_is_named_by_number() -> None:
    got = one(packet_msg(ipv4(47, b"\0" * 8)))
    assert isinstance(got, Blocked) and (got.protocol, got.port) == ("proto 47", 0)


def test_ipv6_tcp() -> None:
    got = one(packet_msg(ipv6(6, tcp(443)), family=socket.AF_INET6))
    assert got == Blocked(GROUP, UID, "2001:db8:100::2", "2001:db8:113::66", "tcp", 443)


def test_ipv6_udp_behind_extension_headers() -> None:
    hop = bytes([60, 0]) + b"\0" * 6  # hop-by-hop -> destination options
    dst_opts = bytes([44, 0]) + b"\0" * 6  # -> fragment
    frag = bytes([17, 0]) + struct.pack(">HI", 0, 7)  # offset 0: the first fragment
    got = one(packet_msg(ipv6(0, hop + dst_opts + frag + udp(5353)), family=socket.AF_INET6))
    assert isinstance(got, Blocked) and (got.protocol, got.port) == ("udp", 5353)


def test_ipv6_icmpv6_and_mapped_spelling() -> None:
    got = one(packet_msg(ipv6(58, b"\x80\0\0\0", dst="::ffff:1.2.3.4"), family=socket.AF_INET6))
    assert isinstance(got, Blocked)
    assert (got.protocol, got.port, got.destination) == ("icmpv6", 0, "::ffff:1.2.3.4")


def test_no_uid_is_minus_one() -> None:
    got = one(packet_msg(ipv4(6, tcp(80)), uid=None))
    assert isinstance(got, Blocked) and got.uid == -1


def test_several_messages_in_one_datagram() -> None:
    data = packet_msg(ipv4(6, tcp(1))) + packet_msg(ipv4(17, udp(2)), group=16392)
    assert [(m.group, m.port) for m in parse(data) if isinstance(m, Blocked)] == [
        (GROUP, 1),
        (16392, 2),
    ]


# --- malformed: dropped, never raised ------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x45" + b"\0" * 10,  # truncated IPv4
        ipv4(6, tcp(80))[:22],  # truncated TCP header
        ipv4(6, b"", ihl=5)[:20],  # no TCP header at all
        bytes([0x44]) + ipv4(6, tcp(80))[1:],  # IHL 16 bytes
        ipv6(6, tcp(80))[:30],  # truncated IPv6
        ipv6(6, tcp(80))[:42],  # truncated TCP in IPv6
        b"\x90" + b"\0" * 40,  # IP version 9
    ],
)
def test_bad_payloads(payload: bytes) -> None:
    assert isinstance(one(packet_msg(payload)), Malformed)


def test_no_payload_and_bad_uid() -> None:
    body = struct.pack("=BBH", 2, 0, socket.htons(GROUP)) + attr(nflog.NFULA_UID, b"\0\0")
    assert one(nlmsg(nflog.NFNL_SUBSYS_ULOG << 8, body)) == Malformed(
        "no payload (copy mode not packet?)"
    )
    body += attr(nflog.NFULA_PAYLOAD, ipv4(6, tcp(80)))
    assert one(nlmsg(nflog.NFNL_SUBSYS_ULOG << 8, body)) == Malformed("bad NFULA_UID length")


def test_bad_attribute_length() -> None:
    good = packet_msg(ipv4(6, tcp(80)))
    # the first attribute (after 16 + 4 bytes of headers) claims 200 bytes
    bad = good[:20] + struct.pack("=H", 200) + good[22:]
    assert one(bad) == Malformed("bad attribute length")
    zero = good[:20] + struct.pack("=H", 2) + good[22:]
    assert one(zero) == Malformed("bad attribute length")


def test_bad_netlink_lengths_end_the_datagram() -> None:
    good = packet_msg(ipv4(6, tcp(80)))
    too_long = struct.pack("=I", len(good) + 100) + good[4:]
    assert list(parse(too_long)) == [
        Malformed(f"netlink length {len(good) + 100} does not fit the datagram")
    ]
    too_short = struct.pack("=I", 8) + good[4:]
    assert isinstance(one(too_short), Malformed)
    assert list(parse(good + b"\0" * 7))[-1] == Malformed("truncated netlink header")
    assert isinstance(one(nlmsg(nflog.NFNL_SUBSYS_ULOG << 8, b"\x02")), Malformed)  # nfgenmsg


def test_acks_and_errors() -> None:
    ok = nlmsg(nflog.NLMSG_ERROR, struct.pack("=i", 0) + b"\0" * 16, seq=5)
    busy = nlmsg(nflog.NLMSG_ERROR, struct.pack("=i", -errno.EBUSY) + b"\0" * 16, seq=6)
    assert list(parse(ok + busy)) == [Ack(5, 0), Ack(6, errno.EBUSY)]
    assert isinstance(one(nlmsg(nflog.NLMSG_ERROR, b"\0\0")), Malformed)
    assert list(parse(nlmsg(3, b""))) == []  # NLMSG_DONE: nothing


def test_random_garbage_never_raises() -> None:
    import random

    rnd = random.Random(8)
    good = packet_msg(ipv6(17, udp(53)), family=socket.AF_INET6)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rnd.randint(1, 6)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        data = data[: rnd.randint(0, len(data))]
        for msg in parse(bytes(data)):
            assert isinstance(msg, Blocked | Ack | Malformed)


# --- config requests ------------------------------------------------------------------------


def test_bind_request_bytes() -> None:
    msg = config_message(GROUP, nflog.NFULNL_CFG_CMD_BIND, 9)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq, pid) == (len(msg), 0x0401, 0x5, 9, 0)
    assert msg[16:20] == bytes([socket.AF_UNSPEC, 0]) + struct.pack(">H", GROUP)
    assert msg[20:] == (
        attr(1, b"\x01")  # NFULA_CFG_CMD: BIND
        + attr(2, struct.pack(">IBx", 128, 2))  # NFULA_CFG_MODE: 128 bytes, packet
        + attr(5, struct.pack(">I", 1))  # NFULA_CFG_QTHRESH
        + attr(4, struct.pack(">I", 1))  # NFULA_CFG_TIMEOUT
    )


def test_unbind_request_and_group_range() -> None:
    msg = config_message(7, nflog.NFULNL_CFG_CMD_UNBIND, 1)
    assert msg[20:] == attr(1, b"\x02") and len(msg) == 28
    with pytest.raises(ValueError):
        config_message(65536, nflog.NFULNL_CFG_CMD_BIND, 1)


# --- the reader's dispatch (a socketpair stands in for netlink) -----------------------------


def test_reader_delivers_counts_and_reports() -> None:
    async def scenario() -> tuple[list[tuple[str, Blocked]], list[str], NflogReader]:
        got: list[tuple[str, Blocked]] = []
        errors: list[str] = []
        reader = NflogReader(lambda p, b: got.append((p, b)), errors.append, Stats())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        reader._sock = ours
        reader.groups = {GROUP: "agent"}
        reader._pending[3] = (GROUP + 1, nflog.NFULNL_CFG_CMD_BIND)
        theirs.send(packet_msg(ipv4(6, tcp(8080))))
        theirs.send(packet_msg(ipv4(6, tcp(8080)), group=GROUP + 9))  # no profile's group
        theirs.send(packet_msg(b"\x45"))  # malformed
        theirs.send(nlmsg(nflog.NLMSG_ERROR, struct.pack("=i", -errno.EBUSY) + b"\0" * 16, 3))
        reader._readable()
        theirs.close()
        reader.close()
        return got, errors, reader

    got, errors, reader = asyncio.run(scenario())
    assert got == [("agent", Blocked(GROUP, UID, "198.51.100.2", "203.0.113.66", "tcp", 8080))]
    assert (reader.stats.nflog_malformed, reader.unknown, reader.active) == (1, 1, False)
    assert errors == [f"cannot bind NFLOG group {GROUP + 1}: another program has bound it (EBUSY)"]
