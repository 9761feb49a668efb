"""The upstream resolver on real loopback sockets, against fake servers in this process.

What each test pins down: the upstream query is rebuilt from the question alone, byte for
byte what dnspython renders; only an answer with QR, the id and the question counts, from
the server's own address and port (the socket is connected); loss and ICMP errors fail
over to the next server and the preferred server follows the last answer; SERVFAIL and
REFUSED try the next and are returned when every try fails; TC goes to TCP; identical
questions in flight share one upstream query; no socket outlives a resolution.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from egressd.config import Upstream
from egressd.errors import UpstreamError
from egressd.upstream import (
    OUR_PAYLOAD,
    QueryIds,
    UpstreamResolver,
    build_query,
    is_answer,
    name_wire,
)

NAME = (b"www", b"example", b"com")
A, AAAA = dns.rdatatype.A, dns.rdatatype.AAAA
REAL, FORGED, VIA_TCP = "192.0.2.10", "198.51.100.66", "192.0.2.11"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- build_query and is_answer (pure) ------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "qtype", "rd", "qid"),
    [
        (NAME, A, True, 0x1234),
        (NAME, AAAA, False, 0),
        ((b"a",), dns.rdatatype.TXT, True, 0xFFFF),
        ((), dns.rdatatype.NS, True, 7),  # the root
        ((b"x" * 63, b"a.b", b"\x00\xff", b"_tcp"), 65535, True, 4242),  # any label bytes
        ((b"y" * 63,) * 3 + (b"z" * 61,), dns.rdatatype.HTTPS, False, 1),  # 255 octets
    ],
)
def test_build_query_is_what_dnspython_renders(
    labels: tuple[bytes, ...], qtype: int, rd: bool, qid: int
) -> None:
    m = dns.message.make_query(
        dns.name.Name((*labels, b"")),
        dns.rdatatype.RdataType(qtype),
        use_edns=0,
        payload=1232,
        want_dnssec=False,
    )
    m.id = qid
    if not rd:
        m.flags &= ~dns.flags.RD
    assert build_query(qid, labels, qtype, rd) == m.to_wire()


def test_build_query_takes_only_the_question() -> None:
    out = dns.message.from_wire(build_query(0x4321, NAME, AAAA, True))
    assert out.id == 0x4321
    assert len(out.question) == 1
    qn = out.question[0]
    assert (qn.name, qn.rdtype, qn.rdclass) == (
        dns.name.from_text("www.example.com"),
        AAAA,
        dns.rdataclass.IN,
    )
    assert out.answer == [] and out.authority == [] and out.additional == []
    assert out.edns == 0 and out.payload == OUR_PAYLOAD == 1232 and out.options == ()
    assert not out.ednsflags & dns.flags.DO
    assert out.flags == dns.flags.RD  # no QR, AD, CD, ...
    assert dns.message.from_wire(build_query(1, NAME, A, False)).flags == 0


@pytest.mark.parametrize(
    "labels", [(b"",), (b"a", b""), (b"x" * 64,), (b"y" * 63,) * 3 + (b"z" * 62,)]
)
def test_name_wire_refuses_what_is_no_name(labels: tuple[bytes, ...]) -> None:
    with pytest.raises(ValueError):
        name_wire(labels)


def answer_to(query: bytes, **change: Any) -> bytes:
    """A response to *query* (header fields or question overridable)."""
    qid, flags, _, _, _, _ = struct.unpack_from("!6H", query)
    question = query[12:-11]
    qid = change.get("qid", qid)
    flags = change.get("flags", flags | 0x8080)
    qdcount = change.get("qdcount", 1)
    question = change.get("question", question)
    assert isinstance(question, bytes)
    return struct.pack("!6H", qid, flags, qdcount, 0, 0, 0) + question


def test_is_answer() -> None:
    query = build_query(0xBEEF, NAME, A, True)
    name, typeclass = name_wire(NAME), struct.pack("!HH", A, 1)

    def ok(wire: bytes) -> bool:
        return is_answer(wire, query[:2], name, typeclass)

    assert ok(answer_to(query))
    assert ok(answer_to(query, flags=0x8583))  # AA, TC, RD, RA, NXDOMAIN: still an answer
    # the name case-insensitively (0x20 randomisation upstream is fine)
    assert ok(answer_to(query, question=name_wire((b"WwW", b"EXAMPLE", b"com")) + typeclass))
    assert not ok(answer_to(query, qid=0xBEEE))
    assert not ok(answer_to(query, flags=0x0080))  # QR clear: a query, not an answer
    assert not ok(answer_to(query, flags=0x8880))  # opcode 1
    assert not ok(answer_to(query, qdcount=2))
    assert not ok(answer_to(query, qdcount=0, question=b""))
    assert not ok(answer_to(query, question=name_wire((b"www", b"example", b"org")) + typeclass))
    assert not ok(answer_to(query, question=name + struct.pack("!HH", AAAA, 1)))
    assert not ok(answer_to(query, question=name + struct.pack("!HH", A, 3)))  # class CH
    assert not ok(answer_to(query)[:-1])  # cut short
    assert not ok(b"")
    assert not ok(query)  # our own query reflected


def test_is_answer_compares_type_and_class_exactly() -> None:
    # Type 65 (HTTPS) is 0x0041, "A" in ASCII; lower-casing it would make it type 97 (0x61).
    query = build_query(7, NAME, 65, True)
    name = name_wire(NAME)
    wrong = answer_to(query, question=name + struct.pack("!HH", 97, 1))
    assert not is_answer(wrong, query[:2], name, struct.pack("!HH", 65, 1))
    query = build_query(7, NAME, 97, True)
    wrong = answer_to(query, question=name + struct.pack("!HH", 65, 1))
    assert not is_answer(wrong, query[:2], name, struct.pack("!HH", 97, 1))
    assert is_answer(answer_to(query), query[:2], name, struct.pack("!HH", 97, 1))


# --- fake upstream servers ------------------------------------------------------------------

Action = str | Callable[["FakeServer", bytes, Any], None]


class FakeServer(asyncio.DatagramProtocol):
    """A UDP and TCP DNS server on 127.0.0.1 (or ::1), one port for both.

    Each UDP query takes the next action of the script ("answer" once it is empty):
    answer, drop, servfail, refused, nxdomain, tc (empty answer with TC set), or a
    function (server, wire, addr). TCP queries are answered with VIA_TCP.
    """

    def __init__(self, script: list[Action] | None = None, delay: float = 0.0) -> None:
        self.script = list(script or [])
        self.delay = delay
        self.queries: list[bytes] = []
        self.clients: list[Any] = []  # the source address of each query
        self.tcp_queries: list[bytes] = []
        self.tcp_reply: Callable[[bytes], bytes] = lambda wire: respond(wire, VIA_TCP)
        self.transport: asyncio.DatagramTransport | None = None
        self.got_query = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (in 3.11 the selector's datagram transport is no DatagramTransport subclass)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queries.append(data)
        self.clients.append(addr)
        self.got_query.set()
        action = self.script.pop(0) if self.script else "answer"
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self.act, action, data, addr)
        else:
            self.act(action, data, addr)

    def act(self, action: Action, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        if callable(action):
            action(self, data, addr)
        elif action == "answer":
            self.transport.sendto(respond(data, REAL), addr)
        elif action == "tc":
            self.transport.sendto(respond(data, None, tc=True), addr)
        elif action in ("servfail", "refused", "nxdomain"):
            self.transport.sendto(respond(data, None, rcode=dns.rcode.from_text(action)), addr)
        else:
            assert action == "drop"

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        wire = await reader.readexactly(size)
        self.tcp_queries.append(wire)
        reply = self.tcp_reply(wire)
        writer.write(struct.pack("!H", len(reply)) + reply)
        await writer.drain()
        writer.close()


def respond(
    query: bytes, address: str | None, *, tc: bool = False, rcode: int = dns.rcode.NOERROR
) -> bytes:
    q = dns.message.from_wire(query)
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.Rcode(rcode))
    if address is not None:
        qn = q.question[0]
        r.answer.append(dns.rrset.from_text(qn.name, 300, "IN", "A", address))
    if tc:
        r.flags |= dns.flags.TC
    return r.to_wire()


@asynccontextmanager
async def fake_server(
    script: list[Action] | None = None, delay: float = 0.0, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[FakeServer, Upstream]]:
    loop = asyncio.get_running_loop()
    for _ in range(50):
        transport, server = await loop.create_datagram_endpoint(
            lambda: FakeServer(script, delay), local_addr=(host, 0)
        )
        port = transport.get_extra_info("sockname")[1]
        try:
            tcp = await asyncio.start_server(server.serve_tcp, host, port)
        except OSError:  # the port is taken for TCP: another one
            transport.close()
            continue
        try:
            yield server, Upstream(host, port)
        finally:
            transport.close()
            tcp.close()
            await tcp.wait_closed()
        return
    raise AssertionError("no port free for both UDP and TCP")


async def closed_port() -> Upstream:
    """A UDP port nobody listens on: the kernel answers ICMP port unreachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Upstream("127.0.0.1", port)


def rdata(wire: bytes) -> list[str]:
    return [rd.to_text() for rrset in dns.message.from_wire(wire).answer for rd in rrset]


# --- the answer -------------------------------------------------------------------------------


def test_answer_is_returned_as_bytes() -> None:
    async def main() -> None:
        async with fake_server() as (server, up):
            res = UpstreamResolver((up,), timeout=2.0, tries=3)
            wire = await res.resolve(NAME, A, True)
            assert isinstance(wire, bytes)
            assert rdata(wire) == [REAL]
            (sent,) = server.queries
            assert wire[:2] == sent[:2]
            # what went out is the rebuilt question and nothing else
            assert sent == build_query(int.from_bytes(sent[:2], "big"), NAME, A, True)
            assert res.ignored == 0

    run(main())


def test_every_query_has_a_new_id_and_source_port() -> None:
    async def main() -> None:
        async with fake_server() as (server, up):
            res = UpstreamResolver((up,), timeout=2.0, tries=1)
            for _ in range(24):
                await res.resolve(NAME, A, True)
            ids = {q[:2] for q in server.queries}
            ports = {addr[1] for addr in server.clients}
            assert len(server.queries) == 24
            assert len(ids) > 12 and len(ports) > 12  # random, not a counter or constant

    run(main())


def test_rd_is_passed_on() -> None:
    async def main() -> None:
        async with fake_server() as (server, up):
            res = UpstreamResolver((up,), timeout=2.0, tries=1)
            await res.resolve(NAME, A, False)
            await res.resolve(NAME, A, True)
            rd = [bool(dns.message.from_wire(q).flags & dns.flags.RD) for q in server.queries]
            assert rd == [False, True]

    run(main())


def test_ipv6_server() -> None:
    async def main() -> None:
        async with fake_server(host="::1") as (server, up):
            wire = await UpstreamResolver((up,), 2.0, 1).resolve(NAME, AAAA, True)
            assert rdata(wire) == [REAL] and len(server.queries) == 1

    run(main())


# --- spoofed and mismatched answers -----------------------------------------------------------


def forged(wire: bytes, addr: Any) -> bytes:
    """A perfect answer to *wire* (id, question) carrying the attacker's address."""
    return respond(wire, FORGED)


def test_mismatched_answers_are_ignored() -> None:
    def noise(server: FakeServer, wire: bytes, addr: Any) -> None:
        assert server.transport is not None
        q = dns.message.from_wire(wire)
        bad_id = bytearray(forged(wire, addr))
        bad_id[0] ^= 0x01
        other = dns.message.make_query("www.example.org", "A")
        other.id = q.id
        bad_name = dns.message.make_response(other).to_wire()
        other = dns.message.make_query("www.example.com", "AAAA")
        other.id = q.id
        bad_type = dns.message.make_response(other).to_wire()
        no_qr = forged(wire, addr)
        no_qr = no_qr[:2] + bytes([no_qr[2] & 0x7F]) + no_qr[3:]
        for junk in (bytes(bad_id), bad_name, bad_type, no_qr, b"\x00", wire):
            server.transport.sendto(junk, addr)
        server.transport.sendto(respond(wire, REAL), addr)

    async def main() -> None:
        async with fake_server([noise]) as (_, up):
            res = UpstreamResolver((up,), timeout=2.0, tries=1)
            assert rdata(await res.resolve(NAME, A, True)) == [REAL]
            assert res.ignored == 6

    run(main())


def test_answer_from_another_port_never_reaches_the_resolver() -> None:
    """A forged answer from a second socket toward the client's port is dropped by the
    kernel (connected socket); the real answer, sent later, is the one returned."""
    spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    spoofer.bind(("127.0.0.1", 0))
    sent: list[int] = []

    def spoof_then_answer(server: FakeServer, wire: bytes, addr: Any) -> None:
        sent.append(spoofer.sendto(forged(wire, addr), addr))
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, server.act, "answer", wire, addr)

    async def main() -> None:
        async with fake_server([spoof_then_answer]) as (_, up):
            res = UpstreamResolver((up,), timeout=2.0, tries=1)
            assert rdata(await res.resolve(NAME, A, True)) == [REAL]
            assert sent and sent[0] > 0
            assert res.ignored == 0  # not even seen: the kernel filtered it

    try:
        run(main())
    finally:
        spoofer.close()


def test_positive_twin_the_forged_answer_from_the_server_port_is_taken() -> None:
    """The same forged datagram, sent from the server's own address and port, is accepted:
    only its source kept it out above."""

    def forge_from_server(server: FakeServer, wire: bytes, addr: Any) -> None:
        assert server.transport is not None
        server.transport.sendto(forged(wire, addr), addr)

    async def main() -> None:
        async with fake_server([forge_from_server]) as (_, up):
            res = UpstreamResolver((up,), timeout=2.0, tries=1)
            assert rdata(await res.resolve(NAME, A, True)) == [FORGED]

    run(main())


# --- loss, errors and rotation --------------------------------------------------------------


def test_silent_server_fails_over_and_the_answering_one_is_preferred() -> None:
    async def main() -> None:
        async with fake_server(["drop"] * 5) as (s1, up1), fake_server() as (s2, up2):
            res = UpstreamResolver((up1, up2), timeout=0.2, tries=3)
            assert rdata(await res.resolve(NAME, A, True)) == [REAL]
            assert rdata(await res.resolve(NAME, A, True)) == [REAL]
            assert (len(s1.queries), len(s2.queries)) == (1, 2)

    run(main())


def test_dropped_try_then_answer_on_retry() -> None:
    async def main() -> None:
        async with fake_server(["drop", "answer"]) as (server, up):
            res = UpstreamResolver((up,), timeout=0.2, tries=2)
            assert rdata(await res.resolve(NAME, A, True)) == [REAL]
            first, second = server.queries
            # a fresh query (id) from a fresh socket (port) per try
            assert (first[:2], server.clients[0]) != (second[:2], server.clients[1])

    run(main())


def test_icmp_port_unreachable_fails_over_at_once() -> None:
    async def main() -> None:
        dead = await closed_port()
        async with fake_server() as (server, up):
            res = UpstreamResolver((dead, up), timeout=5.0, tries=1)
            start = time.monotonic()
            assert rdata(await res.resolve(NAME, A, True)) == [REAL]
            assert time.monotonic() - start < 2.5  # not the 5 s timeout
            assert len(server.queries) == 1
            with pytest.raises(UpstreamError, match="ConnectionRefusedError"):
                await UpstreamResolver((dead,), 5.0, 1).resolve(NAME, A, True)

    run(main())


def test_servfail_counts_as_failed_try() -> None:
    async def main() -> None:
        async with fake_server(["servfail"]) as (_, up1), fake_server(["nxdomain"]) as (_, up2):
            wire = await UpstreamResolver((up1, up2), 1.0, 3).resolve(NAME, A, True)
            assert dns.message.from_wire(wire).rcode() == dns.rcode.NXDOMAIN

    run(main())


def test_returns_last_bad_answer() -> None:
    async def main() -> None:
        async with (
            fake_server(["refused", "drop"]) as (s1, up1),
            fake_server(["servfail"]) as (s2, up2),
        ):
            wire = await UpstreamResolver((up1, up2), 0.2, 3).resolve(NAME, A, True)
            assert dns.message.from_wire(wire).rcode() == dns.rcode.SERVFAIL
            assert (len(s1.queries), len(s2.queries)) == (2, 1)

    run(main())


def test_raises_when_nobody_answers() -> None:
    async def main() -> None:
        async with fake_server(["drop"] * 3) as (server, up):
            with pytest.raises(UpstreamError) as exc:
                await UpstreamResolver((up,), 0.1, 3).resolve(NAME, A, True)
            assert str(exc.value) == f"no answer from {up}: TimeoutError: no answer within 0.1 s"
            assert len(server.queries) == 3

    run(main())


def test_error_lists_every_server() -> None:
    async def main() -> None:
        async with fake_server(["drop"]) as (_, up1), fake_server(["drop"]) as (_, up2):
            with pytest.raises(UpstreamError) as exc:
                await UpstreamResolver((up1, up2), 0.1, 1).resolve(NAME, A, True)
            assert str(exc.value).startswith(f"no answer from {up1}, {up2}: TimeoutError")

    run(main())


def test_tries_every_server_at_least_once() -> None:
    async def main() -> None:
        async with (
            fake_server(["drop"]) as (_, up1),
            fake_server(["drop"]) as (_, up2),
            fake_server() as (s3, up3),
        ):
            wire = await UpstreamResolver((up1, up2, up3), 0.1, tries=1).resolve(NAME, A, True)
            assert rdata(wire) == [REAL] and len(s3.queries) == 1

    run(main())


def test_needs_servers() -> None:
    with pytest.raises(ValueError):
        UpstreamResolver((), 1.0, 1)


# --- TC -> TCP --------------------------------------------------------------------------------


def test_truncated_answer_is_asked_again_over_tcp() -> None:
    async def main() -> None:
        async with fake_server(["tc"]) as (server, up):
            wire = await UpstreamResolver((up,), 2.0, 1).resolve(NAME, A, True)
            assert rdata(wire) == [VIA_TCP]
            assert not dns.message.from_wire(wire).flags & dns.flags.TC
            (tcp_query,) = server.tcp_queries
            question = dns.message.from_wire(tcp_query).question[0]
            assert question.name == dns.name.from_text("www.example.com")

    run(main())


def test_mismatched_tcp_answer_is_a_failed_try() -> None:
    async def main() -> None:
        async with fake_server(["tc", "tc"]) as (server, up):
            bad_id = server.tcp_reply

            def wrong(wire: bytes) -> bytes:
                reply = bytearray(bad_id(wire))
                reply[1] ^= 0x01
                return bytes(reply)

            server.tcp_reply = wrong
            with pytest.raises(UpstreamError, match="BadAnswer"):
                await UpstreamResolver((up,), 2.0, 2).resolve(NAME, A, True)
            assert len(server.tcp_queries) == 2

    run(main())


# --- coalescing -------------------------------------------------------------------------------


def test_identical_questions_in_flight_share_one_query() -> None:
    async def main() -> None:
        async with fake_server(delay=0.1) as (server, up):
            res = UpstreamResolver((up,), 2.0, 1)
            results = await asyncio.gather(*(res.resolve(NAME, A, True) for _ in range(20)))
            assert len(server.queries) == 1
            assert all(r is results[0] for r in results)
            assert rdata(results[0]) == [REAL]
            # once landed, the next one asks again
            await res.resolve(NAME, A, True)
            assert len(server.queries) == 2

    run(main())


def test_different_questions_are_not_coalesced() -> None:
    async def main() -> None:
        async with fake_server(delay=0.1) as (server, up):
            res = UpstreamResolver((up,), 2.0, 1)
            await asyncio.gather(
                res.resolve(NAME, A, True),
                res.resolve(NAME, AAAA, True),
                res.resolve(NAME, A, False),
                res.resolve((b"other", b"example", b"com"), A, True),
            )
            assert len(server.queries) == 4

    run(main())


def test_a_cancelled_waiter_leaves_the_others_answered() -> None:
    async def main() -> None:
        async with fake_server(delay=0.2) as (server, up):
            res = UpstreamResolver((up,), 2.0, 1)
            tasks = [asyncio.create_task(res.resolve(NAME, A, True)) for _ in range(3)]
            await server.got_query.wait()
            tasks[1].cancel()  # a waiter, not the first asker (which resolves it)
            with pytest.raises(asyncio.CancelledError):
                await tasks[1]
            assert [rdata(await t) for t in (tasks[0], tasks[2])] == [[REAL], [REAL]]
            assert len(server.queries) == 1

    run(main())


def test_a_cancelled_first_asker_leaves_the_others_to_ask_again() -> None:
    """The first asker resolves in its own task: cancelled, its query goes with it, and
    the waiters are answered by one new query (not one each)."""

    async def main() -> None:
        async with fake_server(delay=0.2) as (server, up):
            res = UpstreamResolver((up,), 2.0, 1)
            before = open_fds()
            tasks = [asyncio.create_task(res.resolve(NAME, A, True)) for _ in range(3)]
            await server.got_query.wait()
            assert open_fds() == before + 1  # positive twin: the first query's socket
            tasks[0].cancel()
            with pytest.raises(asyncio.CancelledError):
                await tasks[0]
            assert [rdata(await t) for t in tasks[1:]] == [[REAL], [REAL]]
            assert len(server.queries) == 2
            await settle()
            assert open_fds() == before
            assert not res._inflight and not res._udp

    run(main())


def test_a_first_asker_closed_unawaited_leaves_no_waiter_hanging() -> None:
    """A first asker whose coroutine is closed (not cancelled: GeneratorExit) must still
    release its question: the waiter asks again instead of waiting forever."""

    async def main() -> None:
        async with fake_server(delay=0.1) as (server, up):
            res = UpstreamResolver((up,), 2.0, 1)
            first = res.resolve(NAME, A, True)
            first.send(None)  # registered as the first asker, its query sent
            waiter = asyncio.create_task(res.resolve(NAME, A, True))
            await server.got_query.wait()
            await asyncio.sleep(0)  # the waiter is waiting for the first asker
            assert len(server.queries) == 1
            first.close()
            assert rdata(await asyncio.wait_for(waiter, 2)) == [REAL]
            assert len(server.queries) == 2  # it asked again
            await settle()
            assert not res._inflight and not res._udp

    run(main())


def test_coalesced_waiters_share_the_error() -> None:
    async def main() -> None:
        async with fake_server(["drop"]) as (server, up):
            res = UpstreamResolver((up,), 0.1, 1)
            outcomes = await asyncio.gather(
                *(res.resolve(NAME, A, True) for _ in range(3)), return_exceptions=True
            )
            assert isinstance(outcomes[0], UpstreamError)
            assert all(o is outcomes[0] for o in outcomes)
            assert len(server.queries) == 1

    run(main())


# --- no socket outlives a resolution ----------------------------------------------------------


async def settle() -> None:
    for _ in range(3):  # closing a TCP transport takes a loop iteration or two
        await asyncio.sleep(0)


def test_no_socket_left_after_success_timeout_tc_and_error() -> None:
    async def main() -> None:
        dead = await closed_port()
        async with fake_server(["answer", "drop", "tc"]) as (_, up):
            res = UpstreamResolver((up,), 0.1, 1)
            before = open_fds()
            await res.resolve(NAME, A, True)
            await settle()
            assert open_fds() == before
            with pytest.raises(UpstreamError):
                await res.resolve(NAME, A, True)
            assert open_fds() == before
            await res.resolve(NAME, A, True)  # over TCP
            await settle()
            assert open_fds() == before
            with pytest.raises(UpstreamError):
                await UpstreamResolver((dead,), 1.0, 1).resolve(NAME, A, True)
            assert open_fds() == before

    run(main())


def test_no_socket_left_after_cancellation() -> None:
    async def main() -> None:
        async with fake_server(["drop"]) as (server, up):
            res = UpstreamResolver((up,), 5.0, 1)
            before = open_fds()
            tasks = [asyncio.create_task(res.resolve(NAME, A, True)) for _ in range(2)]
            await server.got_query.wait()
            assert open_fds() == before + 1  # positive twin: the query's socket was there
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await settle()
            assert open_fds() == before  # the last waiter gone: the resolution went too
            assert not res._inflight and not res._udp

    run(main())


def test_close_aborts_what_is_in_flight() -> None:
    async def main() -> None:
        async with fake_server(["drop"]) as (server, up):
            res = UpstreamResolver((up,), 5.0, 1)
            before = open_fds()
            task = asyncio.create_task(res.resolve(NAME, A, True))
            waiter = asyncio.create_task(res.resolve(NAME, A, True))
            await server.got_query.wait()
            assert open_fds() == before + 1
            res.close()
            assert open_fds() == before  # at once, not when the task gets to run
            for t in (task, waiter):  # the first asker and the one waiting for it
                with pytest.raises(UpstreamError, match="closed"):
                    await t
            assert len(server.queries) == 1  # the waiter did not ask again
            await settle()
            assert open_fds() == before
            # a closed resolver still answers new questions (a swap closes the old one)
            assert rdata(await res.resolve(NAME, A, True)) == [REAL]

    run(main())


# --- query ids -------------------------------------------------------------------------------


def test_query_ids_are_16_bit_and_refilled() -> None:
    ids = QueryIds()
    got = [ids.next() for _ in range(3 * QueryIds.BATCH + 5)]  # past three refills
    assert all(0 <= i < 65536 for i in got)
    # 6,149 draws of 16 bits: a constant or a short cycle would show as few values;
    # uniform draws give ~5,900 distinct ones (birthday bound), a repeat-free run 6,149.
    assert len(set(got)) > 5000
    # both octets vary (a byte-order or cast slip would leave one fixed)
    assert len({i >> 8 for i in got}) > 200 and len({i & 0xFF for i in got}) > 200
