"""Grant arithmetic (egressd.ledger). Time is passed in explicitly; nothing sleeps."""

from __future__ import annotations

import pytest

from egressd.allowlist import Labels
from egressd.config import GrantSettings, Profile
from egressd.firewall.base import TCP, UDP, Key, Write, entries_for
from egressd.ledger import Ledger, Reason, grant_timeout

G = GrantSettings(floor=300, ceiling=86400, grace=60, maxelem=65536)
S4 = "egressd-agent-v4"
S6 = "egressd-agent-v6"


def E(set_name: str, family: int, ip: str, ttl: int) -> tuple[Write, int]:
    """One entry to grant (every port) with an answer's TTL, as the pipeline plans it."""
    return (Write(set_name, family, ip, 0), ttl)


def K(set_name: str, ip: str) -> Key:
    return (set_name, ip, 0, 0)


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
    writes = led.plan([E(S4, 4, "192.0.2.1", 100), E(S6, 6, "2001:db8::1", 1000)], G, now=50.0)
    assert writes == [Write(S4, 4, "192.0.2.1", 360), Write(S6, 6, "2001:db8::1", 1060)]


def test_plan_skips_when_remaining_is_long_enough() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 360)], now=0.0)
    # want = 360; slack = 30: skipped while remaining >= 330
    assert led.plan([E(S4, 4, "192.0.2.1", 0)], G, now=0.0) == []
    assert led.plan([E(S4, 4, "192.0.2.1", 0)], G, now=30.0) == []  # remaining 330
    assert led.plan([E(S4, 4, "192.0.2.1", 0)], G, now=30.5) == [Write(S4, 4, "192.0.2.1", 360)]


def test_plan_skip_threshold_uses_half_the_grace() -> None:
    g = GrantSettings(floor=300, ceiling=86400, grace=61)  # grace // 2 == 30
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 331)], now=0.0)  # remaining 331 = want(361) - 30
    assert led.plan([E(S4, 4, "192.0.2.1", 0)], g, now=0.0) == []
    assert led.plan([E(S4, 4, "192.0.2.1", 0)], g, now=1.0) != []


def test_plan_writes_when_new_ttl_is_longer() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 360)], now=0.0)
    assert led.plan([E(S4, 4, "192.0.2.1", 3600)], G, now=10.0) == [Write(S4, 4, "192.0.2.1", 3660)]


def test_plan_never_shortens_an_existing_grant() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 86460)], now=0.0)
    # A much shorter answer later: no write while enough is left; a write, never shorter
    # than what is left, once the grant runs low.
    written = 0
    for now in (0.0, 1000.0, 50000.0, 86000.0, 86100.5, 86200.0, 86400.0):
        remaining = led.remaining(K(S4, "192.0.2.1"), now)
        for w in led.plan([E(S4, 4, "192.0.2.1", 5)], G, now):
            assert w.timeout >= remaining and w.timeout >= 360
            written += 1
    assert written == 2  # at 86200 (260 s left) and 86400 (60 s left)


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
                led.load([Write(S4, 4, "192.0.2.1", left)], now=0.0)
                have = led.remaining(K(S4, "192.0.2.1"), now)
                want = grant_timeout(ttl, settings)
                writes = led.plan([E(S4, 4, "192.0.2.1", ttl)], settings, now)
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
            E(S4, 4, "192.0.2.1", 10),
            E(S4, 4, "192.0.2.1", 5000),
            E(S4, 4, "192.0.2.1", 400),
            E(S4, 4, "192.0.2.2", 400),
        ],
        G,
        now=0.0,
    )
    assert writes == [Write(S4, 4, "192.0.2.1", 5060), Write(S4, 4, "192.0.2.2", 460)]


def test_plan_deduplicates_longest_first() -> None:
    writes = Ledger().plan([E(S4, 4, "192.0.2.1", 5000), E(S4, 4, "192.0.2.1", 10)], G, now=0.0)
    assert writes == [Write(S4, 4, "192.0.2.1", 5060)]


def test_plan_sets_are_independent() -> None:
    led = Ledger()
    other = "egressd-build-v4"
    led.commit([Write(S4, 4, "192.0.2.1", 5000)], now=0.0)
    writes = led.plan([E(S4, 4, "192.0.2.1", 0), E(other, 4, "192.0.2.1", 0)], G, now=1.0)
    assert writes == [Write(other, 4, "192.0.2.1", 360)]


def test_plan_does_not_change_the_ledger() -> None:
    led = Ledger()
    led.plan([E(S4, 4, "192.0.2.1", 100)], G, now=0.0)
    assert led.remaining(K(S4, "192.0.2.1"), 0.0) == 0.0
    assert led.live(S4, 0.0) == 0


# --- commit / load / remaining / live / prune / forget -----------------------------------------


def test_commit_and_remaining() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 360)], now=100.0)
    assert led.remaining(K(S4, "192.0.2.1"), 100.0) == 360.0
    assert led.remaining(K(S4, "192.0.2.1"), 400.0) == 60.0
    assert led.remaining(K(S4, "192.0.2.1"), 460.0) == 0.0
    assert led.remaining(K(S4, "192.0.2.1"), 10_000.0) == 0.0
    assert led.remaining(K(S4, "192.0.2.9"), 100.0) == 0.0
    assert led.remaining(K(S6, "192.0.2.1"), 100.0) == 0.0


def test_commit_never_shortens() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 1000)], now=0.0)
    led.commit([Write(S4, 4, "192.0.2.1", 10)], now=5.0)
    assert led.remaining(K(S4, "192.0.2.1"), 5.0) == 995.0
    led.commit([Write(S4, 4, "192.0.2.1", 2000)], now=5.0)
    assert led.remaining(K(S4, "192.0.2.1"), 5.0) == 2000.0


def test_load_takes_over_kernel_entries() -> None:
    led = Ledger()
    led.load([Write(S4, 4, "192.0.2.1", 100), Write(S4, 4, "192.0.2.2", 5)], now=1000.0)
    assert led.remaining(K(S4, "192.0.2.1"), 1000.0) == 100.0
    assert led.remaining(K(S4, "192.0.2.2"), 1003.0) == 2.0
    led.load([Write(S4, 4, "192.0.2.1", 10)], now=1000.0)  # never shortens either
    assert led.remaining(K(S4, "192.0.2.1"), 1000.0) == 100.0
    assert led.plan([E(S4, 4, "192.0.2.1", 0)], GrantSettings(floor=60, grace=0), now=1000.0) == []


def test_live_and_prune() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 10), Write(S4, 4, "192.0.2.2", 100)], now=0.0)
    led.commit([Write(S6, 6, "2001:db8::1", 50)], now=0.0)
    assert led.live(S4, 0.0) == 2
    assert led.live(S4, 10.0) == 1  # expiry 10 is not live at 10
    assert led.live(S6, 10.0) == 1
    assert led.live("egressd-none-v4", 0.0) == 0
    assert led.prune(9.0) == 0
    assert led.prune(10.0) == 1
    assert led.prune(10.0) == 0
    assert led.prune(1000.0) == 2
    assert led.live(S4, 0.0) == 0 and led.live(S6, 0.0) == 0


def test_forget_one_set() -> None:
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 100)], now=0.0)
    led.commit([Write(S6, 6, "2001:db8::1", 100)], now=0.0)
    led.forget(S4)
    assert led.remaining(K(S4, "192.0.2.1"), 0.0) == 0.0
    assert led.remaining(K(S6, "2001:db8::1"), 0.0) == 100.0
    # forgotten: the next answer writes again
    assert led.plan([E(S4, 4, "192.0.2.1", 100)], G, 0.0) == [Write(S4, 4, "192.0.2.1", 360)]


def test_forget_everything() -> None:
    led = Ledger()
    led.commit(
        [Write(S4, 4, "192.0.2.1", 100), Write(S6, 6, "2001:db8::1", 100)],
        now=0.0,
    )
    led.forget()
    assert led.live(S4, 0.0) == 0 and led.live(S6, 0.0) == 0


def test_plan_commit_cycle() -> None:
    """What the pipeline does: plan, write, commit; a repeat answer then costs nothing."""
    led = Ledger()
    grants = [E(S4, 4, "192.0.2.1", 60), E(S6, 6, "2001:db8::1", 60)]
    first = led.plan(grants, G, now=0.0)
    assert len(first) == 2
    led.commit(first, now=0.0)
    assert led.plan(grants, G, now=0.0) == []
    assert led.plan(grants, G, now=29.0) == []
    # past the slack the grants are re-armed
    again = led.plan(grants, G, now=31.0)
    assert [w.timeout for w in again] == [360, 360]


# --- ports, reasons, reconcile ------------------------------------------------------------------

AGENT = Profile(name="agent", uids=(1000,))
P4 = "egressd-agent-p4"


def test_entries_for_every_port_and_for_ports() -> None:
    assert entries_for(AGENT.name, "192.0.2.1", 4, ()) == [Write(S4, 4, "192.0.2.1", 0)]
    assert entries_for(AGENT.name, "2001:db8::1", 6, ()) == [Write(S6, 6, "2001:db8::1", 0)]
    assert entries_for(AGENT.name, "192.0.2.1", 4, (443, 8443)) == [
        Write(P4, 4, "192.0.2.1", 0, TCP, 443),
        Write(P4, 4, "192.0.2.1", 0, UDP, 443),
        Write(P4, 4, "192.0.2.1", 0, TCP, 8443),
        Write(P4, 4, "192.0.2.1", 0, UDP, 8443),
    ]


def L(name: str) -> Labels:
    return tuple(name.encode().split(b"."))


def grant(led: Ledger, name: str, ips: list[str], ports: tuple[int, ...], now: float) -> None:
    """What the pipeline does for one allowed answer: plan, write, commit, justify."""
    wanted = [(e, 300) for ip in ips for e in entries_for(AGENT.name, ip, 4, ports)]
    led.commit(led.plan(wanted, G, now), now)
    addrs = {ip: now + grant_timeout(300, G) for ip in ips}
    led.justify(Reason("agent", name, (), ports, addrs))


def judge_by(allowed: dict[str, tuple[int, ...]]):  # type: ignore[no-untyped-def]
    """A new policy: the names it allows, with their ports."""

    def judge(r: Reason) -> list[Write] | None:
        if r.name not in allowed:
            return None
        return [e for ip in r.addrs for e in entries_for(AGENT.name, ip, 4, allowed[r.name])]

    return judge


LIVE = (S4, S6, P4, "egressd-agent-p6")


def test_reconcile_removes_what_only_a_removed_name_justified() -> None:
    led = Ledger()
    grant(led, "gone.example", ["192.0.2.1", "192.0.2.2"], (), now=0.0)
    grant(led, "kept.example", ["192.0.2.2"], (), now=0.0)  # shares 192.0.2.2
    adds, removes = led.reconcile(judge_by({"kept.example": ()}), LIVE, now=10.0)
    assert adds == []
    assert removes == [Write(S4, 4, "192.0.2.1", 0)]
    assert led.remaining(K(S4, "192.0.2.1"), 10.0) == 0.0
    assert led.remaining(K(S4, "192.0.2.2"), 10.0) == 350.0
    assert led.names(K(S4, "192.0.2.2"), 10.0) == ["kept.example"]
    # The removed name is forgotten: a second reload has nothing more to take.
    assert led.reconcile(judge_by({"kept.example": ()}), LIVE, now=11.0) == ([], [])


def test_reconcile_moves_a_name_to_its_new_ports_adding_before_removing() -> None:
    led = Ledger()
    grant(led, "pypi.example", ["192.0.2.1"], (), now=0.0)
    adds, removes = led.reconcile(judge_by({"pypi.example": (443,)}), LIVE, now=100.0)
    # The new entries carry what is left of the name's grant (360 - 100 s).
    assert adds == [
        Write(P4, 4, "192.0.2.1", 260, TCP, 443),
        Write(P4, 4, "192.0.2.1", 260, UDP, 443),
    ]
    assert removes == [Write(S4, 4, "192.0.2.1", 0)]
    # And back to every port.
    adds, removes = led.reconcile(judge_by({"pypi.example": ()}), LIVE, now=101.0)
    assert adds == [Write(S4, 4, "192.0.2.1", 259)]
    assert sorted(w.port for w in removes) == [443, 443]


def test_reconcile_re_times_an_entry_a_removed_name_had_extended() -> None:
    led = Ledger()
    grant(led, "short.example", ["192.0.2.1"], (), now=0.0)  # until 360
    long_answer = [(Write(S4, 4, "192.0.2.1", 0), 86400)]
    led.commit(led.plan(long_answer, G, 0.0), 0.0)  # the long one extends it to 86460
    led.justify(Reason("agent", "long.example", (), (), {"192.0.2.1": 86460.0}))
    adds, removes = led.reconcile(judge_by({"short.example": ()}), LIVE, now=60.0)
    assert removes == [] and adds == [Write(S4, 4, "192.0.2.1", 300)]
    assert led.remaining(K(S4, "192.0.2.1"), 60.0) == 300.0


def test_reconcile_leaves_entries_of_unknown_reason_and_dead_sets_alone() -> None:
    led = Ledger()
    led.load([Write(S4, 4, "192.0.2.9", 500)], now=0.0)  # taken over from the kernel
    grant(led, "gone.example", ["192.0.2.1"], (), now=0.0)
    adds, removes = led.reconcile(judge_by({}), LIVE, now=1.0)
    assert removes == [Write(S4, 4, "192.0.2.1", 0)] and adds == []
    assert led.remaining(K(S4, "192.0.2.9"), 1.0) == 499.0
    # A profile a reload removed: its sets are gone, nothing to delete from them.
    grant(led, "other.example", ["192.0.2.3"], (), now=2.0)
    assert led.reconcile(judge_by({}), (), now=3.0) == ([], [])


def test_reasons_expire_with_their_grants() -> None:
    led = Ledger()
    grant(led, "a.example", ["192.0.2.1"], (), now=0.0)
    assert led.names(K(S4, "192.0.2.1"), 0.0) == ["a.example"]
    led.prune(1000.0)
    assert led.names(K(S4, "192.0.2.1"), 0.0) == []
    assert led.reconcile(judge_by({}), LIVE, now=1000.0) == ([], [])


def test_knows_a_repeat_answer_that_adds_nothing() -> None:
    led = Ledger()
    grant(led, "a.example", ["192.0.2.1"], (), now=0.0)

    def again(now: float, ips: list[str], ports: tuple[int, ...] = ()) -> Reason:
        return Reason("agent", "a.example", (), ports, {ip: now + 360.0 for ip in ips})

    assert led.knows(again(30.0, ["192.0.2.1"]))  # later by less than the slack
    assert not led.knows(again(90.0, ["192.0.2.1"]))  # later by more: re-arm the reason
    assert not led.knows(again(0.0, ["192.0.2.1"], ports=(443,)))  # other ports
    other = Reason("agent", "b.example", (), (), {"192.0.2.1": 360.0})
    assert not led.knows(other)  # another name wrote the entries: record it too
    assert not led.knows(again(0.0, ["192.0.2.1", "192.0.2.2"]))  # one more address


# --- the compact representation: one address in two slots, expiries as shared seconds ----------


def test_reason_keeps_one_address_without_a_dict_and_several_in_one() -> None:
    one = Reason("agent", "a.example", (), (), {"192.0.2.1": 360.0})
    assert one.addrs == {"192.0.2.1": 360.0} and dict(one.items()) == {"192.0.2.1": 360.0}
    assert one.expiry("192.0.2.1") == 360.0 and one.expiry("192.0.2.2") is None
    assert one.last() == 360.0
    two = Reason("agent", "b.example", (), (), {"192.0.2.1": 360.0, "192.0.2.2": 500.0})
    assert two.addrs == {"192.0.2.1": 360.0, "192.0.2.2": 500.0}
    assert two.expiry("192.0.2.2") == 500.0 and two.expiry("192.0.2.3") is None
    assert two.last() == 500.0
    none = Reason("agent", "c.example", (), (), {})
    assert none.addrs == {} and list(none.items()) == [] and none.last() == 0.0
    assert none.expiry("192.0.2.1") is None


def test_reason_addrs_is_a_copy_and_the_caller_s_dict_is_not_kept() -> None:
    given = {"192.0.2.1": 360.0, "192.0.2.2": 360.0}
    r = Reason("agent", "a.example", (), (), given)
    given["192.0.2.3"] = 1.0
    r.addrs["192.0.2.4"] = 1.0  # type: ignore[index]
    assert r.addrs == {"192.0.2.1": 360.0, "192.0.2.2": 360.0}


def test_reason_equality_and_repr_as_the_dataclass_had_them() -> None:
    a = Reason("agent", "a.example", (L("cdn.example"),), (443,), {"192.0.2.1": 360.0})
    assert a == Reason("agent", "a.example", (L("cdn.example"),), (443,), {"192.0.2.1": 360.0})
    assert a != Reason("agent", "a.example", (L("cdn.example"),), (443,), {"192.0.2.1": 361.0})
    assert a != Reason("agent", "a.example", (), (443,), {"192.0.2.1": 360.0})
    assert repr(a) == (
        "Reason('agent', 'a.example', ((b'cdn', b'example'),), (443,), {'192.0.2.1': 360.0})"
    )


def test_justify_merges_one_address_into_several_and_reconcile_back_to_one() -> None:
    led = Ledger()
    grant(led, "a.example", ["192.0.2.1"], (), now=0.0)  # until 360
    grant(led, "a.example", ["192.0.2.2"], (), now=100.0)  # another answer: until 460
    (r,) = led.about("192.0.2.1")[0]
    assert r.addrs == {"192.0.2.1": 360, "192.0.2.2": 460}
    assert led.names(K(S4, "192.0.2.1"), 0.0) == ["a.example"]
    assert led.names(K(S4, "192.0.2.2"), 0.0) == ["a.example"]

    def only_the_second(reason: Reason) -> list[Write]:
        return entries_for(AGENT.name, "192.0.2.2", 4, ())

    adds, removes = led.reconcile(only_the_second, LIVE, now=200.0)
    assert adds == [] and removes == [Write(S4, 4, "192.0.2.1", 0)]
    (r,) = led.about("192.0.2.2")[0]
    assert r.addrs == {"192.0.2.2": 460} and led.about("192.0.2.1")[0] == []
    # An earlier, shorter answer for the address it has never shortens it.
    led.justify(Reason("agent", "a.example", (), (), {"192.0.2.2": 400.0}))
    assert led.about("192.0.2.2")[0][0].addrs == {"192.0.2.2": 460}


def test_load_rebuilds_a_reason_of_several_addresses_and_ports() -> None:
    led = Ledger()
    led.load(
        [
            Write(P4, 4, "192.0.2.1", 100, TCP, 443, "a.example"),
            Write(P4, 4, "192.0.2.1", 100, UDP, 443, "a.example"),
            Write(P4, 4, "192.0.2.2", 50, TCP, 8443, "a.example"),
            Write(P4, 4, "192.0.2.1", 10, TCP, 443, "a.example"),  # shorter: kept 100
        ],
        now=1000.0,
    )
    (r,) = led.about("192.0.2.1")[0]
    assert r.name == "a.example" and r.ports == (443, 8443)
    assert r.addrs == {"192.0.2.1": 1100, "192.0.2.2": 1050}


def test_expiries_are_whole_seconds_rounded_down() -> None:
    """The kernel's timeout starts after `now`: the ledger may think an entry runs out up
    to a second early, never late."""
    led = Ledger()
    led.commit([Write(S4, 4, "192.0.2.1", 360)], now=10.75)
    assert led.remaining(K(S4, "192.0.2.1"), 10.75) == 359.25
    assert led.live(S4, 369.99) == 1 and led.live(S4, 370.0) == 0
    # Still within the plan's slack: no write for a repeat of the same answer.
    assert led.plan([E(S4, 4, "192.0.2.1", 300)], G, now=10.75) == []
    led.justify(Reason("agent", "a.example", (), (), {"192.0.2.1": 370.75}))
    assert led.about("192.0.2.1")[0][0].addrs == {"192.0.2.1": 370}
    assert led.knows(Reason("agent", "a.example", (), (), {"192.0.2.1": 370.75}))


def test_grants_of_one_second_share_one_expiry_object_until_pruned() -> None:
    led = Ledger()
    for i in range(50):
        now = 1000.0 + i / 100  # all within one second
        grant(led, f"n{i}.example", [f"192.0.2.{i}"], (), now=now)
    expiries = {id(exp) for _, exp in led.entries(1000.0)}
    assert len(expiries) == 1
    reasons = [led.about(f"192.0.2.{i}")[0][0] for i in range(50)]
    assert len({id(r.expiry(f"192.0.2.{i}")) for i, r in enumerate(reasons)} | expiries) == 1
    assert led._stamps == {1360: 1360}
    led.prune(1360.0)  # every grant ran out: its second is forgotten too
    assert led._stamps == {} and led.live(S4, 0.0) == 0


# --- the address index behind `about` --------------------------------------------------------


def _scan(ledger: Ledger, ip: str) -> list[tuple[str, str]]:
    """What `about` said before it had an index: every reason naming ip, by a full scan."""
    return sorted(
        (r.profile, r.name)
        for names in ledger._reasons.values()
        for r in names.values()
        if r.expiry(ip) is not None
    )


def test_about_follows_every_change_of_the_reasons() -> None:
    """justify (new, re-armed, more addresses), load, reconcile (dropped, narrowed) and
    prune, in a seeded random order: `about` (from the index) always equals a full scan."""
    import random

    rnd = random.Random(7)
    ledger = Ledger()
    ips = [f"192.0.2.{i}" for i in range(12)]
    names = [f"n{i}.example" for i in range(8)]
    profiles = ("a", "b")
    now = 1000.0
    checked = 0
    for step in range(600):
        op = rnd.choice(("justify", "justify", "justify", "load", "reconcile", "prune"))
        if op == "justify":
            addrs = {ip: now + rnd.randint(1, 50) for ip in rnd.sample(ips, rnd.randint(1, 3))}
            ledger.justify(Reason(rnd.choice(profiles), rnd.choice(names), (), (), addrs))
        elif op == "load":
            p = rnd.choice(profiles)
            ip, ttl, name = rnd.choice(ips), rnd.randint(1, 50), rnd.choice(names)
            ledger.load([Write(f"egressd-{p}-v4", 4, ip, ttl, 0, 0, name)], now)
        elif op == "reconcile":
            keep = set(rnd.sample(ips, 6))
            gone = names[step % len(names)]

            def judge(r: Reason, keep: set[str] = keep, gone: str = gone) -> list[Write] | None:
                if r.name == gone:
                    return None  # no longer allowed
                return [
                    Write(f"egressd-{r.profile}-v4", 4, ip, 0, 0, 0)
                    for ip, _ in r.items()
                    if ip in keep
                ]

            ledger.reconcile(judge, [f"egressd-{p}-v4" for p in profiles], now)
        else:
            now += rnd.randint(0, 30)
            ledger.prune(now)
        for ip in ips:
            got = sorted((r.profile, r.name) for r in ledger.about(ip)[0])
            assert got == _scan(ledger, ip), (step, op, ip)
            checked += bool(got)
    # The twin: the reasons were there to find (a check that never saw one proves nothing).
    assert checked > 1000


def test_about_is_empty_for_an_address_nobody_named() -> None:
    ledger = Ledger()
    ledger.justify(Reason("a", "x.example", (), (), {"192.0.2.1": 60.0}))
    assert ledger.about("192.0.2.2") == ([], [])
    assert [r.name for r in ledger.about("192.0.2.1")[0]] == ["x.example"]


def test_a_prune_of_more_than_the_history_keeps_the_newest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import egressd.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "HISTORY", 5)
    ledger = Ledger()
    for i in range(12):  # justified in this order: the last ones are the newest
        ledger.justify(Reason("a", f"n{i}.example", (), (), {f"192.0.2.{i}": 10.0}))
    ledger.prune(100.0)
    kept = [i for i in range(12) if ledger.about(f"192.0.2.{i}")[1]]
    assert kept == [7, 8, 9, 10, 11]
    (past,) = ledger.about("192.0.2.11")[1]
    assert (past.name, past.expired) == ("n11.example", 10)
    assert ledger.about("192.0.2.11")[0] == []  # pruned: no live reason names it any more
