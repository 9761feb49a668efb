"""Forwarding to upstream resolvers, on plain sockets.

The upstream query is rebuilt from the question alone: name, type, class IN, RD and
egressd's own EDNS. Nothing else of the client's message (its EDNS options, additional or
authority records, other questions, id) ever leaves the host.

Every UDP try has a socket of its own, connect()ed to the server: the kernel then picks a
random source port and drops datagrams from any other address or port, so an off-path
spoofer has to guess 16 bits of port and 16 bits of id (`secrets`, read in bulk by
`QueryIds`) per query, as with dnspython before. Of what arrives, only the first
datagram with QR set, the id and the question of the query counts; the rest is dropped
and the wait goes on. The caller gets the answer as bytes; parsing it is dnswire's job.

Identical questions in flight share one upstream resolution: a burst of clients asking
the same name costs one upstream query (and one socket), not one each.

How long each resolution took until an answer is counted in fixed buckets (`Latency`), for
the metrics: one clock read at each end, a bisect and two additions per upstream answer.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
import time
from bisect import bisect_left
from dataclasses import dataclass

from .config import Upstream
from .dnswire import OUR_PAYLOAD
from .errors import UpstreamError

Labels = tuple[bytes, ...]  # as egressd.allowlist.Labels: lower-cased, leftmost first

_TC, _RD = 0x02, 0x0100  # TC in the third octet; RD in the flags word
_SERVFAIL, _REFUSED = 2, 5
_CLASS_IN = 1
# The OPT record: root owner, type 41, class = our payload, TTL 0 (extended rcode 0,
# version 0, DO clear), no options.
_OPT = b"\x00" + struct.pack("!HHIH", 41, OUR_PAYLOAD, 0, 0)
_HEADER = struct.Struct("!HHHHHH")
_MAX_UDP = 65535  # we ask for 1232, but a server may send more; recv must not cut it


def name_wire(labels: Labels) -> bytes:
    """The name in uncompressed wire form (ValueError if it is not a valid DNS name)."""
    parts = []
    for label in labels:
        if not 0 < len(label) < 64:
            raise ValueError(f"bad label length {len(label)} in {labels!r}")
        parts.append(len(label).to_bytes(1, "big") + label)
    parts.append(b"\x00")
    wire = b"".join(parts)
    if len(wire) > 255:
        raise ValueError(f"name longer than 255 octets: {labels!r}")
    return wire


def build_query(qid: int, labels: Labels, qtype: int, rd: bool) -> bytes:
    """The upstream query: RD as given, one IN question, EDNS0 with payload 1232, no
    options, DO clear (byte for byte what dnspython's make_query renders for this)."""
    return _Question(name_wire(labels), struct.pack("!HH", qtype, _CLASS_IN), rd).query(qid)


def _header(qid: int, rd: bool) -> bytes:
    return _HEADER.pack(qid, _RD if rd else 0, 1, 0, 0, 1)


def is_answer(wire: bytes, qid: bytes, name: bytes, typeclass: bytes) -> bool:
    """Is *wire* a response to our query (id *qid*, question *name* + *typeclass*)?

    QR set, opcode QUERY, the id, exactly one question: the name compared case-insensitively
    (ASCII only; length octets are below 64, so lower() leaves them alone), type and class
    exactly. *name* must be lower-cased already.
    """
    end = 12 + len(name)
    return (
        wire[:2] == qid
        and len(wire) >= end + 4
        and wire[2] & 0xF8 == 0x80  # QR=1, opcode 0
        and wire[4:6] == b"\x00\x01"
        and wire[end : end + 4] == typeclass
        and wire[12:end].lower() == name
    )


# Upper bounds (seconds) of the latency buckets: a cached upstream answers within a
# millisecond or two, a recursive one in tens to hundreds, a failover after a whole
# upstream_timeout (1 to 5 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Latency:
    """Time from asking to an answer, per upstream resolution, in fixed buckets.

    A plain list of counts, not a prometheus_client Histogram: this is on the path of
    every query that misses the cache, and a histogram's lock and label lookup cost
    several times the bisect. ``counts[i]`` counts answers in (bounds[i-1], bounds[i]]
    (not cumulative); the last one counts those above every bound. One instance
    outlives the resolvers a reload replaces, so the counts only grow.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # le: a bound counts as inside
        self.sum += seconds


class QueryIds:
    """Query ids from the kernel's random source (``secrets``), 2,048 per read.

    Each id is 16 bits of its own from the CSPRNG, never derived from another, as with
    ``secrets.randbits(16)`` per query; reading them in bulk saves a getrandom() system
    call per query.
    """

    __slots__ = ("_left",)

    BATCH = 2048

    def __init__(self) -> None:
        self._left: list[int] = []

    def next(self) -> int:
        if not self._left:
            self._left = memoryview(secrets.token_bytes(2 * self.BATCH)).cast("H").tolist()
        return self._left.pop()


class BadAnswer(Exception):
    """A TCP answer that does not answer the query (a failed try)."""


@dataclass(frozen=True, slots=True)
class _Target:
    upstream: Upstream
    family: socket.AddressFamily
    sockaddr: tuple[str, int]


class _Reask(Exception):
    """The first asker of a coalesced question was cancelled: the others ask again."""


@dataclass(slots=True)
class _Flight:
    """One upstream resolution, made by its first asker, and the others waiting for it."""

    # Made when a second asker joins (most questions have one asker, and a future whose
    # error nobody reads would be reported as "never retrieved").
    result: asyncio.Future[bytes] | None = None
    aborted: bool = False  # close() ended it: everybody gets an UpstreamError


@dataclass(frozen=True, slots=True)
class _Question:
    name: bytes  # wire form, lower-cased
    typeclass: bytes  # type and class IN, as on the wire
    rd: bool

    def query(self, qid: int) -> bytes:
        """The query message asking this question with id ``qid``."""
        return _header(qid, self.rd) + self.name + self.typeclass + _OPT


def _expire(fut: asyncio.Future[bytes], timeout: float) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError(f"no answer within {timeout:g} s"))


class UpstreamResolver:
    def __init__(
        self,
        servers: tuple[Upstream, ...],
        timeout: float,
        tries: int,
        latency: Latency | None = None,
    ) -> None:
        if not servers:
            raise ValueError("no upstream servers")
        self.servers = servers
        self.timeout = timeout
        self.tries = max(tries, 1)
        self.ignored = 0  # datagrams on our sockets that did not answer the query
        self.latency = Latency() if latency is None else latency
        self._preferred = 0  # index of the server that answered last
        self._targets = tuple(
            _Target(s, socket.AF_INET6 if ":" in s.address else socket.AF_INET, (s.address, s.port))
            for s in servers
        )
        self._inflight: dict[tuple[Labels, int, bool], _Flight] = {}
        # Open UDP sockets (with their future) and TCP streams, for close().
        self._udp: dict[socket.socket, asyncio.Future[bytes]] = {}
        self._tcp: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = QueryIds()

    async def resolve(self, labels: Labels, qtype: int, rd: bool) -> bytes:
        """The upstream's response message, validated; UpstreamError when none answered.

        The first caller asking a question resolves it itself, in its own task (no task
        of the resolver's: that took a task, a shield and two more turns of the event loop
        per query). Callers asking the same question meanwhile wait for its result and
        get the same bytes (or the same error). A waiter that is cancelled leaves the
        others waiting; if the first caller is cancelled, its resolution ends with it and
        the waiters ask again (one of them first now).
        """
        key = (labels, qtype, rd)
        while (flight := self._inflight.get(key)) is not None:
            try:
                return await self._join(flight)
            except _Reask:
                continue
        flight = self._inflight[key] = _Flight()
        # What the waiters get; if the first asker leaves any other way (cancelled, its
        # coroutine closed), they ask again.
        outcome: bytes | Exception = _Reask()
        try:
            outcome = await self._resolve(labels, qtype, rd, flight)
            return outcome
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if flight.aborted and current is not None and not current.cancelling():
                outcome = UpstreamError("upstream resolver closed")
                raise outcome from None
            raise
        except Exception as err:
            outcome = err
            raise
        finally:
            self._land(key, flight, outcome)

    async def _join(self, flight: _Flight) -> bytes:
        """Wait for another caller's resolution of the same question."""
        if flight.result is None:
            flight.result = asyncio.get_running_loop().create_future()
        try:
            # Shielded: a waiter's cancellation must not cancel the shared result.
            return await asyncio.shield(flight.result)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if flight.aborted and current is not None and not current.cancelling():
                raise UpstreamError("upstream resolver closed") from None
            raise

    def _land(self, key: tuple[Labels, int, bool], flight: _Flight, got: bytes | Exception) -> None:
        """The first caller's resolution ended: hand its outcome to the waiters."""
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        fut = flight.result
        if fut is None or fut.done():
            return
        if isinstance(got, bytes):
            fut.set_result(got)
        else:
            fut.set_exception(got)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody waits

    def close(self) -> None:
        """Abort every resolution in flight and close every socket still open."""
        for flight in self._inflight.values():
            flight.aborted = True
            if flight.result is not None and not flight.result.done():
                flight.result.cancel()
        self._inflight.clear()
        for sock, fut in list(self._udp.items()):
            fut.get_loop().remove_reader(sock.fileno())
            sock.close()
            fut.cancel()
        self._udp.clear()
        for writer in list(self._tcp):
            writer.close()
        self._tcp.clear()

    async def _resolve(self, labels: Labels, qtype: int, rd: bool, flight: _Flight) -> bytes:
        """Ask the servers in turn (per-try timeout, TCP on truncation) until one answers.

        SERVFAIL and REFUSED count as a failed try: another server may do better. If every
        try fails that way, the last such answer is returned (the client sees SERVFAIL).
        Each answer returned is counted in self.latency, failovers included: the time the
        client waited on the upstream.
        """
        began = time.monotonic()
        name = name_wire(labels)
        q = _Question(name.lower(), struct.pack("!HH", qtype, _CLASS_IN), rd)
        last_error: Exception | None = None
        last_bad: bytes | None = None
        n = len(self._targets)
        for attempt in range(max(self.tries, n)):
            if flight.aborted:  # close() (a TCP try it ended looks like a failed try)
                raise asyncio.CancelledError
            index = (self._preferred + attempt) % n
            target = self._targets[index]
            try:
                wire = await self._udp_try(target, q)
                if wire[2] & _TC:
                    wire = await self._tcp_try(target, q, flight)
            except (OSError, EOFError, BadAnswer) as err:
                last_error = err
                continue
            if wire[3] & 0x0F in (_SERVFAIL, _REFUSED):
                last_bad = wire
                continue
            self._preferred = index
            self.latency.observe(time.monotonic() - began)
            return wire
        if last_bad is not None:
            self.latency.observe(time.monotonic() - began)
            return last_bad
        raise UpstreamError(
            f"no answer from {', '.join(str(s) for s in self.servers)}: "
            f"{type(last_error).__name__}: {last_error}"
        )

    async def _udp_try(self, target: _Target, q: _Question) -> bytes:
        # The loop, kept: asyncio's own look-up costs a getpid() system call each time.
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        query = q.query(self._ids.next())
        sock = socket.socket(target.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        fd = sock.fileno()
        fut: asyncio.Future[bytes] = loop.create_future()
        self._udp[sock] = fut
        try:
            sock.connect(target.sockaddr)  # numeric address: no lookup
            sock.send(query)
            loop.add_reader(fd, self._readable, sock, fut, query[:2], q)
            timer = loop.call_later(self.timeout, _expire, fut, self.timeout)
            try:
                return await fut
            finally:
                timer.cancel()
        finally:
            # close() may have closed it already (and the fd number may be reused since).
            if self._udp.pop(sock, None) is not None:
                loop.remove_reader(fd)
                sock.close()

    def _readable(
        self, sock: socket.socket, fut: asyncio.Future[bytes], qid: bytes, q: _Question
    ) -> None:
        if fut.done():  # answered; the reader goes when the waiting coroutine resumes
            return
        while True:
            try:
                wire = sock.recv(_MAX_UDP)
            except BlockingIOError:
                return
            except OSError as err:  # an ICMP error (port unreachable): this try failed
                fut.set_exception(err)
                return
            if is_answer(wire, qid, q.name, q.typeclass):
                fut.set_result(wire)
                return
            self.ignored += 1

    async def _tcp_try(self, target: _Target, q: _Question, flight: _Flight) -> bytes:
        """The same question over TCP (after a truncated UDP answer; rare)."""
        query = q.query(self._ids.next())
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(*target.sockaddr)
            self._tcp.add(writer)
            try:
                if flight.aborted:  # close() came while it connected
                    raise asyncio.CancelledError
                writer.write(len(query).to_bytes(2, "big") + query)
                size = int.from_bytes(await reader.readexactly(2), "big")
                wire = await reader.readexactly(size)
            finally:
                self._tcp.discard(writer)
                writer.close()
        if not is_answer(wire, query[:2], q.name, q.typeclass):
            raise BadAnswer(f"TCP answer from {target.upstream} does not match the query")
        return wire
