"""The hand-built ipset ADD/DEL message, byte for byte against pyroute2 as the oracle.

The oracle fills pyroute2's ``ipset_msg`` the way the adapter did before ipsetmsg existed
(and the way pyroute2's ``request`` fills the header: type with the subsystem, our flags,
the sequence number, nfgen_family from AsyncIPSet's default); only the header's pid
differs (pyroute2 puts its port id there, the kernel ignores it on a request), so the
oracle gets pid 0.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_IPSET
from pyroute2.netlink.nfnetlink.ipset import IPSET_CMD_ADD, IPSET_CMD_DEL, ipset_msg

from egressd.errors import FirewallError
from egressd.firewall import ipsetmsg, iptables_ipset
from egressd.firewall.base import TCP, UDP, Write
from egressd.firewall.iptables_ipset import IptablesIpset

PROTOCOL = 7  # what today's kernels negotiate; the tests also try others
_ADDR_ATTR = {4: "IPSET_ATTR_IPADDR_IPV4", 6: "IPSET_ATTR_IPADDR_IPV6"}


def _oracle_entry(w: Write, family: int) -> list[object]:
    attrs: list[list[object]] = [
        ["IPSET_ATTR_IP_FROM", {"attrs": [[_ADDR_ATTR[family], w.ip]]}],
    ]
    if w.proto:
        attrs.append(["IPSET_ATTR_PORT_FROM", w.port])
        attrs.append(["IPSET_ATTR_PROTO", w.proto])
    attrs.append(["IPSET_ATTR_TIMEOUT", w.timeout])
    if w.comment:
        attrs.append(["IPSET_ATTR_COMMENT", w.comment[:255]])
    return ["IPSET_ATTR_DATA", {"attrs": attrs}]


def oracle(
    cmd: int, name: str, family: int, writes: list[Write], seq: int, protocol: int = PROTOCOL
) -> bytes:
    msg = ipset_msg()
    msg["attrs"] = [
        ["IPSET_ATTR_PROTOCOL", protocol],
        ["IPSET_ATTR_SETNAME", name],
        ["IPSET_ATTR_LINENO", 0],
        ["IPSET_ATTR_ADT", {"attrs": [_oracle_entry(w, family) for w in writes]}],
    ]
    msg["nfgen_family"] = 2  # AsyncIPSet.request_iter: its _nfgen_family default
    msg["header"]["type"] = cmd | (NFNL_SUBSYS_IPSET << 8)
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg.reset()
    msg.encode()
    return bytes(msg.data)


def same(cmd: int, name: str, family: int, writes: list[Write], seq: int, protocol: int) -> None:
    ours = ipsetmsg.encode(cmd, name, family, writes, seq, protocol=protocol)
    assert ours.hex() == oracle(cmd, name, family, writes, seq, protocol).hex()
    # And the header on its own terms, not only "as pyroute2 does".
    length, kind, flags, hseq, pid = struct.unpack_from("=IHHII", ours)
    assert (length, kind, flags, hseq, pid) == (len(ours), 0x600 | cmd, 0x5, seq, 0)
    assert len(ours) % 4 == 0


V4 = ["203.0.113.10", "0.0.0.0", "255.255.255.255", "10.1.2.3"]
V6 = ["2001:db8::1", "::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff:192.0.2.1"]
COMMENTS = ["", "a", "ok.test", "x" * 3, "name." * 50 + "abc", "y" * 253, "z" * 300]
PORTS = [(0, 0), (TCP, 443), (UDP, 53), (TCP, 1), (TCP, 65535), (UDP, 8080)]


@pytest.mark.parametrize("cmd", [IPSET_CMD_ADD, IPSET_CMD_DEL])
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("comment", COMMENTS)
@pytest.mark.parametrize(("proto", "port"), PORTS)
def test_one_entry_matches_pyroute2(
    cmd: int, family: int, comment: str, proto: int, port: int
) -> None:
    addrs = V4 if family == 4 else V6
    name = f"egressd-p-v{family}" if not proto else f"egressd-p-pv{family}"
    for seq in (1, 2, 0xFFFF, 0xFFFFFFFF):
        for ip in addrs:
            w = Write(name, family, ip, 300, proto, port, comment)
            same(cmd, name, family, [w], seq, PROTOCOL)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("n", [2, 3, 17, 200])
def test_many_entries_match_pyroute2(family: int, n: int) -> None:
    addrs = V4 if family == 4 else V6
    writes = [
        Write(
            "egressd-many-v4",
            family,
            addrs[i % len(addrs)],
            1 + i * 7,
            *PORTS[i % len(PORTS)],
            COMMENTS[i % len(COMMENTS)],
        )
        for i in range(n)
    ]
    for cmd in (IPSET_CMD_ADD, IPSET_CMD_DEL):
        same(cmd, "egressd-many-v4", family, writes, 12345, PROTOCOL)


@pytest.mark.parametrize("protocol", [6, 7, 255])
@pytest.mark.parametrize("name", ["s", "abc", "egressd-p", "egressd-" + "p" * 15 + "-pv6-new"])
def test_set_names_and_protocol_versions_match_pyroute2(protocol: int, name: str) -> None:
    w = Write(name, 4, "192.0.2.7", 86400, TCP, 22, "ssh.example")
    same(IPSET_CMD_ADD, name, 4, [w], 99, protocol)


def test_timeouts_at_the_edges_match_pyroute2() -> None:
    for timeout in (1, 255, 256, 65536, 2**31 - 1, 2**32 - 1):
        w = Write("s", 6, "2001:db8::5", timeout)
        same(IPSET_CMD_ADD, "s", 6, [w], 3, PROTOCOL)


def test_an_address_of_the_wrong_family_is_refused() -> None:
    with pytest.raises(ValueError, match="2001:db8::1"):
        ipsetmsg.encode(IPSET_CMD_ADD, "s", 4, [Write("s", 4, "2001:db8::1", 1)], 1, protocol=7)
    with pytest.raises(ValueError, match="192.0.2.1"):
        ipsetmsg.encode(IPSET_CMD_ADD, "s", 6, [Write("s", 6, "192.0.2.1", 1)], 1, protocol=7)


_WRITES4 = st.builds(
    lambda ip, t, pp, c: Write("egressd-h-v4", 4, ip, t, pp[0], pp[1], c),
    st.ip_addresses(v=4).map(str),
    st.integers(1, 2**32 - 1),
    st.one_of(
        st.just((0, 0)),
        st.tuples(st.sampled_from([TCP, UDP]), st.integers(1, 65535)),
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", max_size=300),
)
_WRITES6 = _WRITES4.flatmap(
    lambda w: st.ip_addresses(v=6).map(
        lambda ip: Write("egressd-h-v6", 6, str(ip), w.timeout, w.proto, w.port, w.comment)
    )
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([IPSET_CMD_ADD, IPSET_CMD_DEL]),
    st.one_of(
        st.tuples(st.just(4), st.lists(_WRITES4, min_size=1, max_size=12)),
        st.tuples(st.just(6), st.lists(_WRITES6, min_size=1, max_size=12)),
    ),
    st.integers(0, 2**32 - 1),
)
def test_random_writes_match_pyroute2(cmd: int, fw: tuple[int, list[Write]], seq: int) -> None:
    family, writes = fw
    same(cmd, writes[0].set_name, family, writes, seq, PROTOCOL)


# --- ACKs ---------------------------------------------------------------------------------


def _err(seq: int, error: int, extra: bytes = b"") -> bytes:
    body = struct.pack("=i", error) + struct.pack("=IHHII", 16, 0x609, 5, seq, 0) + extra
    return struct.pack("=IHHII", 16 + len(body), 2, 0x100, seq, 4242) + body


def test_acks_reads_codes_and_sequence_numbers() -> None:
    data = _err(1, 0) + _err(2, -4352) + _err(3, -2, b"\0\0\0\0")
    assert ipsetmsg.acks(data) == [(1, 0), (2, 4352), (3, 2)]


def test_acks_skips_other_messages_and_stops_at_a_truncated_one() -> None:
    done = struct.pack("=IHHII", 20, 3, 0, 7, 0) + b"\0" * 4  # NLMSG_DONE
    assert ipsetmsg.acks(done + _err(8, 0)) == [(8, 0)]
    assert ipsetmsg.acks(_err(9, 0) + _err(10, 0)[:20]) == [(9, 0)]
    assert ipsetmsg.acks(b"") == []
    assert ipsetmsg.acks(struct.pack("=IHHII", 3, 2, 0, 1, 0)) == []  # a length too small


# --- the adapter's ACK handling, against a scripted kernel on a socketpair ----------------


class FlakySocket(socket.socket):
    """A socket whose receive fails like a netlink socket that dropped ACKs (ENOBUFS)."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))


async def _with_kernel(
    script: Callable[[int, bytes], int | None],
    body: Callable[[IptablesIpset, list[bytes]], Awaitable[None]],
    sock_class: type[socket.socket] = socket.socket,
    *,
    instant: bool = False,
) -> None:
    """Run ``body`` with the backend's set-write socket wired to a fake kernel that answers
    each request with script(cmd, request): an error code (0 = ACK), or None (silence).

    The fake answers from the event loop, after send() returned; ``instant``: inside
    send(), as the real kernel does."""
    loop = asyncio.get_running_loop()
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours = sock_class(fileno=ours.detach())
    ours.setblocking(False)
    kernel.setblocking(False)
    seen: list[bytes] = []

    def answer() -> None:
        request = kernel.recv(65536)
        seen.append(request)
        _, kind, _, seq, _ = struct.unpack_from("=IHHII", request)
        code = script(kind & 0xFF, request)
        if code is not None:
            kernel.send(_err(seq, -code))

    class Instant(socket.socket):
        def send(self, data: Any, flags: int = 0) -> int:
            n = super().send(data, flags)
            answer()
            return n

    if instant:
        ours = Instant(fileno=ours.detach())
        ours.setblocking(False)
    fw = IptablesIpset()
    fw._adt_sock = ours
    fw._adt_protocol = PROTOCOL
    loop.add_reader(ours.fileno(), fw._adt_read)
    if not instant:
        loop.add_reader(kernel.fileno(), answer)
    try:
        await body(fw, seen)
    finally:
        if not instant:
            loop.remove_reader(kernel.fileno())
        await fw.close()
        kernel.close()


W4 = Write("egressd-p-v4", 4, "192.0.2.1", 60, 0, 0, "ok.test")
W6 = Write("egressd-p-v6", 6, "2001:db8::1", 60, 0, 0, "ok.test")


def test_allow_sends_one_message_per_set_and_returns_on_the_acks() -> None:
    async def body(fw: IptablesIpset, seen: list[bytes]) -> None:
        await fw.allow([W4, W6, W4])
        assert seen == [
            ipsetmsg.encode(IPSET_CMD_ADD, W4.set_name, 4, [W4, W4], 1, protocol=PROTOCOL),
            ipsetmsg.encode(IPSET_CMD_ADD, W6.set_name, 6, [W6], 2, protocol=PROTOCOL),
        ]

    asyncio.run(_with_kernel(lambda cmd, req: 0, body))


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (4352, "ipset add 192.0.2.1 to egressd-p-v4 failed: set is full (maxelem)"),
        (4107, "Timeout cannot be used: set was created without timeout support"),
        (errno.ENOENT, "No such file or directory"),
    ],
)
def test_a_refused_add_is_a_firewall_error(code: int, text: str) -> None:
    async def body(fw: IptablesIpset, seen: list[bytes]) -> None:
        with pytest.raises(FirewallError, match=re.escape(text)):
            await fw.allow([W4])

    asyncio.run(_with_kernel(lambda cmd, req: code, body))


def test_revoke_falls_back_to_one_by_one_and_ignores_entries_already_gone() -> None:
    gone = Write("egressd-p-v4", 4, "192.0.2.2", 60)
    ws = [W4, gone, Write("egressd-p-v4", 4, "192.0.2.3", 60)]
    packed_gone = bytes([192, 0, 2, 2])

    def script(cmd: int, req: bytes) -> int:
        assert cmd == IPSET_CMD_DEL
        return 4103 if packed_gone in req else 0

    async def body(fw: IptablesIpset, seen: list[bytes]) -> None:
        await fw.revoke(ws)
        assert len(seen) == 4  # the list, then each entry alone

    asyncio.run(_with_kernel(script, body))


def test_a_missing_ack_fails_after_the_timeout_and_a_late_one_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(iptables_ipset, "ACK_TIMEOUT", 0.2)
    answered: list[bool] = []

    def script(cmd: int, req: bytes) -> int | None:
        answered.append(bool(answered))
        return 0 if answered[-1] else None  # silent on the first, ACKs the second

    async def body(fw: IptablesIpset, seen: list[bytes]) -> None:
        with pytest.raises(FirewallError, match="no ACK from the kernel"):
            await fw.allow([W4])
        await fw.allow([W4])

    asyncio.run(_with_kernel(script, body))


def test_closing_the_socket_fails_a_waiting_write() -> None:
    async def body(fw: IptablesIpset, seen: list[bytes]) -> None:
        task = asyncio.create_task(fw.allow([W4]))
        await asyncio.sleep(0.05)
        await fw.close()
        with pytest.raises(FirewallError, match="closed"):
            await asyncio.wait_for(task, 2)

    asyncio.run(_with_kernel(lambda cmd, req: None, body))


def test_a_receive_error_fails_the_waiting_write_at_once() -> None:
    async def body(fw: IptablesIpset, seen: list[bytes]) -> None:
        with pytest.raises(FirewallError, match="No buffer space"):
            await asyncio.wait_for(fw.allow([W4]), 2)

    asyncio.run(_with_kernel(lambda cmd, req: 0, body, FlakySocket))


def _done_at_once(fw: IptablesIpset) -> bool:
    """Does ``allow`` finish in its first step (no future, no turn of the loop)?"""
    coro = fw.allow([W4])
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


def test_an_ack_already_there_is_taken_without_waiting() -> None:
    """The kernel handles a request inside send(): the write returns in its first step."""

    async def body(fw: IptablesIpset, seen: list[bytes]) -> None:
        assert _done_at_once(fw)
        assert len(seen) == 1 and not fw._adt_waiting
        with pytest.raises(FirewallError, match="set is full"):  # an error, at once too
            await fw.allow([Write("egressd-p-v4", 4, "192.0.2.9", 60)])

    def script(cmd: int, req: bytes) -> int:
        return 4352 if bytes([192, 0, 2, 9]) in req else 0

    asyncio.run(_with_kernel(script, body, instant=True))


def test_positive_twin_an_ack_that_comes_later_is_waited_for() -> None:
    async def body(fw: IptablesIpset, seen: list[bytes]) -> None:
        assert not _done_at_once(fw)  # it had to wait (and was closed while waiting)
        fw._adt_waiting.clear()
        await fw.allow([W4])  # and waiting works: the ACK comes from the loop

    asyncio.run(_with_kernel(lambda cmd, req: 0, body))
