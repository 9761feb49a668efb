"""What a blocked connection's record says of its address (egressd.attribution), from a real
Ledger's memory. Time is passed in; nothing sleeps, nothing is resolved."""

from __future__ import annotations

from egressd.attribution import NEVER, blocked, known
from egressd.events import ConnectionBlocked
from egressd.ledger import Ledger, Reason

IP = "203.0.113.7"


def reason(profile: str, name: str, expiry: float, ports: tuple[int, ...] = ()) -> Reason:
    return Reason(profile, name, (), ports, {IP: expiry, "203.0.113.99": expiry})


def ledger(*reasons: Reason) -> Ledger:
    led = Ledger()
    for r in reasons:
        led.justify(r)
    return led


def test_never_resolved() -> None:
    led = ledger(reason("agent", "other.test", 500.0))
    assert known("agent", "tcp", 443, "198.51.100.50", led.about("198.51.100.50"), 100.0) == (
        NEVER,
        (),
    )
    assert NEVER == "never resolved through egressd"


def test_live_grant_on_other_ports() -> None:
    led = ledger(reason("agent", "api.test", 400.0, ports=(443,)))
    text, names = known("agent", "tcp", 8080, IP, led.about(IP), 100.0)
    assert text == (
        "resolved from api.test for 300 s more, on ports 443 only: "
        "port 8080 is not on the line's ports (443)"
    )
    assert names == ("api.test",)


def test_live_grant_on_ports_and_a_protocol_without_ports() -> None:
    led = ledger(reason("agent", "api.test", 400.0, ports=(443, 8443)))
    text, _ = known("agent", "icmp", 0, IP, led.about(IP), 100.0)
    assert text.endswith("icmp is not on the line's ports (tcp/udp 443,8443)")


def test_live_grant_on_the_port_itself_is_another_rule() -> None:
    led = ledger(reason("agent", "api.test", 400.0, ports=(443,)))
    text, _ = known("agent", "tcp", 443, IP, led.about(IP), 100.0)
    assert "rejected by another rule" in text


def test_live_grant_on_every_port_is_another_rule() -> None:
    led = ledger(reason("agent", "ok.test", 160.4))
    text, names = known("agent", "udp", 53, IP, led.about(IP), 100.0)
    assert text.startswith("resolved from ok.test for 60 s more, on every port: rejected by")
    assert names == ("ok.test",)


def test_expired_but_not_pruned() -> None:
    led = ledger(reason("agent", "old.test", 100.0))
    text, names = known("agent", "tcp", 443, IP, led.about(IP), 142.0)
    assert text.startswith("resolved from old.test, but the grant expired 42 s ago")
    assert names == ("old.test",)


def test_expired_and_pruned_history() -> None:
    led = ledger(reason("agent", "old.test", 100.0), reason("agent", "older.test", 50.0))
    assert led.prune(200.0) == 0  # no set entries, but both reasons go to the history
    reasons, pasts = led.about(IP)
    assert reasons == [] and len(pasts) == 2
    text, names = known("agent", "tcp", 443, IP, (reasons, pasts), 200.0)
    # the freshest first; both names kept
    assert text.startswith("resolved from old.test and older.test, but the grant expired 100 s")
    assert names == ("old.test", "older.test")


def test_another_profiles_name_only() -> None:
    led = ledger(reason("build", "pypi.test", 400.0))
    text, names = known("agent", "tcp", 443, IP, led.about(IP), 100.0)
    assert text == (
        "resolved from pypi.test for profile build only (live); never granted to profile agent"
    )
    assert names == ("pypi.test",)
    led.prune(500.0)
    text, _ = known("agent", "tcp", 443, IP, led.about(IP), 500.0)
    assert "for profile build only (expired)" in text


def test_own_profile_first_in_names_and_explains() -> None:
    led = ledger(reason("build", "b.test", 900.0), reason("agent", "a.test", 400.0, ports=(22,)))
    text, names = known("agent", "tcp", 80, IP, led.about(IP), 100.0)
    assert text.startswith("resolved from a.test for 300 s more, on ports 22 only")
    assert names == ("a.test", "b.test")


def test_many_names_are_listed() -> None:
    led = ledger(*(reason("agent", f"n{i}.test", 50.0 + i) for i in range(3)))
    text, _ = known("agent", "tcp", 80, IP, led.about(IP), 100.0)
    assert text.startswith("resolved from n2.test, n1.test and n0.test, but the grant expired 48")


def test_the_event() -> None:
    led = ledger(reason("agent", "api.test", 400.0, ports=(443,)))
    ev = blocked("agent", 64123, IP, "tcp", 8080, led.about(IP), 100.0)
    assert isinstance(ev, ConnectionBlocked)
    assert (ev.profile, ev.uid, ev.destination, ev.port, ev.protocol) == (
        "agent",
        64123,
        IP,
        8080,
        "tcp",
    )
    assert ev.names == ("api.test",)
    f = ev.fields()
    assert f["EGRESSD_NAMES"] == "api.test" and f["EGRESSD_PORT"] == "8080"
    assert "to 203.0.113.7:8080: resolved from api.test" in ev.message()
    never = blocked("agent", 64123, IP, "icmp", 0, ([], []), 1.0)
    assert "EGRESSD_NAMES" not in never.fields()
    assert never.message().endswith(f"to {IP}: {NEVER}")
