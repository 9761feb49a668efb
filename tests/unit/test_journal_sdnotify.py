"""Event reporting (egressd.journal) and sd_notify (egressd.sdnotify).

The sd_notify tests bind a unix datagram socket in a temporary directory: the only socket
in the unit tests, local to this process.
"""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egressd import journal, sdnotify
from egressd.events import Error, QueryBlocked, Stopping

BLOCKED = QueryBlocked("agent", (1000, 1001), "ads.example", "A", "deny", "/l/a.txt:3")


# --- Reporter (JSON lines) -----------------------------------------------------------------------


def test_reporter_writes_one_json_line_per_event() -> None:
    out = io.StringIO()
    rep = journal.Reporter(stream=out, use_journal=False)
    assert rep.backend == "stderr-json"
    rep(BLOCKED)
    rep(Stopping("SIGTERM"))
    text = out.getvalue()
    assert text.endswith("\n")
    first, second = (json.loads(ln) for ln in text.splitlines())
    assert first["event"] == "QueryBlocked"
    assert first["message_id"] == QueryBlocked.MESSAGE_ID
    assert first["priority"] == QueryBlocked.PRIORITY
    assert first["message"] == BLOCKED.message()
    assert isinstance(first["ts"], float)
    assert first["EGRESSD_UIDS"] == "1000,1001"
    assert first["EGRESSD_RULE"] == "/l/a.txt:3"
    assert first["EGRESSD_VERDICT"] == "deny"
    assert "EGRESSD_REASON" not in first  # empty values are left out
    assert {k for k in first if k.startswith("EGRESSD_")} == set(BLOCKED.fields())
    assert second["event"] == "Stopping" and second["EGRESSD_REASON"] == "SIGTERM"
    assert second["message_id"] == Stopping.MESSAGE_ID


def test_reporter_survives_a_closed_stream() -> None:
    out = io.StringIO()
    rep = journal.Reporter(stream=out, use_journal=False)
    out.close()
    rep(Error("x", "y"))  # no exception


def test_reporter_journald_requested_but_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(journal, "JOURNAL_SOCKET", str(tmp_path / "no-such-socket"))
    with pytest.raises(RuntimeError):
        journal.Reporter(use_journal=True)
    rep = journal.Reporter(stream=io.StringIO(), use_journal=None)  # auto: falls back
    assert rep.backend == "stderr-json"


def test_reporter_journald_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, Any]] = []

    def send(**kw: Any) -> None:
        sent.append(kw)

    monkeypatch.setattr(journal, "_journal_send", lambda: send)
    out = io.StringIO()
    rep = journal.Reporter(stream=out, use_journal=True)
    assert rep.backend == "journald"
    rep(BLOCKED)
    (record,) = sent
    assert record["MESSAGE"] == BLOCKED.message()
    assert record["MESSAGE_ID"] == QueryBlocked.MESSAGE_ID
    assert record["PRIORITY"] == str(QueryBlocked.PRIORITY)
    assert record["SYSLOG_IDENTIFIER"] == "egressd"
    assert record["EGRESSD_EVENT"] == "QueryBlocked"
    assert record["EGRESSD_QNAME"] == "ads.example"
    assert out.getvalue() == ""


def test_reporter_falls_back_to_json_when_journald_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def send(**kw: Any) -> None:
        raise OSError("journald restarting")

    monkeypatch.setattr(journal, "_journal_send", lambda: send)
    out = io.StringIO()
    journal.Reporter(stream=out, use_journal=True)(BLOCKED)
    assert json.loads(out.getvalue())["message_id"] == QueryBlocked.MESSAGE_ID


# --- sd_notify -----------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "tmp path too long for a unix socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def test_ready_sends_ready_and_status(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("1 profile(s), policy abc") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=1 profile(s), policy abc"


def test_other_notifications(notify_socket: socket.socket) -> None:
    assert sdnotify.stopping("bye")
    assert notify_socket.recv(4096) == b"STOPPING=1\nSTATUS=bye"
    assert sdnotify.status("busy")
    assert notify_socket.recv(4096) == b"STATUS=busy"
    assert sdnotify.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.reloading()
    msg = notify_socket.recv(4096).decode()
    first, second = msg.split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=") and int(second.split("=")[1]) > 0


def test_fallback_notify_speaks_the_protocol(notify_socket: socket.socket) -> None:
    # the built-in implementation, used when systemd-python is not installed
    assert sdnotify._fallback_notify("READY=1\nSTATUS=ok") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=ok"


def test_fallback_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"egressd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify._fallback_notify("WATCHDOG=1") is True
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_fallback_notify_nobody_listening(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify._fallback_notify("READY=1") is False


def test_notify_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready("x") is False
    assert sdnotify._fallback_notify("READY=1") is False


# --- watchdog_interval ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("3000000", "self", 1.5),
        ("3000000", "1", None),  # meant for another process
        (None, None, None),
        ("", None, None),
        ("soon", None, None),
        ("1", None, 0.05),  # never busier than 50 ms
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for var, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, str(os.getpid()) if value == "self" else value)
    assert sdnotify.watchdog_interval() == expected
