"""What an upstream answer grants: the CNAME chain from the question and its addresses.

Only records on the chain that starts at the queried name count. Anything else an upstream
puts in the answer section (addresses for unrelated names, say) is dropped from the reply,
so the agent is never handed an address that was not granted.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset

MAX_CHAIN = 16  # CNAME hops followed; longer chains are cut (the reply keeps what was followed)


@dataclass(frozen=True, slots=True)
class Address:
    ip: str
    ttl: int
    family: int  # 4 or 6


@dataclass(frozen=True, slots=True)
class Answer:
    chain: tuple[dns.name.Name, ...]  # queried name first, then each CNAME target
    rrsets: tuple[dns.rrset.RRset, ...]  # answer-section rrsets on the chain, in order
    addresses: tuple[Address, ...]

    @property
    def min_ttl(self) -> int | None:
        ttls = [r.ttl for r in self.rrsets]
        return min(ttls) if ttls else None


def extract(response: dns.message.Message, qname: dns.name.Name) -> Answer:
    """Follow the CNAME chain from ``qname`` and collect the rrsets and A/AAAA on it."""
    by_name: dict[dns.name.Name, list[dns.rrset.RRset]] = {}
    for rrset in response.answer:
        if rrset.rdclass != dns.rdataclass.IN:
            continue
        by_name.setdefault(rrset.name, []).append(rrset)

    chain = [qname]
    kept: list[dns.rrset.RRset] = []
    addresses: list[Address] = []
    seen = {qname}
    current = qname
    for _ in range(MAX_CHAIN + 1):
        target: dns.name.Name | None = None
        for rrset in by_name.get(current, ()):
            kept.append(rrset)
            if rrset.rdtype == dns.rdatatype.CNAME and target is None and len(rrset) > 0:
                target = rrset[0].target
            elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                family = 4 if rrset.rdtype == dns.rdatatype.A else 6
                addresses.extend(Address(rd.address, rrset.ttl, family) for rd in rrset)
        if target is None or target in seen or len(chain) > MAX_CHAIN:
            break
        seen.add(target)
        chain.append(target)
        current = target
    return Answer(chain=tuple(chain), rrsets=tuple(kept), addresses=tuple(addresses))
