"""``egressd check --resolve`` against the real daemon in the lab: the live CNAME chain of an
allowed name, no query at all for a blocked one, nothing granted, and "not running"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from lab import REPO_ROOT, Lab
from test_egressd import ipset_members, start, write_config

pytestmark = pytest.mark.netns

RECORDS = {
    "ok.test.": [["A", "203.0.113.10", 300]],
    "alias.test.": [["CNAME", "edge.cdn.example.", 300]],
    "edge.cdn.example.": [["CNAME", "e1.edge.cdn.example.", 120]],
    "e1.edge.cdn.example.": [["A", "203.0.113.30", 60], ["AAAA", "2001:db8:113::30", 60]],
    "sneaky.test.": [["CNAME", "tracker.cdn.example.", 300]],
    "tracker.cdn.example.": [["A", "203.0.113.31", 300]],
    "blocked.test.": [["A", "203.0.113.66", 300]],
}
ALLOW = ["ok.test", "alias.test", "sneaky.test", "!tracker.cdn.example", "!deny.ok.test"]


def check(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressd", "check", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )


def config(lab: Lab) -> Path:
    return write_config(lab, ALLOW, daemon=f'control = "{lab.tmpdir}/control"')


def test_resolve_shows_the_live_cname_chain_and_says_when_not_running(lab: Lab) -> None:
    lab.dns.set(RECORDS)
    cfg = config(lab)
    r = check(cfg, "alias.test", "--resolve")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "not running" in r.stderr and f"{lab.tmpdir}/control" in r.stderr
    assert r.stdout == ""

    start(lab, cfg)
    r = check(cfg, "alias.test", "--resolve")
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[0] == (
        f"alias.test  profile agent  ALLOWED by alias.test ({cfg}.allow.txt:3), ports: all"
    )
    assert "    alias.test  CNAME  edge.cdn.example  (ttl 300)" in lines
    assert "    edge.cdn.example  CNAME  e1.edge.cdn.example  (ttl 120)" in lines
    assert "    addresses: 203.0.113.30 (ttl 60)" in lines
    assert lab.dns.queries(qname="alias.test.", qtype="A")

    # A deny line on a CNAME target: the name is allowed, its answer is not.
    r = check(cfg, "sneaky.test", "--resolve")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert (
        "  profile agent: BLOCKED by a deny line on the CNAME chain: tracker.cdn.example "
        f"matches !tracker.cdn.example ({cfg}.allow.txt:5)"
    ) in r.stdout.splitlines()


def test_resolve_never_sends_a_blocked_name_upstream(lab: Lab) -> None:
    lab.dns.set(RECORDS)
    cfg = config(lab)
    start(lab, cfg)
    lab.dns.clear()
    for name in ("blocked.test", "c2VjcmV0.exfil.example", "deny.ok.test"):
        r = check(cfg, name, "--resolve")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert f"the policy blocks {name.lower()}, so no query was sent" in r.stdout
    r = check(cfg, "deny.ok.test", "--resolve")
    assert f"DENIED by !deny.ok.test ({cfg}.allow.txt:6)" in r.stdout
    # Positive twin: the fake upstream logs what egressd asks it (the allowed name).
    r = check(cfg, "ok.test", "--resolve")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert lab.dns.wait_query(qname="ok.test.")
    names = {q["qname"] for q in lab.dns.queries()}
    assert names == {"ok.test."}, names


def test_resolve_grants_nothing_and_leaves_the_cache_alone(lab: Lab) -> None:
    lab.dns.set(RECORDS)
    cfg = config(lab)
    start(lab, cfg)
    lab.dns.clear()
    r = check(cfg, "ok.test", "--resolve", "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert '"ip": "203.0.113.10"' in r.stdout
    assert "203.0.113.10" not in ipset_members(lab, "egressd-agent-v4")
    assert not lab.agent("connect", "203.0.113.10", 80, 3)["ok"]
    assert len(lab.dns.queries(qname="ok.test.", qtype="A")) == 1

    # Twin: the agent's own lookup of the same name grants it, and is not served from a
    # cache the check filled (the upstream is asked again).
    assert lab.agent("resolve", "ok.test", "4")["addrs"] == ["203.0.113.10"]
    assert "203.0.113.10" in ipset_members(lab, "egressd-agent-v4")
    assert lab.agent("connect", "203.0.113.10", 80)["ok"]
    assert len(lab.dns.queries(qname="ok.test.", qtype="A")) == 2
