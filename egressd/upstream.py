"""Forwarding to upstream resolvers.

The upstream query is rebuilt from the question alone: name, type, class IN, RD and
egressd's own EDNS. Nothing else of the client's message (its EDNS options, additional or
authority records, other questions, id) ever leaves the host. dnspython's asyncquery checks
that an answer matches the query (source, id, question) and drops the rest, so nobody can
feed egressd an answer by sending it UDP.
"""

from __future__ import annotations

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from .config import Upstream
from .errors import UpstreamError

OUR_PAYLOAD = 1232


def build_query(qname: dns.name.Name, qtype: int, rd: bool) -> dns.message.QueryMessage:
    q = dns.message.make_query(
        qname,
        dns.rdatatype.RdataType(qtype),
        dns.rdataclass.IN,
        use_edns=0,
        payload=OUR_PAYLOAD,
        want_dnssec=False,
    )
    if not rd:
        q.flags &= ~dns.flags.RD
    return q


class UpstreamResolver:
    def __init__(self, servers: tuple[Upstream, ...], timeout: float, tries: int) -> None:
        if not servers:
            raise ValueError("no upstream servers")
        self.servers = servers
        self.timeout = timeout
        self.tries = max(tries, 1)
        self._preferred = 0  # index of the server that answered last

    async def resolve(self, qname: dns.name.Name, qtype: int, rd: bool) -> dns.message.Message:
        """Ask the servers in turn (per-try timeout, TCP on truncation) until one answers.

        SERVFAIL and REFUSED count as a failed try: another server may do better. If every
        try fails that way, the last such answer is returned (the client sees SERVFAIL).
        """
        last_error: Exception | None = None
        last_bad: dns.message.Message | None = None
        n = len(self.servers)
        for attempt in range(max(self.tries, n)):
            index = (self._preferred + attempt) % n
            server = self.servers[index]
            query = build_query(qname, qtype, rd)
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(
                    query,
                    server.address,
                    timeout=self.timeout,
                    port=server.port,
                    ignore_unexpected=True,
                    ignore_errors=True,
                )
            except (dns.exception.DNSException, OSError, EOFError) as err:
                last_error = err
                continue
            if response.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                last_bad = response
                continue
            self._preferred = index
            return response
        if last_bad is not None:
            return last_bad
        raise UpstreamError(
            f"no answer from {', '.join(str(s) for s in self.servers)}: "
            f"{type(last_error).__name__}: {last_error}"
        )
