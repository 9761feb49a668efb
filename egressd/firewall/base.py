"""The firewall backend interface, and the one data type that crosses it.

The pipeline and the daemon depend on this module, never on a backend: an nftables backend
can come later behind the same verbs. ``Write`` is a set entry as the kernel holds it;
``entries_for`` is the one place that decides which set entries grant an address.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..config import set_name
from ..policy import Policy

TCP, UDP = 6, 17  # IP protocol numbers, as hash:ip,port entries carry them

Key = tuple[str, str, int, int]  # (set name, ip, proto, port); proto = port = 0: every port


@dataclass(frozen=True, slots=True)
class Write:
    """One set entry: ``ip`` in ``set_name`` for ``timeout`` seconds.

    ``proto``/``port`` are 0 for a hash:ip set (every port), else the entry of a
    hash:ip,port set (``ip,tcp:443``).
    """

    set_name: str
    family: int
    ip: str
    timeout: int
    proto: int = 0
    port: int = 0
    # The allowed name that justified the entry, kept in the kernel entry's comment, so
    # a restarted egressd still knows why it is there (and a reload can judge it).
    comment: str = field(default="", compare=False)

    @property
    def key(self) -> Key:
        return (self.set_name, self.ip, self.proto, self.port)


def entries_for(
    profile: str, ip: str, family: int, ports: Sequence[int], name: str = ""
) -> list[Write]:
    """The set entries (timeout 0, to be filled in) that grant ``ip`` on ``ports`` in the
    sets of the profile named ``profile``.

    No ports: one entry of the every-port set. Else one hash:ip,port entry per port and
    protocol (TCP and UDP). ``name`` (the allowed name) becomes the entries' comment.
    """
    if not ports:
        return [Write(set_name(profile, family, False), family, ip, 0, comment=name)]
    s = set_name(profile, family, True)
    return [Write(s, family, ip, 0, proto, port, name) for port in ports for proto in (TCP, UDP)]


def family_of(ip: str) -> int:
    return 6 if ":" in ip else 4


# What install() found already granted in the kernel: set name -> entries (timeout = left).
Found = Mapping[str, Sequence[Write]]


class Allower(Protocol):
    """The part of the firewall the query path uses."""

    async def allow(self, writes: Sequence[Write]) -> None:
        """Put addresses into sets; returns only once the kernel has acknowledged them."""
        ...


class Firewall(Allower, Protocol):
    families: tuple[int, ...]  # the IP versions enforced (4, and 6 where the host has it)

    async def install(self, policy: Policy) -> Found:
        """Create sets (keeping existing entries) and atomically (re)place egressd's rules.

        Returns the grants found in existing sets so the ledger can take them over.
        Raises FirewallError; on failure the previously installed rules stay as they were.
        """
        ...

    async def lock(self, policy: Policy) -> None:
        """Deny the policy's users everything (a start that cannot install stays closed)."""
        ...

    async def mark_clashes(self, policy: Policy) -> list[str]:
        """Other rules that write the conntrack mark bits egressd's rules rely on."""
        ...

    async def revoke(self, writes: Sequence[Write]) -> None:
        """Take entries out of sets (a reload withdrew what justified them)."""
        ...

    async def verify(self, policy: Policy, *, sets: bool = True) -> list[str]:
        """Check rules (and sets) are in place; re-apply what is missing; say what was fixed."""
        ...

    async def uninstall(self) -> None:
        """Remove exactly what egressd added: its jump rules, chains and sets."""
        ...

    async def close(self) -> None:
        """Release the backend's sockets (rules and sets stay: fail closed)."""
        ...
