"""The host's own addresses, from netlink (pyroute2 ``AsyncIPRoute``, an RTM_GETADDR dump).

The rebinding guard (egressd.rebind) never grants an answer that points at this host, public
addresses included: a service that listens on all addresses is reachable through each. The
dump is cheap (one netlink round trip, a few messages per interface), so the daemon repeats
it every second and an address that appears later (DHCP, a new container bridge, SLAAC) is
covered within a second.
"""

from __future__ import annotations

import ipaddress

from .errors import EgressdError
from .netlinklib import AsyncIPRoute, NetlinkError
from .rebind import IPAddress


class LocalAddressError(EgressdError):
    """Could not list the host's addresses."""


def normalise(text: str) -> IPAddress | None:
    """An address from netlink as an ipaddress object (no %zone), or None if unparsable."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


class LocalAddresses:
    """Lists every address assigned to an interface of this network namespace."""

    def __init__(self) -> None:
        self._ipr: AsyncIPRoute | None = None

    async def _socket(self) -> AsyncIPRoute:
        if self._ipr is None:
            ipr = AsyncIPRoute()
            try:
                await ipr.setup_endpoint()
            except (OSError, NetlinkError) as err:
                ipr.close()
                raise LocalAddressError(f"cannot open the rtnetlink socket: {err}") from err
            self._ipr = ipr
        return self._ipr

    async def dump(self) -> frozenset[IPAddress]:
        ipr = await self._socket()
        found: set[IPAddress] = set()
        try:
            async for msg in await ipr.addr("dump"):
                # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
                # point-to-point link, and the same as IFA_LOCAL elsewhere (IPv6 has no LOCAL).
                for key in ("local", "address"):
                    text = msg.get(key)
                    addr = normalise(text) if isinstance(text, str) else None
                    if addr is not None:
                        found.add(addr)
                        break
        except (OSError, NetlinkError) as err:
            await self.close()  # a fresh socket next time
            raise LocalAddressError(f"rtnetlink address dump failed: {err}") from err
        return frozenset(found)

    async def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
