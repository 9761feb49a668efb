"""Policy that reaches live state: per-line ports, and reloads that take back what the new
policy no longer justifies, without a gap for what it still does. Real daemon, iptables,
ipset, in the lab's namespaces (see lab.py); the agent is uid 64123.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest
from lab import Lab, Probe, poll
from test_egressd import AGENT, OTHER, events, ipset_members, start, write_config

pytestmark = pytest.mark.netns


def reachable(lab: Lab, ip: str, port: int, uid: int = AGENT) -> bool:
    r = lab.agent("connect", ip, port, 3, uid=uid)
    if not r["ok"]:
        # Rejected at once by egressd's chain, not a slow timeout.
        assert r["error"] in ("refused", "reset", "unreachable") and r["elapsed"] < 1, r
    return bool(r["ok"])


def accepted(lab: Lab, ip: str, port: int) -> int:
    return len(lab.echo.connections(event="accept", dst=ip, dport=port))


def test_a_lines_ports_are_the_only_ports_its_addresses_get(lab: Lab) -> None:
    lab.dns.set(
        {
            "pypi.test.": [["A", "203.0.113.30", 300]],
            "web.test.": [["A", "203.0.113.31", 300]],
            "plain.test.": [["A", "203.0.113.31", 300]],  # the same address, any port
            "both443.test.": [["A", "203.0.113.33", 300]],
            "both80.test.": [["A", "203.0.113.33", 300]],
            "files.test.": [["CNAME", "edge.cdn.test.", 300]],
            "edge.cdn.test.": [["A", "203.0.113.34", 300]],
        }
    )
    start(
        lab,
        write_config(
            lab,
            [
                "pypi.test ports=443",
                "web.test ports=80",
                "both443.test ports=443",
                "both80.test ports=80",
                "files.test ports=443",
                "**.cdn.test",  # a line without ports: every port for names it matches
            ],
        ),
    )
    for name in ("pypi.test", "both443.test", "both80.test", "files.test"):
        assert lab.agent("resolve", name, "4")["ok"], name

    assert reachable(lab, "203.0.113.30", 443)
    for port in (80, 8080):
        assert not reachable(lab, "203.0.113.30", port)
        assert accepted(lab, "203.0.113.30", port) == 0
        assert reachable(lab, "203.0.113.30", port, uid=OTHER)  # positive twin: they listen
    # One address through two lines: the union of their ports.
    assert reachable(lab, "203.0.113.33", 443) and reachable(lab, "203.0.113.33", 80)
    assert not reachable(lab, "203.0.113.33", 8080)
    # A CNAME from a ports=443 line to a name on a line without ports: the queried name's
    # line decides.
    assert reachable(lab, "203.0.113.34", 443)
    assert not reachable(lab, "203.0.113.34", 80)
    members = ipset_members(lab, "egressd-agent-p4")
    assert "203.0.113.30,tcp:443" in members and "203.0.113.30,udp:443" in members
    assert "203.0.113.30" not in ipset_members(lab, "egressd-agent-v4")


def test_a_reload_takes_back_a_removed_names_address_and_nothing_else(lab: Lab) -> None:
    lab.dns.set(
        {
            "gone.test.": [["A", "203.0.113.41", 300], ["A", "203.0.113.42", 300]],
            "kept.test.": [["A", "203.0.113.42", 300]],
        }
    )
    config = write_config(lab, ["gone.test", "kept.test"])
    d = start(lab, config)
    assert lab.agent("resolve", "gone.test", "4")["ok"]
    assert lab.agent("resolve", "kept.test", "4")["ok"]
    assert reachable(lab, "203.0.113.41", 80) and reachable(lab, "203.0.113.42", 80)

    probe = Probe(lab, 3.0, ["203.0.113.41", "203.0.113.42"], interval=0.01)
    time.sleep(1.0)
    write_config(lab, ["kept.test"])
    reloaded_at = time.time()
    d.signal(signal.SIGHUP)
    result = probe.join()
    assert poll(lambda: events(d, "Revoked"), 5), d.stderr_text()[-3000:]

    per_ip = result["attempts"] // 2
    kept = [t for ip, t in result["successes"] if ip == "203.0.113.42"]
    gone = [t for ip, t in result["successes"] if ip == "203.0.113.41"]
    # The address another allowed name justifies never dropped, not even for one probe.
    assert len(kept) == per_ip, (len(kept), per_ip, result["errors"])
    # The removed name's address: reachable before the reload (positive twin), refused
    # within a second after it.
    assert gone and min(gone) < reloaded_at, gone
    print(f"LIVE-POLICY revoked: last success {max(gone) - reloaded_at:.3f} s after SIGHUP")
    assert max(gone) - reloaded_at <= 1.0, (max(gone) - reloaded_at, gone[-3:])
    assert not reachable(lab, "203.0.113.41", 80)
    assert "203.0.113.41" not in ipset_members(lab, "egressd-agent-v4")
    (revoked,) = events(d, "Revoked")
    assert revoked["EGRESSD_REMOVED"] == "1" and "203.0.113.41" in revoked["EGRESSD_ADDRESSES"]
    # The name itself is blocked now, and the kept one still resolves and connects.
    assert lab.agent("resolve", "gone.test", "4")["gaierror"] == "EAI_NONAME"
    assert lab.agent("resolve", "kept.test", "4")["ok"]


def test_a_reload_that_moves_a_name_to_a_port_keeps_that_port_open(lab: Lab) -> None:
    lab.dns.set({"moved.test.": [["A", "203.0.113.45", 300]]})
    config = write_config(lab, ["moved.test"])
    d = start(lab, config)
    assert lab.agent("resolve", "moved.test", "4")["ok"]
    assert reachable(lab, "203.0.113.45", 80) and reachable(lab, "203.0.113.45", 443)

    probe = Probe(lab, 2.5, ["203.0.113.45"], interval=0.01)
    time.sleep(0.8)
    write_config(lab, ["moved.test ports=80"])
    d.signal(signal.SIGHUP)
    result = probe.join()
    assert poll(lambda: events(d, "Revoked"), 5)
    # Port 80 (what the probe uses) stayed open through the switch of sets ...
    assert len(result["successes"]) == result["attempts"], result["errors"]
    # ... and 443 is closed without the agent resolving again.
    assert not reachable(lab, "203.0.113.45", 443)
    assert "203.0.113.45,tcp:80" in ipset_members(lab, "egressd-agent-p4")


def test_a_reload_during_a_slow_upstream_answer_never_serves_the_denied_name(lab: Lab) -> None:
    lab.dns.set(
        {
            "slow.test.": [["A", "203.0.113.47", 300]],
            "__delay__": {"slow.test.": 1.5},
        }
    )
    config = write_config(lab, ["slow.test"], upstream_timeout=3.0)
    d = start(lab, config)
    answer: dict[str, Any] = {}
    asking = threading.Thread(
        target=lambda: answer.update(lab.agent("resolve", "slow.test", "4", timeout=20))
    )
    asking.start()
    assert lab.dns.wait_query(qname="slow.test.", timeout=5)  # in flight upstream now
    write_config(lab, ["other.test"])
    d.signal(signal.SIGHUP)
    asking.join(20)
    assert poll(lambda: events(d, "Reloaded"), 5)
    # The answer came back under the new policy: blocked, never served, never granted.
    assert not answer.get("ok") and answer.get("gaierror") == "EAI_NONAME", answer
    assert "203.0.113.47" not in ipset_members(lab, "egressd-agent-v4")
    assert not reachable(lab, "203.0.113.47", 80)
    blocked = [e for e in events(d, "QueryBlocked") if e.get("EGRESSD_QNAME") == "slow.test"]
    assert blocked, "the re-decided answer was not blocked by the new policy"
    # Positive twin: before the reload the same slow name did resolve (the delay is not
    # what failed it).
    write_config(lab, ["slow.test"], upstream_timeout=3.0)
    d.signal(signal.SIGHUP)
    assert poll(lambda: len(events(d, "Reloaded")) >= 2, 5)
    assert lab.agent("resolve", "slow.test", "4", timeout=20)["ok"]


def test_after_a_restart_a_reload_still_knows_why_each_address_is_there(lab: Lab) -> None:
    lab.dns.set(
        {
            "gone.test.": [["A", "203.0.113.51", 300]],
            "kept.test.": [["A", "203.0.113.52", 300]],
        }
    )
    # A set of an older egressd, without comments: taken over, its grant kept.
    lab.netns_exec(
        "host",
        ["ipset", "create", "egressd-agent-v4", "hash:ip", "timeout", "300", "maxelem", "65536"],
    )
    lab.netns_exec("host", ["ipset", "add", "egressd-agent-v4", "203.0.113.59", "timeout", "200"])
    config = write_config(lab, ["gone.test", "kept.test"])
    d = start(lab, config)
    assert "203.0.113.59" in ipset_members(lab, "egressd-agent-v4")
    for name in ("gone.test", "kept.test"):
        assert lab.agent("resolve", name, "4")["ok"]
    listing = lab.netns_exec("host", ["ipset", "list", "egressd-agent-v4"]).stdout
    assert "203.0.113.51 timeout" in listing and 'comment "gone.test"' in listing, listing

    assert d.stop() == 0
    d = start(lab, config)  # the ledger is rebuilt from the kernel's entries
    write_config(lab, ["kept.test"])
    d.signal(signal.SIGHUP)
    assert poll(lambda: events(d, "Revoked"), 5), d.stderr_text()[-3000:]
    members = ipset_members(lab, "egressd-agent-v4")
    assert "203.0.113.51" not in members
    assert "203.0.113.52" in members  # still justified
    assert "203.0.113.59" in members  # no comment: its reason is unknown, left to expire
    assert not reachable(lab, "203.0.113.51", 80) and reachable(lab, "203.0.113.52", 80)
