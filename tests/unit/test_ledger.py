"""Grant arithmetic (egressd.ledger). Time is passed in explicitly; nothing sleeps."""

from __future__ import annotations

import pytest

from egressd.config import GrantSettings
from egressd.ledger import Ledger, Write, grant_timeout

G = GrantSettings(floor=300, ceiling=86400, grace=60, maxelem=65536)
S4 = "egressd-agent-v4"
S6 = "egressd-agent-v6"


# --- grant_timeout ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        (0, 360),  # floor + grace, never 0 (ipset: 0 = permanent)
        (-5, 360),
        (1, 360),
        (299, 360),
        (300, 360),
        (301, 361),
        (3600, 3660),
        (86400, 86460),
        (86401, 86460),  # ceiling
        (10**9, 86460),
    ],
)
def test_grant_timeout_clamps(ttl: int, expected: int) -> None:
    assert grant_timeout(ttl, G) == expected


def test_grant_timeout_never_zero() -> None:
    tight = GrantSettings(floor=1, ceiling=1, grace=0, maxelem=128)
    for ttl in (0, 1, 5, 10**6):
        assert grant_timeout(ttl, tight) == 1


def test_grant_timeout_grace_zero() -> None:
    assert grant_timeout(500, GrantSettings(floor=300, ceiling=400, grace=0)) == 400


# --- plan ------------------------------------------------------------------------------------


def test_plan_new_addresses() -> None:
    led = Ledger()
    writes = led.plan([(S4, 4, "192.0.2.1", 100), (S6, 6, "2001:db8::1", 1000)], G, now=50.0)
    assert writes == [Write(S4, 4, "192.0.2.1", 360), Write(S6, 6, "2001:db8::1", 1060)]


def test_plan_skips_when_remaining_is_long_enough() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 360)], now=0.0)
    # want = 360; slack = 30: skipped while remaining >= 330
    assert led.plan([(S4, 4, "192.0.2.1", 0)], G, now=0.0) == []
    assert led.plan([(S4, 4, "192.0.2.1", 0)], G, now=30.0) == []  # remaining 330
    assert led.plan([(S4, 4, "192.0.2.1", 0)], G, now=30.5) == [Write(S4, 4, "192.0.2.1", 360)]


def test_plan_skip_threshold_uses_half_the_grace() -> None:
    g = GrantSettings(floor=300, ceiling=86400, grace=61)  # grace // 2 == 30
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 331)], now=0.0)  # remaining 331 = want(361) - 30
    assert led.plan([(S4, 4, "192.0.2.1", 0)], g, now=0.0) == []
    assert led.plan([(S4, 4, "192.0.2.1", 0)], g, now=1.0) != []


def test_plan_writes_when_new_ttl_is_longer() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 360)], now=0.0)
    assert led.plan([(S4, 4, "192.0.2.1", 3600)], G, now=10.0) == [Write(S4, 4, "192.0.2.1", 3660)]


def test_plan_never_shortens_an_existing_grant() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 86460)], now=0.0)
    # a much shorter answer later: either no write, or a write of at least what is left
    for now in (0.0, 1000.0, 50000.0, 86000.0, 86100.5):
        remaining = led.remaining(S4, "192.0.2.1", now)
        for w in led.plan([(S4, 4, "192.0.2.1", 5)], G, now):
            assert w.timeout >= remaining


@pytest.mark.parametrize(
    "settings",
    [
        G,
        GrantSettings(floor=1, ceiling=10, grace=0),
        GrantSettings(floor=990, ceiling=990, grace=41),
    ],
)
def test_plan_rule_over_a_grid(settings: GrantSettings) -> None:
    """Skip exactly when remaining >= want - grace//2; otherwise write max(want, remaining)."""
    slack = settings.grace // 2
    for left in (0, 1, 9, 299, 330, 359, 360, 999, 1010, 1030, 5000, 90000):
        for ttl in (0, 5, 300, 1000, 86400, 10**6):
            for now in (0.0, 0.5):
                led = Ledger()
                led.load(S4, [("192.0.2.1", left)], now=0.0)
                have = led.remaining(S4, "192.0.2.1", now)
                want = grant_timeout(ttl, settings)
                writes = led.plan([(S4, 4, "192.0.2.1", ttl)], settings, now)
                if have >= want - slack:
                    assert writes == [], (left, ttl, now)
                else:
                    assert len(writes) == 1, (left, ttl, now)
                    assert writes[0].timeout >= want
                    assert writes[0].timeout >= have  # never shorter than what is left


def test_plan_deduplicates_keeping_the_longest() -> None:
    led = Ledger()
    writes = led.plan(
        [
            (S4, 4, "192.0.2.1", 10),
            (S4, 4, "192.0.2.1", 5000),
            (S4, 4, "192.0.2.1", 400),
            (S4, 4, "192.0.2.2", 400),
        ],
        G,
        now=0.0,
    )
    assert writes == [Write(S4, 4, "192.0.2.1", 5060), Write(S4, 4, "192.0.2.2", 460)]


def test_plan_deduplicates_longest_first() -> None:
    writes = Ledger().plan([(S4, 4, "192.0.2.1", 5000), (S4, 4, "192.0.2.1", 10)], G, now=0.0)
    assert writes == [Write(S4, 4, "192.0.2.1", 5060)]


def test_plan_sets_are_independent() -> None:
    led = Ledger()
    other = "egressd-build-v4"
    led.commit([Write(S4, 4, "192.0.2.1", 5000)], now=0.0)
    writes = led.plan([(S4, 4, "192.0.2.1", 0), (other, 4, "192.0.2.1", 0)], G, now=1.0)
    assert writes == [Write(other, 4, "192.0.2.1", 360)]


def test_plan_does_not_change_the_ledger() -> None:
    led = Ledger()
    led.plan([(S4, 4, "192.0.2.1", 100)], G, now=0.0)
    assert led.remaining(S4, "192.0.2.1", 0.0) == 0.0
    assert led.live(S4, 0.0) == 0


# --- commit / load / remaining / live / prune / forget -----------------------------------------


def test_commit_and_remaining() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 360)], now=100.0, qname="www.example.com")
    assert led.remaining(S4, "192.0.2.1", 100.0) == 360.0
    assert led.remaining(S4, "192.0.2.1", 400.0) == 60.0
    assert led.remaining(S4, "192.0.2.1", 460.0) == 0.0
    assert led.remaining(S4, "192.0.2.1", 10_000.0) == 0.0
    assert led.remaining(S4, "192.0.2.9", 100.0) == 0.0
    assert led.remaining(S6, "192.0.2.1", 100.0) == 0.0
    assert led.names[(S4, "192.0.2.1")] == "www.example.com"


def test_commit_never_shortens() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 1000)], now=0.0)
    led.commit([Write(S4, 4, "192.0.2.1", 10)], now=5.0)
    assert led.remaining(S4, "192.0.2.1", 5.0) == 995.0
    led.commit([Write(S4, 4, "192.0.2.1", 2000)], now=5.0)
    assert led.remaining(S4, "192.0.2.1", 5.0) == 2000.0


def test_commit_records_latest_name_only_when_given() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 10)], now=0.0, qname="a.example")
    led.commit([Write(S4, 4, "192.0.2.1", 10)], now=0.0)
    assert led.names[(S4, "192.0.2.1")] == "a.example"
    led.commit([Write(S4, 4, "192.0.2.1", 10)], now=0.0, qname="b.example")
    assert led.names[(S4, "192.0.2.1")] == "b.example"


def test_load_takes_over_kernel_entries() -> None:
    led = Ledger()
    led.load(S4, [("192.0.2.1", 100), ("192.0.2.2", 5)], now=1000.0)
    assert led.remaining(S4, "192.0.2.1", 1000.0) == 100.0
    assert led.remaining(S4, "192.0.2.2", 1003.0) == 2.0
    led.load(S4, [("192.0.2.1", 10)], now=1000.0)  # never shortens either
    assert led.remaining(S4, "192.0.2.1", 1000.0) == 100.0
    assert led.plan([(S4, 4, "192.0.2.1", 0)], GrantSettings(floor=60, grace=0), now=1000.0) == []


def test_live_and_prune() -> None:
    led = Ledger()
    led.commit(
        [Write(S4, 4, "192.0.2.1", 10), Write(S4, 4, "192.0.2.2", 100)], now=0.0, qname="x.example"
    )
    led.commit([Write(S6, 6, "2001:db8::1", 50)], now=0.0)
    assert led.live(S4, 0.0) == 2
    assert led.live(S4, 10.0) == 1  # expiry 10 is not live at 10
    assert led.live(S6, 10.0) == 1
    assert led.live("egressd-none-v4", 0.0) == 0
    assert led.prune(9.0) == 0
    assert led.prune(10.0) == 1
    assert (S4, "192.0.2.1") not in led.names
    assert (S4, "192.0.2.2") in led.names
    assert led.prune(10.0) == 0
    assert led.prune(1000.0) == 2
    assert led.live(S4, 0.0) == 0 and led.live(S6, 0.0) == 0
    assert led.names == {}


def test_forget_one_set() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 100)], now=0.0, qname="a.example")
    led.commit([Write(S6, 6, "2001:db8::1", 100)], now=0.0, qname="a.example")
    led.forget(S4)
    assert led.remaining(S4, "192.0.2.1", 0.0) == 0.0
    assert led.remaining(S6, "2001:db8::1", 0.0) == 100.0
    assert list(led.names) == [(S6, "2001:db8::1")]
    # forgotten: the next answer writes again
    assert led.plan([(S4, 4, "192.0.2.1", 100)], G, 0.0) == [Write(S4, 4, "192.0.2.1", 360)]


def test_forget_everything() -> None:
    led = Ledger()
    led.commit(
        [Write(S4, 4, "192.0.2.1", 100), Write(S6, 6, "2001:db8::1", 100)],
        now=0.0,
        qname="a.example",
    )
    led.forget()
    assert led.live(S4, 0.0) == 0 and led.live(S6, 0.0) == 0
    assert led.names == {}


def test_plan_commit_cycle() -> None:
    """What the pipeline does: plan, write, commit; a repeat answer then costs nothing."""
    led = Ledger()
    grants = [(S4, 4, "192.0.2.1", 60), (S6, 6, "2001:db8::1", 60)]
    first = led.plan(grants, G, now=0.0)
    assert len(first) == 2
    led.commit(first, now=0.0)
    assert led.plan(grants, G, now=0.0) == []
    assert led.plan(grants, G, now=29.0) == []
    # past the slack the grants are re-armed
    again = led.plan(grants, G, now=31.0)
    assert [w.timeout for w in again] == [360, 360]
