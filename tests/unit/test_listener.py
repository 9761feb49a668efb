"""The listener with real sockets on 127.0.0.1 and a fake pipeline handler (no root).

What each test pins down: the UDP reply size limit (512 without EDNS, else the client's
size) with TC on truncation; the per-listener TCP connection cap; the eviction of the
oldest idle connection when the cap is reached; the whole-connection deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

from egressd import replies
from egressd.listener import Listener
from egressd.stats import Stats

BIG = "big.test."  # an answer of 60 A records: ~1 kB on the wire
SLOW = "slow.test."  # the handler holds it until the test releases it


class FakePipeline:
    """Answers every A query with one record (60 for BIG); holds SLOW until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0  # SLOW queries that reached the handler
        self.tasks: list[asyncio.Task[object] | None] = []  # the task each query ran in

        self.waits: list[bool] = []  # the `wait` each query was handled with

    async def handle(
        self, wire: bytes, port: int, client: str, *, udp: bool, wait: bool
    ) -> bytes | None:
        query = dns.message.from_wire(wire)
        qname = query.question[0].name.to_text()
        self.tasks.append(asyncio.current_task())
        self.waits.append(wait)
        if qname == SLOW:
            if not wait:
                return None  # as the pipeline does with what would have to wait
            self.started += 1
            await self.release.wait()
        reply = dns.message.make_response(query)
        count = 60 if qname == BIG else 1
        rdatas = [f"203.0.113.{i + 1}" for i in range(count)]
        reply.answer.append(dns.rrset.from_text_list(qname, 300, "IN", "A", rdatas))
        # The pipeline renders within the client's UDP size (replies as the oracle here).
        return replies.to_wire(reply, replies.udp_limit(reply) if udp else 65535)


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (the listener binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port: int = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


@asynccontextmanager
async def listening(
    fake: FakePipeline, *, cap: int = 128, idle: float = 5.0, lifetime: float = 30.0
) -> AsyncIterator[Listener]:
    lst = Listener(
        free_port(),
        fake.handle,
        Stats(),
        max_inflight=64,
        tcp_idle_timeout=idle,
        tcp_max_connections=cap,
        tcp_lifetime=lifetime,
        ipv6=False,
    )
    await lst.start()
    try:
        yield lst
    finally:
        fake.release.set()
        await lst.close()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


async def udp_ask(port: int, query: dns.message.Message) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(("127.0.0.1", port))
        await loop.sock_sendall(s, query.to_wire())
        return await asyncio.wait_for(loop.sock_recv(s, 65535), 5)


class TcpClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> TcpClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, name: str) -> None:
        wire = dns.message.make_query(name, "A").to_wire()
        self.writer.write(struct.pack("!H", len(wire)) + wire)
        await self.writer.drain()

    async def answer(self, timeout: float = 5.0) -> dns.message.Message:
        async with asyncio.timeout(timeout):
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            return dns.message.from_wire(await self.reader.readexactly(length))

    async def ask(self, name: str) -> dns.message.Message:
        await self.send(name)
        return await self.answer()

    async def closed_by_server(self, timeout: float = 2.0) -> bool:
        """True when the server closed (EOF or reset) within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read(1) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


async def until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


# --- UDP -----------------------------------------------------------------------------------


def test_udp_reply_over_512_bytes_is_truncated_with_tc_without_edns() -> None:
    async def test() -> None:
        fake = FakePipeline()
        async with listening(fake) as lst:
            plain = dns.message.from_wire(await udp_ask(lst.port, dns.message.make_query(BIG, "A")))
            assert plain.flags & dns.flags.TC and plain.answer == []

            # The same answer fits the client's EDNS size: sent whole, no TC.
            edns = dns.message.make_query(BIG, "A", use_edns=0, payload=1232)
            wire = await udp_ask(lst.port, edns)
            whole = dns.message.from_wire(wire)
            assert not whole.flags & dns.flags.TC and len(whole.answer[0]) == 60
            assert 512 < len(wire) <= 1232

            # Positive twin: a small answer is not truncated without EDNS either.
            small = dns.message.from_wire(
                await udp_ask(lst.port, dns.message.make_query("a.test.", "A"))
            )
            assert not small.flags & dns.flags.TC and len(small.answer[0]) == 1

            # And over TCP the big answer comes whole, with or without EDNS.
            client = await TcpClient.open(lst.port)
            tcp = await client.ask(BIG)
            assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 60
            client.close()

    run(test)


def test_udp_reply_is_truncated_to_the_clients_edns_size() -> None:
    async def test() -> None:
        async with listening(FakePipeline()) as lst:
            q = dns.message.make_query(BIG, "A", use_edns=0, payload=600)
            wire = await udp_ask(lst.port, q)
            assert len(wire) <= 600
            reply = dns.message.from_wire(wire)
            assert reply.flags & dns.flags.TC and reply.answer == []

    run(test)


def test_udp_query_that_waits_is_answered_and_one_that_does_not_never_needs_a_task() -> None:
    async def test() -> None:
        fake = FakePipeline()
        async with listening(fake) as lst:
            waits = asyncio.create_task(udp_ask(lst.port, dns.message.make_query(SLOW, "A")))
            await until(lambda: fake.started == 1)
            assert lst.inflight == 1  # the waiting query went on in a task
            quick = dns.message.from_wire(
                await udp_ask(lst.port, dns.message.make_query("a.test.", "A"))
            )
            assert quick.answer and lst.inflight == 1
            assert fake.tasks[-1] is None  # answered in the read callback: no task made
            fake.release.set()
            assert dns.message.from_wire(await waits).answer
            await until(lambda: lst.inflight == 0)

    run(test)


def test_udp_at_the_inflight_bound_answers_only_what_needs_no_waiting() -> None:
    async def test() -> None:
        fake = FakePipeline()
        async with listening(fake) as lst:
            lst.max_inflight = 1
            waits = asyncio.create_task(udp_ask(lst.port, dns.message.make_query(SLOW, "A")))
            await until(lambda: fake.started == 1 and lst.inflight == 1)
            # At the bound: a query that needs no waiting is still answered...
            quick = dns.message.from_wire(
                await udp_ask(lst.port, dns.message.make_query("a.test.", "A"))
            )
            assert quick.answer and fake.waits[-1] is False
            # ...and one that would wait is dropped (the handler said None), not queued.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(udp_ask(lst.port, dns.message.make_query(SLOW, "A")), 0.3)
                raise AssertionError("a second slow query was answered at the bound")
            assert fake.started == 1 and fake.waits[-1] is False
            # Positive twin: below the bound the same query waits and is answered.
            fake.release.set()
            assert dns.message.from_wire(await waits).answer
            await until(lambda: lst.inflight == 0)
            again = await udp_ask(lst.port, dns.message.make_query(SLOW, "A"))
            assert dns.message.from_wire(again).answer and fake.waits[-1] is True

    run(test)


def test_udp_reads_a_burst_in_one_wakeup_and_answers_all_of_it() -> None:
    async def test() -> None:
        fake = FakePipeline()
        async with listening(fake) as lst:
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                s.connect(("127.0.0.1", lst.port))
                ids = list(range(1, 201))  # more than one batch (UDP_BATCH)
                for i in ids:
                    q = dns.message.make_query(f"n{i}.test.", "A")
                    q.id = i
                    s.send(q.to_wire())
                got = set()
                async with asyncio.timeout(5):
                    while len(got) < len(ids):
                        got.add(dns.message.from_wire(await loop.sock_recv(s, 65535)).id)
            assert got == set(ids)

    run(test)


# --- TCP -----------------------------------------------------------------------------------


def test_tcp_connection_cap_refuses_when_every_slot_is_busy() -> None:
    async def test() -> None:
        fake = FakePipeline()
        async with listening(fake, cap=3) as lst:
            busy = [await TcpClient.open(lst.port) for _ in range(3)]
            for c in busy:
                await c.send(SLOW)
            await until(lambda: fake.started == 3)
            assert lst.tcp_connections == 3

            # Every slot has a query in progress: the newcomer is closed unanswered.
            extra = await TcpClient.open(lst.port)
            await extra.send("a.test.")
            assert await extra.closed_by_server()
            assert lst.tcp_refused == 1 and lst.tcp_evicted == 0
            assert lst.tcp_connections == 3

            # Positive twin: the busy ones are answered, and once idle a slot is reused.
            fake.release.set()
            for c in busy:
                assert (await c.answer()).answer
            late = await TcpClient.open(lst.port)
            assert (await late.ask("a.test.")).answer
            assert lst.tcp_connections == 3  # `late` took the oldest idle slot
            for c in [*busy, extra, late]:
                c.close()

    run(test)


def test_full_listener_evicts_the_oldest_idle_connection() -> None:
    async def test() -> None:
        fake = FakePipeline()
        async with listening(fake, cap=3) as lst:
            oldest = await TcpClient.open(lst.port)
            assert (await oldest.ask("a.test.")).answer  # used once, now idle
            working = await TcpClient.open(lst.port)
            await working.send(SLOW)  # busy: never evicted
            await until(lambda: fake.started == 1)
            idle = await TcpClient.open(lst.port)
            await until(lambda: lst.tcp_connections == 3)

            newcomer = await TcpClient.open(lst.port)
            assert (await newcomer.ask("a.test.")).answer
            assert await oldest.closed_by_server()
            assert lst.tcp_evicted == 1 and lst.tcp_connections == 3

            # Next: the oldest idle one is now `idle` (`working` is skipped, it is busy).
            another = await TcpClient.open(lst.port)
            assert (await another.ask("a.test.")).answer
            assert await idle.closed_by_server()
            assert not await working.closed_by_server(0.2)
            fake.release.set()
            assert (await working.answer()).answer
            assert lst.tcp_evicted == 2 and lst.tcp_refused == 0
            for c in (oldest, working, idle, newcomer, another):
                c.close()

    run(test)


def test_whole_connection_deadline_ends_a_connection_that_keeps_asking() -> None:
    async def test() -> None:
        async with listening(FakePipeline(), idle=0.4, lifetime=0.6) as lst:
            client = await TcpClient.open(lst.port)
            loop = asyncio.get_running_loop()
            start = loop.time()
            answered = 0
            # A query every 0.1 s: the idle timer never fires, only the deadline can end it.
            while loop.time() - start < 3.0:
                try:
                    await client.ask("a.test.")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                answered += 1
                await asyncio.sleep(0.1)
            lasted = loop.time() - start
            assert answered >= 3  # positive twin: it was served until the deadline
            assert 0.5 <= lasted < 1.5, lasted
            assert lst.tcp_connections == 0
            client.close()

    run(test)


def test_a_trickled_message_gets_one_timer_not_one_per_read() -> None:
    async def test() -> None:
        async with listening(FakePipeline(), idle=1.0, lifetime=30.0) as lst:
            client = await TcpClient.open(lst.port)
            loop = asyncio.get_running_loop()
            start = loop.time()
            # The length header a byte at a time (the second one 0.8 s later), then the
            # body a byte every 0.1 s: one timer for the whole message ends it at ~1.0 s;
            # a timer per read would let it run to 0.8 + 1.0 s and beyond.
            client.writer.write(struct.pack("!H", 200)[:1])
            await asyncio.sleep(0.8)
            client.writer.write(struct.pack("!H", 200)[1:])
            closed = False
            while loop.time() - start < 4.0:
                try:
                    client.writer.write(b"\0")
                    await client.writer.drain()
                except ConnectionError:
                    closed = True
                    break
                if await client.closed_by_server(0.1):
                    closed = True
                    break
            lasted = loop.time() - start
            assert closed and 0.9 <= lasted < 1.5, lasted
            assert lst.tcp_connections == 0
            client.close()

    run(test)
