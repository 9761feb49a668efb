"""The operator's commands against the real daemon: status, grants, a synchronous reload,
and audit mode (issue 8). The CLI runs as root on the host; the control socket is a file
in the lab's temp dir (daemon.control)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lab import Lab, poll
from test_egressd import AGENT, BASIC, events, ipset_members, start, write_config

pytestmark = pytest.mark.netns


def control(lab: Lab) -> str:
    return f'control = "{lab.tmpdir}/control"'


def egressd(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressd", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def status(config: Path) -> tuple[int, dict[str, Any]]:
    r = egressd("status", "--config", str(config), "--json")
    return r.returncode, json.loads(r.stdout) if r.stdout else {}


def test_status_grants_and_a_synchronous_reload(lab: Lab) -> None:
    lab.dns.set({**BASIC, "b.test.": [["A", "203.0.113.51", 300]]})
    config = write_config(lab, ["ok.test"], daemon=control(lab))
    d = start(lab, config)

    code, snap = status(config)
    assert code == 0 and snap["healthy"] and snap["pid"] == d.pid, snap
    (agent,) = snap["profiles"]
    assert (agent["name"], agent["mode"], agent["uids"], agent["port"]) == (
        "agent",
        "enforce",
        [AGENT],
        153,
    )
    assert "127.0.0.1:153" in agent["listeners"]
    assert agent["counts"] == {
        "answered": 0,
        "blocked": 0,
        "refused": 0,
        "servfail": 0,
        "audited": 0,
    }
    assert snap["last_reload"] is None and snap["config"] == str(config)

    assert lab.agent("resolve", "ok.test", "4")["ok"]
    assert not lab.agent("resolve", "blocked.test", "4")["ok"]
    code, snap = status(config)
    counts = snap["profiles"][0]["counts"]
    assert (counts["answered"], counts["blocked"]) == (1, 1), counts
    assert snap["profiles"][0]["grants"] == 1
    human = egressd("status", "--config", str(config))
    assert human.returncode == 0, human.stderr
    assert "healthy" in human.stdout and "profile agent (enforcing)" in human.stdout
    assert "answered 1, blocked 1" in human.stdout

    # grants: the live entry, with the name that justified it (checked against the kernel).
    g = egressd("grants", "--config", str(config), "--json")
    assert g.returncode == 0, g.stderr
    (grant,) = json.loads(g.stdout)
    assert (grant["address"], grant["names"], grant["port"]) == ("203.0.113.10", ["ok.test"], "")
    assert 0 < grant["expires_in"] <= 300 + 60
    assert "203.0.113.10" in ipset_members(lab, "egressd-agent-v4")
    assert egressd("grants", "--config", str(config), "ok.test").returncode == 0
    assert "ok.test" in egressd("grants", "--config", str(config), "203.0.113.10").stdout
    assert egressd("grants", "--config", str(config), "203.0.113.99").returncode == 1
    assert egressd("grants", "--config", str(config), "--profile", "other").returncode == 1

    # reload: synchronous; its outcome is the exit code.
    (lab.tmpdir / "egressd.toml.allow.txt").write_text("ok.test\nb.test\n", encoding="utf-8")
    r = egressd("reload", "--config", str(config))
    assert r.returncode == 0 and "reloaded" in r.stdout, r.stderr
    assert lab.agent("resolve", "b.test", "4")["addrs"] == ["203.0.113.51"]  # no waiting
    code, snap = status(config)
    assert snap["last_reload"]["ok"] and snap["totals"]["reloads"] == 1

    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("[grants]", "[grants]\nfloorr = 3"), encoding="utf-8")
    r = egressd("reload", "--config", str(config))
    assert r.returncode == 1, r.stdout
    assert "reload failed" in r.stderr and f"{config}:" in r.stderr and "floorr" in r.stderr
    assert lab.agent("resolve", "b.test", "4")["ok"]  # the previous policy runs on
    code, snap = status(config)
    assert code == 1 and not snap["healthy"] and "the last reload failed" in snap["problems"][0]
    assert "PROBLEM: the last reload failed" in egressd("status", "--config", str(config)).stdout

    config.write_text(text, encoding="utf-8")
    assert egressd("reload", "--config", str(config)).returncode == 0
    assert status(config)[0] == 0  # healthy again

    d.stop()
    r = egressd("status", "--config", str(config))
    assert r.returncode == 3 and "not running" in r.stderr, (r.stdout, r.stderr)
    assert egressd("reload", "--config", str(config)).returncode == 3
    assert not (lab.tmpdir / "control").exists()


def test_audit_mode_lets_the_agent_through_and_says_what_would_be_blocked(lab: Lab) -> None:
    lab.dns.set(BASIC)
    config = write_config(lab, ["ok.test"], daemon=control(lab), profile='mode = "audit"')
    d = start(lab, config)
    loud = events(d, "AuditMode")
    assert loud and loud[0]["EGRESSD_PROFILE"] == "agent" and loud[0]["priority"] == 4, loud

    r = lab.agent("resolve", "blocked.test", "4")
    assert r["addrs"] == ["203.0.113.66"], r
    assert lab.agent("connect", "203.0.113.66", 80)["ok"]
    assert lab.dns.queries(qname="blocked.test.")  # audit forwards what it would block
    audited = poll(lambda: events(d, "QueryAudited"), 5)
    assert audited, d.stderr_text()
    assert (audited[0]["EGRESSD_QNAME"], audited[0]["EGRESSD_NEEDED"]) == (
        "blocked.test",
        "blocked.test",
    )
    assert lab.agent("resolve", "ok.test", "4")["ok"]
    assert [e["EGRESSD_QNAME"] for e in events(d, "QueryAudited")] == ["blocked.test"]

    code, snap = status(config)
    assert code == 0 and snap["profiles"][0]["mode"] == "audit"
    assert snap["profiles"][0]["counts"]["audited"] == 1
    assert any("AUDIT" in w for w in snap["warnings"])
    assert "AUDIT" in egressd("status", "--config", str(config)).stdout
    assert any("STATUS=AUDIT MODE (nothing blocked): agent;" in n for n in d.notifications())

    # The twin: enforcing, the same name is blocked, and its audit grant is taken back.
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace('mode = "audit"', 'mode = "enforce"'), encoding="utf-8")
    assert egressd("reload", "--config", str(config)).returncode == 0
    assert lab.agent("resolve", "blocked.test", "4")["gaierror"] == "EAI_NONAME"
    assert not lab.agent("connect", "203.0.113.66", 80, 3)["ok"]
    assert len(events(d, "AuditMode")) == 1  # said at the start, not after the reload
