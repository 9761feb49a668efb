"""Pipeline.quick: the blocked path without dnspython says and counts what handle() does."""

from __future__ import annotations

import dns.edns
import dns.message
import pytest
from test_pipeline import rig


@pytest.mark.parametrize("blocked_rcode", ["nxdomain", "refused"])
@pytest.mark.parametrize("edns", [False, True])
@pytest.mark.parametrize("name", ["tracker.example", "ADS.example.com", "x.y.tracker.example"])
def test_quick_blocked_reply_event_and_counters_equal_the_full_paths(
    blocked_rcode: str, edns: bool, name: str
) -> None:
    q = dns.message.make_query(name, "AAAA", use_edns=0 if edns else None)
    full, fast = rig(blocked_rcode), rig(blocked_rcode)
    reply = full.ask(q.to_wire())
    assert reply is not None
    got = fast.pipeline.quick(q.to_wire(), 153, "udp:127.0.0.1:5555")
    assert got == reply.to_wire()
    assert fast.events == full.events and len(fast.events) == 1
    assert fast.stats == full.stats
    assert fast.log == [] and fast.resolver.calls == []


def test_quick_leaves_allowed_names_unknown_ports_and_unusual_queries_to_handle() -> None:
    r = rig()
    allowed = dns.message.make_query("www.example.com", "A").to_wire()
    assert r.pipeline.quick(allowed, 153) is None
    blocked = dns.message.make_query("tracker.example", "A").to_wire()
    assert r.pipeline.quick(blocked, 9999) is None  # no profile on this port
    with_option = dns.message.make_query("tracker.example", "A", use_edns=0)
    with_option.use_edns(0, options=[dns.edns.GenericOption(10, b"12345678")])
    assert r.pipeline.quick(with_option.to_wire(), 153) is None
    assert r.events == [] and r.stats.queries == 0
    assert r.pipeline.quick(blocked, 153) is not None  # positive twin
    assert r.stats.queries == r.stats.blocked == 1
