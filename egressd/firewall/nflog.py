"""Rejected packets read back from NFLOG (nfnetlink_log), for attributed journal records.

The reject chain of each profile sends its packets to an NFLOG group of their own
(egressd.firewall.rules.nflog_group) before rejecting them. This reader binds those groups
on a NETLINK_NETFILTER socket and turns each packet message into a ``Blocked``: the
group's profile, the uid of the socket that sent the packet (NFULA_UID, which the kernel
adds for every packet of a local socket; there is no flag to ask for it), and the
destination address, protocol and port from the first bytes of the packet.

Netlink, as the kernel's include/uapi/linux/netfilter/nfnetlink_log.h has it:

    config:  nlmsghdr(type = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG) | nfgenmsg(res_id =
             group, big-endian) | NFULA_CFG_CMD{BIND|UNBIND} | NFULA_CFG_MODE{range, mode}
             | NFULA_CFG_QTHRESH | NFULA_CFG_TIMEOUT
    packet:  nlmsghdr(type = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET) | nfgenmsg(family =
             AF_INET/AF_INET6, res_id = group) | attributes (NFULA_PAYLOAD, NFULA_UID, ...)

A group binding serves both families, so one BIND per group. No PF_BIND: that would make
nfnetlink_log the namespace's default logger of the family (what the kernel's LOG-style
messages of conntrack and TRACE use), which is not egressd's to change; the NFLOG target
finds its logger without it. Copy mode "packet" with a 128-byte range: the headers only,
never the agent's data.

The parsing half (``config_message``, ``parse``) is pure and tested against hand-built
messages; a malformed message is skipped and counted, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import dns.ipv6

from ..stats import Stats
from .nfnetlink import (
    NFGENMSG,
    NLA,
    NLA_TYPE_MASK,
    NLMSG_ERROR,
    NLMSGERR,
    NLMSGHDR,
    attr,
    pad,
    request,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1

# Config attributes and values.
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2

# Packet attributes.
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_UID = 11

COPY_RANGE = 128  # bytes of each packet: IPv6 + a few extension headers + TCP's ports
RCVBUF = 1 << 20


_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 136: "udplite"}
_PORTED = {6, 17, 132, 136}  # the destination port is the L4 header's second 16 bits
# IPv6 extension headers walked to reach the transport header (fragment: 44, handled apart).
_V6_EXT = {0, 43, 60}
_V6_FRAGMENT = 44


@dataclass(frozen=True, slots=True)
class Blocked:
    """One rejected packet as NFLOG reported it."""

    group: int
    uid: int  # -1: the kernel sent no NFULA_UID (no local socket)
    source: str
    destination: str
    protocol: str  # "tcp", "udp", "icmp", "icmpv6", ... or "proto N"
    port: int  # the destination port; 0 for protocols without ports or a non-first fragment


def config_message(group: int, command: int, seq: int) -> bytes:
    """A request binding (NFULNL_CFG_CMD_BIND, with copy mode and flush settings) or
    unbinding one group, asking for an ACK."""
    if not 0 <= group <= 0xFFFF:
        raise ValueError(f"NFLOG group {group} is not 16 bits")
    body = NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(group))
    body += attr(NFULA_CFG_CMD, struct.pack("B", command))
    if command == NFULNL_CFG_CMD_BIND:
        # struct nfulnl_msg_config_mode { __be32 copy_range; __u8 copy_mode; __u8 _pad; }
        body += attr(NFULA_CFG_MODE, struct.pack(">IBx", COPY_RANGE, NFULNL_COPY_PACKET))
        # One packet per message, sent at once: the record should not wait for a batch.
        body += attr(NFULA_CFG_QTHRESH, struct.pack(">I", 1))
        body += attr(NFULA_CFG_TIMEOUT, struct.pack(">I", 1))  # 1/100 s
    return request(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, body, seq)


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    error: int  # 0 or a positive errno


@dataclass(frozen=True, slots=True)
class Malformed:
    why: str


Message = Blocked | Ack | Malformed


def parse(data: bytes) -> Iterator[Message]:
    """Every message of one datagram: packets, ACKs/errors, and what could not be read.

    A message whose header lies about its length ends the datagram (its successors cannot
    be found); anything else malformed is one ``Malformed`` and the next message is read.
    """
    offset = 0
    while offset < len(data):
        if offset + NLMSGHDR.size > len(data):
            yield Malformed("truncated netlink header")
            return
        length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            yield Malformed(f"netlink length {length} does not fit the datagram")
            return
        body = data[offset + NLMSGHDR.size : offset + length]
        offset += pad(length)
        if kind == NLMSG_ERROR:
            if len(body) < NLMSGERR.size:
                yield Malformed("truncated netlink error")
            else:
                yield Ack(seq, -NLMSGERR.unpack_from(body)[0])
        elif kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            yield _packet(body)
        # Anything else (NLMSG_DONE, NOOP) carries nothing for us.


def _attrs(data: bytes, offset: int) -> dict[int, bytes] | None:
    """Attribute type -> payload; None when an attribute's length is impossible."""
    out: dict[int, bytes] = {}
    while offset + NLA.size <= len(data):
        n, kind = NLA.unpack_from(data, offset)
        if n < NLA.size or offset + n > len(data):
            return None
        out[kind & NLA_TYPE_MASK] = data[offset + NLA.size : offset + n]
        offset += pad(n)
    return out


def _packet(body: bytes) -> Message:
    if len(body) < NFGENMSG.size:
        return Malformed("truncated nfgenmsg")
    family, _version, res_id = NFGENMSG.unpack_from(body)
    attrs = _attrs(body, NFGENMSG.size)
    if attrs is None:
        return Malformed("bad attribute length")
    payload = attrs.get(NFULA_PAYLOAD)
    if payload is None:
        return Malformed("no payload (copy mode not packet?)")
    raw_uid = attrs.get(NFULA_UID)
    if raw_uid is not None and len(raw_uid) != 4:
        return Malformed("bad NFULA_UID length")
    uid = struct.unpack(">I", raw_uid)[0] if raw_uid is not None else -1
    try:
        source, destination, proto, port = _headers(payload)
    except ValueError as err:
        return Malformed(str(err))
    if family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNSPEC):
        return Malformed(f"family {family}")
    return Blocked(socket.ntohs(res_id), uid, source, destination, proto, port)


def _v6(raw: bytes) -> str:
    if raw.startswith(b"\0" * 10):
        # As egressd.dnswire writes addresses (the ledger's keys): dnspython's spelling.
        return dns.ipv6.inet_ntoa(raw)
    return str(ipaddress.IPv6Address(raw))


def _headers(pkt: bytes) -> tuple[str, str, str, int]:
    """(source, destination, protocol, destination port) of an IPv4 or IPv6 packet."""
    if not pkt:
        raise ValueError("empty payload")
    version = pkt[0] >> 4
    if version == 4:
        if len(pkt) < 20:
            raise ValueError("truncated IPv4 header")
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20:
            raise ValueError(f"IPv4 header length {ihl}")
        proto = pkt[9]
        source = str(ipaddress.IPv4Address(pkt[12:16]))
        destination = str(ipaddress.IPv4Address(pkt[16:20]))
        first = struct.unpack_from(">H", pkt, 6)[0] & 0x1FFF == 0
        return source, destination, _name(proto), _port(pkt, ihl, proto, first)
    if version == 6:
        if len(pkt) < 40:
            raise ValueError("truncated IPv6 header")
        source, destination = _v6(pkt[8:24]), _v6(pkt[24:40])
        proto, offset, first = pkt[6], 40, True
        for _ in range(8):  # bounded: a chain of extension headers is not a loop
            if proto in _V6_EXT:
                if offset + 2 > len(pkt):
                    return source, destination, _name(proto), 0
                proto, offset = pkt[offset], offset + (pkt[offset + 1] + 1) * 8
            elif proto == _V6_FRAGMENT:
                if offset + 8 > len(pkt):
                    return source, destination, _name(proto), 0
                first = struct.unpack_from(">H", pkt, offset + 2)[0] & 0xFFF8 == 0
                proto, offset = pkt[offset], offset + 8
            else:
                break
        return source, destination, _name(proto), _port(pkt, offset, proto, first)
    raise ValueError(f"IP version {version}")


def _name(proto: int) -> str:
    return _PROTOCOLS.get(proto, f"proto {proto}")


def _port(pkt: bytes, offset: int, proto: int, first: bool) -> int:
    if proto not in _PORTED or not first:
        return 0
    if offset + 4 > len(pkt):
        raise ValueError("truncated transport header")
    port: int = struct.unpack_from(">H", pkt, offset + 2)[0]
    return port


# --- the adapter --------------------------------------------------------------------------

ACK_TIMEOUT = 1.0


class NflogError(OSError):
    pass


class NflogReader:
    """Binds the profiles' groups and calls ``on_blocked(profile, packet)`` per packet.

    ``start`` binds synchronously (so a kernel without nfnetlink_log is known at once);
    ``rebind`` after a reload sends its requests and learns of failures from the ACKs the
    reader sees. Counted in ``stats``: nflog_malformed (messages that could not be read),
    nflog_overruns (times the kernel dropped messages for a full socket buffer); here:
    ``unknown`` (packets of a group no profile has, e.g. logged by the previous policy's
    rules during a reload).
    """

    def __init__(
        self,
        on_blocked: Callable[[str, Blocked], None],
        on_error: Callable[[str], None],
        stats: Stats,
    ) -> None:
        self.on_blocked = on_blocked
        self.on_error = on_error
        self.stats = stats
        self.groups: dict[int, str] = {}
        self.unknown = 0
        self._sock: socket.socket | None = None
        self._seq = 0
        self._pending: dict[int, tuple[int, int]] = {}  # seq -> (group, command)

    @property
    def active(self) -> bool:
        return self._sock is not None

    def start(self, groups: Mapping[int, str]) -> None:
        """Open the socket and bind ``groups`` (group -> profile); raises NflogError."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, 0))
            sock.settimeout(ACK_TIMEOUT)
            self.groups = dict(groups)  # a bound group's packets may come before the next ACK
            for group in sorted(groups):
                self._request(sock, group, NFULNL_CFG_CMD_BIND, wait=True)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            self.groups = {}
            raise NflogError(err.errno or 0, err.strerror or str(err)) from None
        self._sock = sock
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._readable)

    def _request(self, sock: socket.socket, group: int, command: int, *, wait: bool) -> None:
        self._seq += 1
        seq = self._seq
        sock.send(config_message(group, command, seq))
        if not wait:
            self._pending[seq] = (group, command)
            return
        while True:  # nothing else arrives before the first group is bound
            for msg in parse(sock.recv(65536)):
                if isinstance(msg, Ack) and msg.seq == seq:
                    if msg.error:
                        what = "bind" if command == NFULNL_CFG_CMD_BIND else "unbind"
                        raise OSError(
                            msg.error,
                            f"cannot {what} NFLOG group {group}: {_strerror(msg.error)}",
                        )
                    return
                if isinstance(msg, Blocked):
                    self._deliver(msg)

    def rebind(self, groups: Mapping[int, str]) -> None:
        """Bind the groups new in ``groups``, unbind those gone; errors come back as ACKs."""
        sock = self._sock
        if sock is None:
            return
        old, new = set(self.groups), set(groups)
        self.groups = dict(groups)
        try:
            for group in sorted(new - old):
                self._request(sock, group, NFULNL_CFG_CMD_BIND, wait=False)
            for group in sorted(old - new):
                self._request(sock, group, NFULNL_CFG_CMD_UNBIND, wait=False)
        except OSError as err:
            self.on_error(f"cannot rebind NFLOG groups: {err}")

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(256):  # a bounded batch: the loop serves DNS too
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    # The kernel dropped messages (a full buffer): nothing to attribute.
                    self.stats.nflog_overruns += 1
                    continue
                self.on_error(f"NFLOG socket failed, blocked connections are not logged: {err}")
                self.close()
                return
            for msg in parse(data):
                if isinstance(msg, Blocked):
                    self._deliver(msg)
                elif isinstance(msg, Ack):
                    self._acked(msg)
                else:
                    self.stats.nflog_malformed += 1

    def _acked(self, ack: Ack) -> None:
        group, command = self._pending.pop(ack.seq, (-1, 0))
        if ack.error and group >= 0:
            what = "bind" if command == NFULNL_CFG_CMD_BIND else "unbind"
            self.on_error(f"cannot {what} NFLOG group {group}: {_strerror(ack.error)}")

    def _deliver(self, pkt: Blocked) -> None:
        profile = self.groups.get(pkt.group)
        if profile is None:
            self.unknown += 1
            return
        self.on_blocked(profile, pkt)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()


def _strerror(code: int) -> str:
    if code in (errno.EPERM, errno.EBUSY):
        # The kernel's answer when another socket holds the group (EPERM since 2.6.x).
        return f"another program has bound it ({errno.errorcode[code]})"
    if code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EPROTONOSUPPORT):
        return f"no nfnetlink_log in this kernel ({errno.errorcode.get(code, code)})"
    return f"{errno.errorcode.get(code, str(code))} ({code})"
