"""Ruleset change events: the kernel's nf_tables multicast, turned into an asyncio.Event.

On hosts whose iptables is the nft backend (Debian 12, Ubuntu 22.04+, Fedora, RHEL 9),
iptables rules are nf_tables objects, and the kernel multicasts every committed ruleset
change (a rule, chain or table added or deleted, `nft flush ruleset`) to the
NETLINK_NETFILTER group NFNLGRP_NFTABLES of the network namespace. egressd listens, so a
foreign flush is repaired in a fraction of a second instead of at the next periodic verify.

Nothing is parsed: any datagram means "something changed, verify now". Listing rules
(`iptables -S`) commits nothing and sends nothing, so a verify that finds nothing to repair
does not wake the watch again. ipset has no such events; sets are checked on the periodic
path. Where events are not available (legacy xtables backend, no nf_tables), the daemon
polls instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Iterable

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
# A whole `nft flush ruleset` on a busy host is one message per table plus one per
# generation; a roomy buffer keeps overruns rare, and an overrun is handled anyway.
RCVBUF = 1 << 20
_TOOLS = {4: "iptables", 6: "ip6tables"}


async def nft_backend(families: Iterable[int]) -> str | None:
    """None when every family's iptables is the nf_tables backend, else why not."""
    for family in families:
        tool = _TOOLS[family]
        try:
            proc = await asyncio.create_subprocess_exec(
                tool,
                "--version",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as err:
            return f"cannot run {tool}: {err}"
        out, _ = await proc.communicate()
        version = out.decode(errors="replace").strip()
        if proc.returncode != 0 or "nf_tables" not in version:
            return f"{tool} is not the nf_tables backend ({version or 'no version'})"
    return None


class RulesetWatch:
    """Sets `changed` whenever the kernel reports an nf_tables ruleset change."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.why_not: str | None = "not started"  # why events are not available, if so
        self._first: float | None = None  # monotonic time of the first event not yet taken
        self._sock: socket.socket | None = None

    @property
    def active(self) -> bool:
        return self._sock is not None

    async def start(self, families: Iterable[int]) -> bool:
        """Subscribe in the current network namespace; False (and why_not) means poll."""
        why = await nft_backend(families)
        if why is None:
            try:
                self._sock = self._open()
            except OSError as err:
                why = f"cannot subscribe to nf_tables events: {err}"
        if self._sock is not None:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)
        self.why_not = why
        return why is None

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                sock.recv(65536)  # the content does not matter; drain the queue
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    # Overrun: events were lost, so at least one change happened.
                    self._mark()
                    continue
                # The socket is broken: stop listening (the daemon polls from now on),
                # but verify once, since we cannot tell what we missed.
                self.why_not = f"nf_tables event socket failed: {err}"
                self.close()
                self._mark()
                return
            self._mark()

    def _mark(self) -> None:
        if self._first is None:
            self._first = time.monotonic()
        self.changed.set()

    def take(self) -> float | None:
        """Consume the pending events; returns the monotonic time of the first one."""
        first, self._first = self._first, None
        self.changed.clear()
        return first

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
