"""UDP and TCP DNS listeners on 127.0.0.1 and ::1, one port per profile.

Thin asyncio adapters around ``Pipeline.handle``: they bound the queries in flight, cap
TCP connections and never let one bad message end a listener. The agent must not be able
to take its own resolver away (docs/design.md, "Listener defences"):

- TCP: when a listener is full, a new connection closes the oldest idle one (no query in
  progress); one timer per message (trickling does not renew it), a whole-connection
  deadline, and a bounded write, so no client pins a slot.
- UDP: each readable event reads a bounded batch of datagrams; each query runs in the
  read callback until it has to wait, and only then becomes a task. At the bound of
  queries in flight, only what needs no waiting (blocked names, cache hits) is answered.
  Each profile's listener is served in turn, and a flood fills (and overflows) only its
  own socket's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Protocol

from .pipeline import udp_client
from .stats import Stats


class Handler(Protocol):
    """Pipeline.handle: the reply to one message (None: drop it)."""

    def __call__(
        self, wire: bytes, port: int, client: str, *, udp: bool, wait: bool
    ) -> Awaitable[bytes | None]: ...


# Pipeline.repeat: the reply to a repeat of a recent query, without reading it, or None.
Repeat = Callable[[bytes, int, tuple[Any, ...]], bytes | None]


MAX_TCP_MESSAGE = 65535
MAX_UDP_MESSAGE = 65535
UDP_BATCH = 64  # datagrams read per readable event of one socket
# The whole-connection deadline: a TCP client gets this long in all, however it paces its
# bytes; then the connection is closed after the reply in progress (if any). Generous for
# a stub resolver that reuses one connection for a burst of lookups.
TCP_LIFETIME = 30.0


@dataclass(eq=False, slots=True)
class _Conn:
    """One accepted TCP connection (identity-hashed: a key of the listener's table)."""

    writer: asyncio.StreamWriter
    busy: bool = False


class _UDP:
    """One UDP socket, read directly: every readable event drains up to UDP_BATCH datagrams.

    asyncio's datagram transport reads one datagram per readable event, a loop turn each;
    a flood of cheap (blocked, cached) queries costs less read in batches. The batch is
    bounded, so each profile's socket is served in turn.
    """

    def __init__(self, listener: Listener, sock: socket.socket) -> None:
        self.listener = listener
        self.sock = sock
        self.closed = False

    def readable(self) -> None:
        lst = self.listener
        sock = self.sock
        repeat = lst.repeat
        for _ in range(UDP_BATCH):
            try:
                data, addr = sock.recvfrom(MAX_UDP_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error of an earlier reply: nothing to do
            wire = repeat(data, lst.port, addr) if repeat is not None else None
            if wire is not None:
                self._send(wire, addr)
                continue
            client = udp_client(addr)
            # At the bound of queries in flight, only what needs no waiting is answered
            # (blocked names, refusals, cache hits): a blocked query never waits.
            lst.run(self._answer(data, addr, client, lst.inflight < lst.max_inflight))

    async def _answer(
        self,
        data: bytes,
        addr: tuple[str, int] | tuple[str, int, int, int],
        client: str,
        wait: bool,
    ) -> None:
        reply = await self.listener.handler(data, self.listener.port, client, udp=True, wait=wait)
        if reply is not None:
            self._send(reply, addr)

    def _send(self, reply: bytes, addr: tuple[str, int] | tuple[str, int, int, int]) -> None:
        if self.closed:
            return
        try:
            self.sock.sendto(reply, addr)
        except OSError:
            # A full send buffer (or a vanished client): the client retries.
            self.listener.stats.dropped_busy += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


class _Resumed:
    """Awaits a query coroutine that was started outside a task and stopped at `waiting`.

    Drives it exactly as a task would have: hands the task the future it stopped at,
    and when the task comes back (the future is done) sends it on, until it returns.
    An exception thrown in (a cancellation) is passed on to the coroutine.
    """

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: object) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, None, None]:
        waiting = self.waiting
        while True:
            try:
                yield waiting
            except BaseException as exc:  # noqa: BLE001 - the coroutine's to handle
                try:
                    waiting = self.coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                waiting = self.coro.send(None)
            except StopIteration:
                return


async def _resume(coro: Coroutine[Any, Any, None], waiting: object) -> None:
    await _Resumed(coro, waiting)


# Room for a burst of queries while the loop is busy (a package manager resolving hundreds
# of names at once): the default (~208 KiB) overflowed at ~1,700 fresh q/s with 200
# outstanding (measured: ~10 queries of 20,000 lost per run, Udp RcvbufErrors). 1 MiB holds
# about 1,300 queued datagrams, a few tens of ms of work; each profile has its own socket,
# so one profile's backlog never delays another's.
UDP_RCVBUF = 1 << 20


def _grow_receive_buffer(sock: socket.socket) -> None:
    # SO_RCVBUFFORCE (root) passes net.core.rmem_max; SO_RCVBUF is capped by it.
    for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, UDP_RCVBUF)
            return
        except OSError:
            continue


class Listener:
    """All sockets of one profile port (v4 + v6, UDP + TCP)."""

    def __init__(
        self,
        port: int,
        handler: Handler,
        stats: Stats,
        *,
        max_inflight: int,
        tcp_idle_timeout: float,
        tcp_max_connections: int,
        tcp_lifetime: float = TCP_LIFETIME,
        ipv6: bool = True,
        repeat: Repeat | None = None,
    ) -> None:
        self.port = port
        self.handler = handler
        self.repeat = repeat
        self.stats = stats
        self.max_inflight = max_inflight
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_max_connections = tcp_max_connections
        self.tcp_lifetime = tcp_lifetime
        self.ipv6 = ipv6
        self.inflight = 0
        # Open TCP connections, oldest first (a dict keeps insertion order).
        self._conns: dict[_Conn, None] = {}
        self.tcp_evicted = 0  # idle connections closed to make room for a new one
        self.tcp_refused = 0  # new connections refused: every slot had a query in progress
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._udp: list[_UDP] = []
        self._tcp: list[asyncio.Server] = []

    @property
    def addresses(self) -> list[str]:
        out = [f"127.0.0.1:{self.port}"]
        if self.ipv6:
            out.append(f"[::1]:{self.port}")
        return out

    @property
    def tcp_connections(self) -> int:
        return len(self._conns)

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a query's coroutine now, in this callback; a task only if it has to wait.

        A blocked, refused or cached answer never waits, and most of a flood is such
        answers: answering them here saves a task and a trip through the event loop's
        queue each, and keeps the ready queue short for the queries that do wait.
        (asyncio's eager task factory of Python 3.12 does the same.)
        """
        try:
            waiting = coro.send(None)
        except StopIteration:
            return  # answered without waiting
        except Exception:  # noqa: BLE001 - as in _done: a bug costs one answer
            self.stats.malformed += 1
            return
        self.spawn(_resume(coro, waiting))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.inflight += 1
        # The loop the listener started on: asyncio's own look-up costs a getpid() call.
        loop = self._loop
        task = loop.create_task(coro) if loop is not None else asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight -= 1
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug must not end the listener; the query simply goes unanswered.
            self.stats.malformed += 1

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        hosts = [("127.0.0.1", socket.AF_INET)]
        if self.ipv6:
            hosts.append(("::1", socket.AF_INET6))
        try:
            for host, family in hosts:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                _grow_receive_buffer(sock)
                try:
                    sock.bind((host, self.port))
                except OSError as err:
                    sock.close()
                    if family == socket.AF_INET6 and err.errno == errno.EADDRNOTAVAIL:
                        # IPv6 is off on loopback: there is no ::1 to redirect to either,
                        # so the users' IPv6 DNS simply fails (closed, not open).
                        self.ipv6 = False
                        continue
                    raise
                sock.setblocking(False)
                udp = _UDP(self, sock)
                self._udp.append(udp)
                loop.add_reader(sock.fileno(), udp.readable)
                server = await asyncio.start_server(
                    self._tcp_client,
                    host,
                    self.port,
                    family=family,
                    reuse_address=True,
                    limit=MAX_TCP_MESSAGE + 2,
                )
                self._tcp.append(server)
        except OSError:
            await self.close()
            raise

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= self.tcp_max_connections and not self._evict_idle():
            # Every slot has a query in progress: refuse the newcomer, keep the working ones.
            self.tcp_refused += 1
            writer.transport.abort()
            return
        conn = _Conn(writer)
        self._conns[conn] = None
        peer = writer.get_extra_info("peername") or ("?", 0)
        loop = asyncio.get_running_loop()
        # The whole-connection deadline: however the client paces its bytes (one every
        # idle_timeout - 1 s keeps the idle timer happy forever), its slot ends here.
        deadline = loop.time() + self.tcp_lifetime
        try:
            while loop.time() < deadline:
                # Several messages may come on one connection; each is answered in turn.
                # Header and body share one timer, so a message trickled a byte at a time
                # does not get a fresh timeout per read.
                async with asyncio.timeout_at(min(loop.time() + self.tcp_idle_timeout, deadline)):
                    header = await reader.readexactly(2)
                    (length,) = struct.unpack("!H", header)
                    data = await reader.readexactly(length)
                conn.busy = True  # not evicted while its query is being answered
                self.inflight += 1
                try:
                    wire = await self.handler(
                        data, self.port, f"tcp:{peer[0]}:{peer[1]}", udp=False, wait=True
                    )
                finally:
                    self.inflight -= 1
                if wire is None:
                    break  # malformed: drop the connection
                # A client that does not read its replies must not pin a busy slot either.
                async with asyncio.timeout(self.tcp_idle_timeout):
                    writer.write(struct.pack("!H", len(wire)) + wire)
                    await writer.drain()
                conn.busy = False
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._conns.pop(conn, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _evict_idle(self) -> bool:
        """Close the oldest connection with no query in progress; False if all are busy.

        As unbound does with a full TCP accept list: a newcomer is worth more than a slot
        held open by a client that sends nothing (or trickles), so holding connections
        cannot take the resolver away from the agent's next TCP query.
        """
        for conn in self._conns:  # insertion order: oldest first
            if not conn.busy:
                del self._conns[conn]
                self.tcp_evicted += 1
                # Its task wakes (EOF) and ends; the slot is free from now on.
                conn.writer.transport.abort()
                return True
        return False

    async def close(self, grace: float = 0.0) -> None:
        for u in self._udp:
            u.close()
        for s in self._tcp:
            s.close()
        self._udp.clear()
        self._tcp.clear()
        if self._tasks and grace > 0:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
