"""The firewall backend interface: four verbs about egressd's policy, not about netfilter.

An nftables backend can come later behind the same verbs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from ..ledger import Write

# What install() found already granted in the kernel: set name -> entries (timeout = left).
Found = Mapping[str, Sequence[Write]]


class Firewall(Protocol):
    async def install(self, policy: object) -> Found:
        """Create sets (keeping existing entries) and atomically (re)place egressd's rules.

        Returns the grants found in existing sets so the ledger can take them over.
        Raises FirewallError; on failure the previously installed rules stay as they were.
        """
        ...

    async def allow(self, writes: Sequence[Write]) -> None:
        """Put addresses into sets; returns only once the kernel has acknowledged them."""
        ...

    async def revoke(self, writes: Sequence[Write]) -> None:
        """Take entries out of sets (a reload withdrew what justified them)."""
        ...

    async def verify(self, policy: object) -> list[str]:
        """Check rules and sets are in place; re-apply what is missing; say what was fixed."""
        ...

    async def uninstall(self) -> None:
        """Remove exactly what egressd added: its jump rules, chains and sets."""
        ...
