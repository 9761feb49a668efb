"""The operator commands' plumbing without a daemon: where the control socket is, how a
snapshot reads, what "not running" looks like."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from egressd import cli
from egressd.commands import control_path, status


def args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"socket": None, "config": None, **kw})


def test_the_socket_comes_from_the_flag_then_the_config_then_the_default(tmp_path: Path) -> None:
    config = tmp_path / "egressd.toml"
    config.write_text('[daemon]\ncontrol = "/run/x/control"\n[profiles.a]\n', encoding="utf-8")
    assert control_path(args(socket="/tmp/s", config=str(config))) == "/tmp/s"
    assert control_path(args(config=str(config))) == "/run/x/control"
    # A config that no longer loads (the reason to run `status`) still says where it is.
    broken = tmp_path / "broken.toml"
    broken.write_text('[daemon]\ncontrol = "/run/y/control"\n[grants]\nfloorr = 3\n')
    assert control_path(args(config=str(broken))) == "/run/y/control"
    for text in ("[daemon\n", '[daemon]\ncontrol = "relative"\n', "daemon = 3\n"):
        broken.write_text(text, encoding="utf-8")
        assert control_path(args(config=str(broken))) == "/run/egressd/control"
    assert control_path(args(config=str(tmp_path / "missing.toml"))) == "/run/egressd/control"


@pytest.mark.parametrize("command", ["status", "grants", "reload"])
def test_not_running_is_exit_3_with_a_clear_message(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([command, "--socket", str(tmp_path / "control")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("egressd: not running") and str(tmp_path / "control") in err


SNAP: dict[str, Any] = {
    "version": "0.1.0",
    "pid": 42,
    "config": "/etc/egressd/egressd.toml",
    "policy": "abc123",
    "started": 1000.0,
    "healthy": False,
    "problems": ["the last reload failed (the previous policy is running): x.toml:3: bad"],
    "warnings": ["profile agent is in AUDIT mode: nothing is blocked"],
    "rules_checked": "every 0.5 s",
    "upstreams": ["192.0.2.53:53"],
    "profiles": [
        {
            "name": "agent",
            "mode": "audit",
            "uids": [1000, 1001],
            "uid_ranges": [[100000, 165535]],
            "port": 153,
            "listeners": ["127.0.0.1:153"],
            "counts": {"answered": 5, "blocked": 0, "refused": 1, "servfail": 2, "audited": 3},
            "grants": 2,
            "sets": [{"name": "egressd-agent-v4", "entries": 2, "maxelem": 65536}],
        }
    ],
    "totals": {},
    "last_reload": {"at": 1100.0, "ok": False, "error": "x.toml:3: bad", "policy": "abc123"},
    "last_repair": {"at": 1150.0, "what": "chain EGRESSD missing", "window_ms": 120},
}


def test_a_snapshot_reads_as_the_operator_needs() -> None:
    text = status.render(SNAP, now=1200.0)
    assert "running (pid 42), UNHEALTHY" in text
    assert "PROBLEM: the last reload failed" in text and "FAILED" in text
    assert "WARNING: profile agent is in AUDIT mode" in text
    assert "profile agent (AUDIT: nothing blocked): uids 1000,1001, subordinate 100000-165535" in (
        text
    )
    assert "answered 5, blocked 0, refused 1, servfail 2, audited 3" in text
    assert "120 ms: chain EGRESSD missing" in text and "(50s ago)" in text
    assert "egressd-agent-v4 2/65536" in text


def test_ages() -> None:
    assert [status.ago(s) for s in (0, 59, 61, 3599, 3661, 90061)] == [
        "0s",
        "59s",
        "1m01s",
        "59m59s",
        "1h01m",
        "1d01h",
    ]


def test_the_service_start_loads_no_operator_command_module() -> None:
    """`egressd run` (the unit's ExecStart, timed against a 300 ms budget) imports neither
    the operator commands nor prometheus-client nor the Public Suffix List; `--help` does
    list every command (the positive twin: the observation sees them when loaded)."""
    import subprocess
    import sys

    probe = (
        "import sys; from egressd import cli, daemon; cli._parser(commands={}); "
        "print(sorted(m for m in sys.modules if m.startswith(('egressd.commands.', "
        "'egressd.doctor', 'egressd.suggest', 'egressd.explain', 'egressd.metrics', "
        "'prometheus_client', 'publicsuffixlist'))))"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe.format(False)], capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "[]", run.stdout
    full = subprocess.run(
        [sys.executable, "-c", probe.format(True)], capture_output=True, text=True, check=True
    )
    assert "'egressd.commands.doctor'" in full.stdout and "'publicsuffixlist'" in full.stdout
