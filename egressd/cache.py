"""A TTL-respecting answer cache for allowed names (pure: time is passed in).

Entries hold the already-filtered answer (the CNAME chain only) and what it grants, so a
hit re-arms the grants with the TTLs that are left, without touching the upstream.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import dns.rrset

from .allowlist import Labels

Key = tuple[str, Labels, int]  # (profile name, qname labels, qtype)

NEGATIVE_TTL_CAP = 300  # seconds a negative (NXDOMAIN/NODATA) answer is kept at most


@dataclass(frozen=True, slots=True)
class Entry:
    rcode: int
    answer: tuple[dns.rrset.RRset, ...]
    authority: tuple[dns.rrset.RRset, ...]
    addresses: tuple[tuple[str, int, int], ...]  # (ip, family, ttl at store time)
    stored: float
    ttl: int  # seconds the entry lives
    chain: tuple[Labels, ...] = ()  # the CNAME targets (the ledger keeps them per reason)


@dataclass(frozen=True, slots=True)
class Hit:
    entry: Entry
    age: int  # whole seconds since stored


class Cache:
    __slots__ = ("_data", "capacity", "hits", "misses")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Key, Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Key, now: float) -> Hit | None:
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        age = int(now - entry.stored)
        if age >= entry.ttl:
            del self._data[key]
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return Hit(entry, age)

    def put(self, key: Key, entry: Entry) -> None:
        if self.capacity <= 0 or entry.ttl <= 0:
            return
        self._data[key] = entry
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def aged(rrsets: tuple[dns.rrset.RRset, ...], age: int) -> list[dns.rrset.RRset]:
    """Copies of cached rrsets with their TTLs lowered by ``age`` seconds."""
    out = []
    for rrset in rrsets:
        copy = rrset.copy()  # type: ignore[no-untyped-call]
        copy.ttl = max(0, rrset.ttl - age)
        out.append(copy)
    return out


def capped(rrset: dns.rrset.RRset, ceiling: int) -> dns.rrset.RRset:
    """The rrset itself, or a copy with its TTL lowered to ``ceiling``."""
    if rrset.ttl <= ceiling:
        return rrset
    copy: dns.rrset.RRset = rrset.copy()  # type: ignore[no-untyped-call]
    copy.ttl = ceiling
    return copy
