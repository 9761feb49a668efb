"""A TTL-respecting answer cache for allowed names (pure: time is passed in).

The cache owns what an answer becomes once it is kept: how long it may be kept (the
shortest TTL on the chain, the SOA of a negative answer, never a failure), the TTL
ceiling, what is left of its TTLs when it is served again, and its records' wire form. An
entry holds the already-filtered answer (the CNAME chain only), so a hit re-arms the
grants with the TTLs that are left and is served without touching the upstream or
dnspython.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

from . import dnswire
from .allowlist import Labels
from .answers import Address, Answer
from .dnswire import Record, Response

Key = tuple[str, Labels, int]  # (profile name, qname labels, qtype)

NEGATIVE_TTL_CAP = 300  # seconds a negative (NXDOMAIN/NODATA) answer is kept at most
NOERROR, NXDOMAIN = 0, 3
TYPE_SOA = 6


@dataclass(slots=True, eq=False)
class Entry:
    rcode: int
    answer: tuple[Record, ...]  # the chain's records, TTLs at most the ceiling
    authority: tuple[Record, ...]  # the SOA that makes a negative answer cacheable
    addresses: tuple[Address, ...]  # TTLs as stored
    chain: tuple[Labels, ...]  # the CNAME targets (the ledger keeps them per reason)
    stored: float
    ttl: int  # seconds the entry lives
    # Until when a hit needs no grant work at all: the kernel entries this answer wrote
    # (or found) last long enough for any TTL a later hit can ask for (the pipeline sets
    # it after each grant; 0: not granted yet).
    rearm_at: float = 0.0

    def addresses_at(self, age: int) -> tuple[Address, ...]:
        """The addresses with what is left of their TTLs ``age`` seconds after storing."""
        if not age:
            return self.addresses
        return tuple(Address(a.ip, a.family, max(0, a.ttl - age)) for a in self.addresses)

    def sections(self, age: int, qlabels: Labels) -> tuple[bytes, int, bytes, int]:
        """The answer and authority sections' wire form, TTLs lowered by ``age``."""
        return (
            b"".join(dnswire.record_wire(r, max(0, r.ttl - age), qlabels) for r in self.answer),
            len(self.answer),
            b"".join(dnswire.record_wire(r, max(0, r.ttl - age), qlabels) for r in self.authority),
            len(self.authority),
        )


def entry(response: Response, ans: Answer, now: float, ceiling: int) -> Entry:
    """What to keep of an answer (and serve now): its chain, TTLs capped at ``ceiling``.

    A client may cache an answer for its TTL; the grant lasts at most ceiling + grace, so
    a TTL above the ceiling would outlive the grant.
    """
    rcode = response.rcode
    authority = tuple(_capped(r, ceiling) for r in response.authority if r.rtype == TYPE_SOA)
    if ans.records:
        ttl = min(ans.min_ttl or 0, ceiling)
    else:
        # Negative answer: the SOA's TTL/minimum bounds how long it may be cached (RFC 2308).
        ttl = min((min(r.ttl, _soa_minimum(r)) for r in authority), default=0)
        ttl = min(ttl, NEGATIVE_TTL_CAP)
    if rcode not in (NOERROR, NXDOMAIN):
        ttl = 0  # never cache failures
    return Entry(
        rcode=rcode,
        answer=tuple(_capped(r, ceiling) for r in ans.records),
        authority=authority,
        addresses=ans.addresses,
        chain=ans.chain[1:],
        stored=now,
        ttl=ttl,
    )


def emptied(ans: Answer, rcode: int, now: float, ceiling: int) -> Entry:
    """The entry of an answer the rebinding guard took every address from: nothing left
    to reach (its CNAMEs lead nowhere), with ``rcode``, kept as long as the answer it
    stands for, like a negative one."""
    return Entry(
        rcode=rcode,
        answer=(),
        authority=(),
        addresses=(),
        chain=ans.chain[1:],
        stored=now,
        ttl=min(ans.min_ttl or 0, ceiling, NEGATIVE_TTL_CAP),
    )


def _soa_minimum(r: Record) -> int:
    # The SOA's rdata ends with serial, refresh, retry, expire, minimum (32 bits each).
    return int.from_bytes(r.rdata[-4:], "big") if len(r.rdata) >= 22 else 0


def _capped(r: Record, ceiling: int) -> Record:
    return r if r.ttl <= ceiling else replace(r, ttl=ceiling)


@dataclass(frozen=True, slots=True)
class Hit:
    entry: Entry
    age: int  # whole seconds since stored


class Cache:
    __slots__ = ("_data", "capacity", "epoch", "hits", "misses")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Key, Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.epoch = 0  # bumped by each clear(): what was served before is not to be reused

    def get(self, key: Key, now: float) -> Hit | None:
        e = self._data.get(key)
        if e is None:
            self.misses += 1
            return None
        age = int(now - e.stored)
        if age >= e.ttl:
            del self._data[key]
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return Hit(e, age)

    def put(self, key: Key, e: Entry) -> None:
        if self.capacity <= 0 or e.ttl <= 0:
            return
        self._data[key] = e
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()
        self.epoch += 1

    def __len__(self) -> int:
        return len(self._data)
