"""The ledger: what egressd has granted, per set and address, and until when.

ipset's ``add -exist`` *resets* an entry's timeout to the new value, so a shorter TTL seen
later would cut an earlier, longer grant short. The ledger remembers each grant's expiry so
that a new grant is ``max(already granted, new)`` and so that an address whose grant
already lasts long enough costs no kernel write at all.

Times are ``time.monotonic()`` seconds, passed in (``now``) so the arithmetic is testable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .config import GrantSettings


def grant_timeout(ttl: int, settings: GrantSettings) -> int:
    """Seconds an address stays allowed for one answer: TTL clamped to [floor, ceiling] + grace.

    Never 0: ipset treats a timeout of 0 as "permanent", and the floor is at least 1.
    """
    return max(settings.floor, min(ttl, settings.ceiling)) + settings.grace


@dataclass(frozen=True, slots=True)
class Write:
    """One kernel write: add ``ip`` to ``set_name`` with ``timeout`` seconds."""

    set_name: str
    family: int
    ip: str
    timeout: int


class Ledger:
    __slots__ = ("_expiry", "names")

    def __init__(self) -> None:
        self._expiry: dict[tuple[str, str], float] = {}
        # Which name granted an address last (for `ls`, blocked-flow attribution later).
        self.names: dict[tuple[str, str], str] = {}

    def remaining(self, set_name: str, ip: str, now: float) -> float:
        exp = self._expiry.get((set_name, ip))
        return 0.0 if exp is None else max(0.0, exp - now)

    def plan(
        self,
        grants: Iterable[tuple[str, int, str, int]],
        settings: GrantSettings,
        now: float,
    ) -> list[Write]:
        """Kernel writes needed for ``(set_name, family, ip, ttl)`` grants.

        An address is skipped when its current grant lasts at least the new one minus half
        the grace period: the address then stays allowed for the full clamped TTL anyway,
        with at least half the grace on top. The written timeout is never shorter than
        what is left of the current grant.
        """
        slack = settings.grace // 2
        out: dict[tuple[str, str], Write] = {}
        for set_name, family, ip, ttl in grants:
            want = grant_timeout(ttl, settings)
            have = self.remaining(set_name, ip, now)
            key = (set_name, ip)
            prev = out.get(key)
            if prev is not None and prev.timeout >= want:
                continue
            if have >= want - slack:
                continue
            out[key] = Write(set_name, family, ip, max(want, math.ceil(have)))
        return list(out.values())

    def commit(self, writes: Iterable[Write], now: float, qname: str = "") -> None:
        """Record writes the kernel has accepted."""
        for w in writes:
            key = (w.set_name, w.ip)
            self._expiry[key] = max(self._expiry.get(key, 0.0), now + w.timeout)
            if qname:
                self.names[key] = qname

    def load(self, set_name: str, entries: Iterable[tuple[str, int]], now: float) -> None:
        """Take over grants found in the kernel (after a restart), ``(ip, seconds left)``."""
        for ip, left in entries:
            key = (set_name, ip)
            self._expiry[key] = max(self._expiry.get(key, 0.0), now + left)

    def forget(self, set_name: str | None = None) -> None:
        """Drop knowledge of a set (it was flushed or re-created behind our back)."""
        if set_name is None:
            self._expiry.clear()
            self.names.clear()
            return
        for key in [k for k in self._expiry if k[0] == set_name]:
            del self._expiry[key]
            self.names.pop(key, None)

    def live(self, set_name: str, now: float) -> int:
        return sum(1 for (s, _), exp in self._expiry.items() if s == set_name and exp > now)

    def prune(self, now: float) -> int:
        """Forget expired grants; returns how many."""
        dead = [k for k, exp in self._expiry.items() if exp <= now]
        for k in dead:
            del self._expiry[k]
            self.names.pop(k, None)
        return len(dead)
