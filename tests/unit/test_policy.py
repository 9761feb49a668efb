"""Policy compilation and decisions (egressd.policy)."""

from __future__ import annotations

import dataclasses
import ipaddress

import dns.name
import pytest

from egressd.allowlist import Labels, Matcher, labels_of, parse_lines
from egressd.config import Config, DaemonSettings, GrantSettings, Profile, Upstream
from egressd.policy import Decision, Policy, Verdict, decide, decide_chain


def labels(name: str) -> Labels:
    return labels_of(dns.name.from_text(name))


def profile(
    name: str = "agent",
    text: str = "**.example.com\n",
    uids: tuple[int, ...] = (1000,),
    port: int = 153,
) -> Profile:
    return Profile(
        name=name, uids=uids, port=port, rules=tuple(parse_lines(text, f"/lists/{name}.txt"))
    )


def config(*profiles: Profile, blocked_rcode: str = "nxdomain") -> Config:
    return Config(
        path="/etc/egressd/egressd.toml",
        daemon=DaemonSettings(upstreams=(Upstream("192.0.2.53"),), blocked_rcode=blocked_rcode),
        grants=GrantSettings(),
        profiles=profiles,
    )


MATCHER = Matcher(
    parse_lines(
        "**.example.com\n!ads.example.com\n*.cdn.example.net\n!**.tracker.example\n", "l.txt"
    )
)


# --- decide ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "verdict", "source"),
    [
        ("example.com", Verdict.ALLOW, "l.txt:1"),
        ("www.example.com", Verdict.ALLOW, "l.txt:1"),
        ("ads.example.com", Verdict.DENY, "l.txt:2"),
        ("a.cdn.example.net", Verdict.ALLOW, "l.txt:3"),
        ("cdn.example.net", Verdict.BLOCK, ""),
        ("tracker.example", Verdict.DENY, "l.txt:4"),
        ("x.y.tracker.example", Verdict.DENY, "l.txt:4"),
        ("example.org", Verdict.BLOCK, ""),
    ],
)
def test_decide(name: str, verdict: Verdict, source: str) -> None:
    d = decide(MATCHER, labels(name))
    assert d.verdict is verdict
    assert d.source == source
    assert d.allowed is (verdict is Verdict.ALLOW)
    assert (d.rule is None) is (verdict is Verdict.BLOCK)


def test_verdict_values() -> None:
    assert [v.value for v in Verdict] == ["allow", "block", "deny"]


# --- decide_chain ----------------------------------------------------------------------------


def test_decide_chain_allows_unlisted_targets() -> None:
    # CNAME targets inherit the allow of the queried name...
    chain = [labels("edge.some-cdn.example"), labels("a1.akamai.example")]
    assert decide_chain(MATCHER, chain) is None
    assert decide_chain(MATCHER, []) is None


def test_decide_chain_denies_an_explicitly_denied_target() -> None:
    chain = [labels("edge.some-cdn.example"), labels("pixel.tracker.example"), labels("x.example")]
    d = decide_chain(MATCHER, chain)
    assert isinstance(d, Decision)
    assert d.verdict is Verdict.DENY and d.source == "l.txt:4" and not d.allowed


def test_decide_chain_reports_first_denied_target() -> None:
    chain = [labels("ads.example.com"), labels("tracker.example")]
    d = decide_chain(MATCHER, chain)
    assert d is not None and d.source == "l.txt:2"


def test_decide_chain_accepts_a_generator() -> None:
    d = decide_chain(MATCHER, (labels(n) for n in ("a.example", "tracker.example")))
    assert d is not None and d.verdict is Verdict.DENY


# --- Policy ----------------------------------------------------------------------------------


def test_policy_indexes_by_name_and_port() -> None:
    a = profile("agent", "**.example.com\n", port=153)
    b = profile("build", "pypi.org\n", uids=(1001, 1002), port=154)
    pol = Policy(config(a, b))
    assert set(pol.by_name) == {"agent", "build"}
    assert set(pol.by_port) == {153, 154}
    assert pol.by_name["agent"].profile is a
    assert pol.by_port[154].profile is b
    assert pol.by_port[153] is pol.by_name["agent"]
    assert decide(pol.by_name["agent"].matcher, labels("www.example.com")).allowed
    assert not decide(pol.by_name["build"].matcher, labels("www.example.com")).allowed
    assert decide(pol.by_port[154].matcher, labels("pypi.org")).allowed
    assert pol.config.profiles == (a, b)


def test_digest_is_stable() -> None:
    d1 = Policy(config(profile())).digest
    d2 = Policy(config(profile())).digest
    assert d1 == d2
    assert len(d1) == 12 and int(d1, 16) >= 0


def test_digest_ignores_where_rules_were_written() -> None:
    base = profile()
    moved = dataclasses.replace(
        base, rules=tuple(parse_lines("# moved\n\n**.example.com\n", "/elsewhere.txt"))
    )
    assert Policy(config(base)).digest == Policy(config(moved)).digest


@pytest.mark.parametrize(
    "change",
    [
        lambda p: dataclasses.replace(p, rules=tuple(parse_lines("**.example.org\n", "f"))),
        lambda p: dataclasses.replace(p, rules=tuple(parse_lines("*.example.com\n", "f"))),
        lambda p: dataclasses.replace(p, rules=tuple(parse_lines("!**.example.com\n", "f"))),
        lambda p: dataclasses.replace(
            p, rules=tuple(parse_lines("**.example.com\nx.example\n", "f"))
        ),
        lambda p: dataclasses.replace(p, rules=()),
        lambda p: dataclasses.replace(p, uids=(1000, 1001)),
        lambda p: dataclasses.replace(p, port=154),
        lambda p: dataclasses.replace(p, ports=(443,)),
        lambda p: dataclasses.replace(p, cidrs=(ipaddress.ip_network("10.0.0.0/8"),)),
        lambda p: dataclasses.replace(p, allow_loopback=True),
        lambda p: dataclasses.replace(p, name="other"),
    ],
)
def test_digest_changes_with_the_policy(change: object) -> None:
    base = profile()
    changed = change(base)  # type: ignore[operator]
    assert Policy(config(base)).digest != Policy(config(changed)).digest


def test_digest_changes_with_settings() -> None:
    base = config(profile())
    assert Policy(base).digest != Policy(config(profile(), blocked_rcode="refused")).digest
    other_grants = dataclasses.replace(base, grants=GrantSettings(floor=60))
    assert Policy(base).digest != Policy(other_grants).digest
