"""UDP and TCP DNS listeners on 127.0.0.1 and ::1, one port per profile.

Thin asyncio adapters around ``Pipeline.handle``: they bound the queries in flight, cap
TCP connections and close idle ones, and never let one bad message end a listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from collections.abc import Awaitable, Callable

import dns.message

from . import replies
from .stats import Stats

Handler = Callable[[bytes, int, str], Awaitable[dns.message.Message | None]]

MAX_TCP_MESSAGE = 65535


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment,unused-ignore]

    def datagram_received(
        self, data: bytes, addr: tuple[str, int] | tuple[str, int, int, int]
    ) -> None:
        lst = self.listener
        if lst.inflight >= lst.max_inflight:
            lst.stats.dropped_busy += 1  # the client retries; better than queueing forever
            return
        lst.spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[str, int] | tuple[str, int, int, int]) -> None:
        reply = await self.listener.handler(data, self.listener.port, f"udp:{addr[0]}:{addr[1]}")
        if reply is None or self.transport is None or self.transport.is_closing():
            return
        self.transport.sendto(replies.to_wire(reply, replies.udp_limit(reply)), addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for replies to vanished clients: nothing to do.
        pass


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
        ipv6: bool = True,
    ) -> None:
        self.port = port
        self.handler = handler
        self.stats = stats
        self.max_inflight = max_inflight
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_max_connections = tcp_max_connections
        self.ipv6 = ipv6
        self.inflight = 0
        self.tcp_connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []

    @property
    def addresses(self) -> list[str]:
        out = [f"127.0.0.1:{self.port}"]
        if self.ipv6:
            out.append(f"[::1]:{self.port}")
        return out

    def spawn(self, coro: Awaitable[None]) -> None:
        self.inflight += 1
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight -= 1
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug must not end the listener; the query simply goes unanswered.
            self.stats.malformed += 1

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        hosts = [("127.0.0.1", socket.AF_INET)]
        if self.ipv6:
            hosts.append(("::1", socket.AF_INET6))
        try:
            for host, family in hosts:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
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
                transport, _ = await loop.create_datagram_endpoint(lambda: _UDP(self), sock=sock)
                self._udp.append(transport)
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
        if self.tcp_connections >= self.tcp_max_connections:
            writer.close()
            return
        self.tcp_connections += 1
        peer = writer.get_extra_info("peername") or ("?", 0)
        try:
            while True:
                # Several messages may come on one connection; each is answered in turn.
                async with asyncio.timeout(self.tcp_idle_timeout):
                    header = await reader.readexactly(2)
                    (length,) = struct.unpack("!H", header)
                    data = await reader.readexactly(length)
                self.inflight += 1
                try:
                    reply = await self.handler(data, self.port, f"tcp:{peer[0]}:{peer[1]}")
                finally:
                    self.inflight -= 1
                if reply is None:
                    break  # malformed: drop the connection
                wire = replies.to_wire(reply)
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.tcp_connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self, grace: float = 0.0) -> None:
        for t in self._udp:
            t.close()
        for s in self._tcp:
            s.close()
        self._udp.clear()
        self._tcp.clear()
        if self._tasks and grace > 0:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
