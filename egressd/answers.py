"""What an upstream answer grants: the CNAME chain from the question and its addresses.

Only records on the chain that starts at the queried name count. Anything else an upstream
puts in the answer section (addresses for unrelated names, say) is dropped from the reply,
so the agent is never handed an address that was not granted.

``Address`` is the one shape an address has from the answer to the grant: the cache keeps
the answer's, a hit ages them, and ``firewall.base.entries_for`` turns one into set entries.
"""

from __future__ import annotations

from dataclasses import dataclass

from .allowlist import Labels
from .dnswire import Record, Response

MAX_CHAIN = 16  # CNAME hops followed; longer chains are cut (the reply keeps what was followed)
CLASS_IN = 1
TYPE_A, TYPE_CNAME, TYPE_AAAA = 1, 5, 28


@dataclass(frozen=True, slots=True)
class Address:
    ip: str
    family: int  # 4 or 6
    ttl: int  # seconds the answer gave it (what is left of it, for a cache hit)


@dataclass(frozen=True, slots=True)
class Answer:
    chain: tuple[Labels, ...]  # queried name first, then each CNAME target
    records: tuple[Record, ...]  # answer-section records on the chain, in order
    addresses: tuple[Address, ...]

    @property
    def min_ttl(self) -> int | None:
        return min((r.ttl for r in self.records), default=None)

    def without(self, drop: set[str]) -> Answer:
        """The answer without the A/AAAA records (and addresses) of ``drop``."""
        return Answer(
            self.chain,
            tuple(
                r
                for r in self.records
                if r.rtype not in (TYPE_A, TYPE_AAAA) or r.address not in drop
            ),
            tuple(a for a in self.addresses if a.ip not in drop),
        )


def extract(response: Response) -> Answer:
    """Follow the CNAME chain from the question's name and collect its records and A/AAAA."""
    by_name: dict[Labels, list[Record]] = {}
    for r in response.answer:
        if r.rclass == CLASS_IN:
            by_name.setdefault(r.owner, []).append(r)
    current = response.labels
    chain = [current]
    kept: list[Record] = []
    addresses: list[Address] = []
    seen = {current}
    for _ in range(MAX_CHAIN + 1):
        target: Labels | None = None
        for r in by_name.get(current, ()):
            kept.append(r)
            if r.rtype == TYPE_CNAME:
                if target is None:
                    target = r.target
            elif r.rtype == TYPE_A:
                addresses.append(Address(r.address, 4, r.ttl))
            elif r.rtype == TYPE_AAAA:
                addresses.append(Address(r.address, 6, r.ttl))
        if target is None or target in seen or len(chain) > MAX_CHAIN:
            break
        seen.add(target)
        chain.append(target)
        current = target
    return Answer(tuple(chain), tuple(kept), tuple(addresses))
