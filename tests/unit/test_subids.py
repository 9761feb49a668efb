"""The getsubids adapter (egressd.subids): output parsing and exit-status handling, with a
fake subprocess.run (the real program runs in tests/integration/test_subuid.py)."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

from egressd import subids
from egressd.errors import ConfigError


def test_parse_getsubids() -> None:
    text = "0: agent 100000 65536\n1: agent 300000 10\n\n"
    assert subids.parse_getsubids(text, "agent") == ((100000, 65536), (300000, 10))
    assert subids.parse_getsubids("", "agent") == ()


@pytest.mark.parametrize("text", ["agent 100000 65536\n", "0: agent 1e5 5\n", "0: agent 1 2 3\n"])
def test_parse_getsubids_refuses_what_it_does_not_know(text: str) -> None:
    with pytest.raises(ConfigError, match="unexpected output line"):
        subids.parse_getsubids(text, "agent")


def fake_run(
    monkeypatch: pytest.MonkeyPatch, rc: int = 0, out: str = "", err: str = ""
) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        assert kw["timeout"] == subids.TIMEOUT and kw["check"] is False
        return subprocess.CompletedProcess(argv, rc, out, err)

    monkeypatch.setattr(shutil, "which", lambda name, path=None: f"/usr/bin/{name}")
    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_getsubids_runs_the_tool_with_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_run(monkeypatch, out="0: agent 100000 65536\n")
    assert subids.getsubids("agent") == ((100000, 65536),)
    assert calls == [["/usr/bin/getsubids", "agent"]]


def test_no_ranges_is_exit_1_with_this_message(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(monkeypatch, rc=1, err="Error fetching ranges\n")
    assert subids.getsubids("agent") == ()


def test_other_failures_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(monkeypatch, rc=2, err="getsubids: cannot open /etc/subuid\n")
    with pytest.raises(ConfigError, match=r"getsubids agent failed \(exit 2\): getsubids: cannot"):
        subids.getsubids("agent")


def test_timeout_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(monkeypatch)

    def slow(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, kw["timeout"])

    monkeypatch.setattr(subprocess, "run", slow)
    with pytest.raises(ConfigError, match="getsubids agent: .*timed out"):
        subids.getsubids("agent")


def test_names_that_look_like_options_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_run(monkeypatch)
    with pytest.raises(ConfigError, match="starting with '-'"):
        subids.getsubids("-g")
    assert calls == []


def test_without_uidmap_there_is_no_nss_source(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_run(monkeypatch)
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    assert subids.getsubids("agent") == ()
    assert calls == []
