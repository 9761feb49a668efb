"""``egressd check`` (egressd.commands.check): offline against config files in a temp dir,
and ``--resolve`` against a control server on a temp socket (the daemon's side is
``explain.resolve_live`` with a fake upstream)."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_explain import CDN, FakeResolver

from egressd import control, explain
from egressd.commands import check
from egressd.policy import Policy
from egressd.sources import Sources, load


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    ap = argparse.ArgumentParser(prog="egressd")
    check.add_parser(ap.add_subparsers(dest="command"))
    code = check.run(ap.parse_args(["check", *argv]))
    out, err = capsys.readouterr()
    return code, out, err


def config(tmp_path: Path, profiles: str, files: dict[str, str], daemon: str = "") -> str:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    path = tmp_path / "egressd.toml"
    path.write_text(
        f'[daemon]\nupstreams = ["192.0.2.53"]\n{daemon}\n\n{profiles}', encoding="utf-8"
    )
    return str(path)


AGENT = """
[profiles.agent]
users = [64123]
port = 153
allowlists = ["python.list", "git.list"]
"""
LEARN = """
[profiles.learn]
users = [64124]
port = 154
mode = "audit"
allow = ["*.example.net"]
"""
FILES = {
    "python.list": "# python\npypi.org\n**.pythonhosted.org\n!evil.pypi.org\n**.pypi.org\n",
    "git.list": "github.com ports=443,22\n",
}


@pytest.fixture
def conf(tmp_path: Path) -> str:
    return config(tmp_path, AGENT, FILES)


def test_allowed_prints_the_line_and_exits_0(
    conf: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["files.pythonhosted.org", "--config", conf], capsys)
    assert code == 0, err
    assert out == (
        "files.pythonhosted.org  profile agent  ALLOWED by **.pythonhosted.org "
        f"({tmp_path}/python.list:3), ports: all\n"
    )


def test_a_ports_line_shows_its_ports(
    conf: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["GitHub.com.", "--config", conf], capsys)
    assert code == 0
    assert f"ALLOWED by github.com ({tmp_path}/git.list:1), ports: 22,443" in out


def test_blocked_prints_the_line_to_add_and_where_and_exits_1(
    conf: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["files.example.net", "--config", conf], capsys)
    assert code == 1
    assert out.splitlines() == [
        "files.example.net  profile agent  BLOCKED: no rule allows it",
        f"  to allow it, add this line to {tmp_path}/python.list:",
        "    files.example.net",
        "  or, for example.net and every name below it:",
        "    **.example.net",
    ]
    # The advice works: with the line added, the same command says ALLOWED.
    with open(tmp_path / "python.list", "a", encoding="utf-8") as fh:
        fh.write("files.example.net\n")
    code, out, _ = run(["files.example.net", "--config", conf], capsys)
    assert code == 0 and f"ALLOWED by files.example.net ({tmp_path}/python.list:6)" in out


def test_denied_names_the_deny_line_and_exits_1(
    conf: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["evil.pypi.org", "--config", conf], capsys)
    assert code == 1
    first, second = out.splitlines()
    assert first == (
        f"evil.pypi.org  profile agent  DENIED by !evil.pypi.org ({tmp_path}/python.list:4)"
    )
    assert f"over **.pypi.org ({tmp_path}/python.list:5)" in second
    assert "remove or change that deny line" in second


def test_two_profiles_and_an_audit_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = config(tmp_path, AGENT + LEARN, FILES)
    # Allowed in one profile of two: exit 0, both shown.
    code, out, _ = run(["files.example.net", "--config", conf], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "files.example.net  profile agent  BLOCKED: no rule allows it"
    assert any(
        line.startswith("files.example.net  profile learn  ALLOWED by *.example.net (")
        for line in lines
    )
    # The profile asked decides the exit code.
    assert run(["files.example.net", "--config", conf, "--profile", "agent"], capsys)[0] == 1
    assert run(["files.example.net", "--config", conf, "--profile", "learn"], capsys)[0] == 0
    # An audit profile answers a blocked name anyway, and says so; the fix is its inline list.
    code, out, _ = run(["pypi.org", "--config", conf, "--profile", "learn"], capsys)
    assert code == 1
    assert out.splitlines()[:3] == [
        "pypi.org  profile learn  BLOCKED: no rule allows it "
        "(audit mode: answered and granted anyway, and logged)",
        f"  to allow it, add this to `allow` in [profiles.learn] of {conf}:",
        '    "pypi.org"',
    ]


def test_json_for_scripts(conf: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["bücher.example", "--config", conf, "--json", "--type", "aaaa"], capsys)
    assert code == 1
    data = json.loads(out)
    assert data["name"] == "xn--bcher-kva.example" and data["type"] == "AAAA"
    (c,) = data["checks"]
    assert c["input"] == "bücher.example" and c["verdict"] == "block"
    assert c["fix"]["line"] == "xn--bcher-kva.example"
    assert c["fix"]["file"] == f"{tmp_path}/python.list"
    assert "resolved" not in data  # offline: nothing was resolved


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["*.pypi.org"], "is a pattern"),
        (["exa mple.com"], "spaces"),
        (["a..b.com"], "not a valid domain name"),
        (["pypi.org", "--type", "BOGUS"], "not a DNS record type"),
        (["pypi.org", "--profile", "nope"], "no profile 'nope'"),
    ],
)
def test_usage_errors_exit_2(
    conf: str, argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run([*argv, "--config", conf], capsys)
    assert code == 2 and out == ""
    assert err.startswith("egressd: ") and words in err


def test_a_broken_config_exits_2_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = config(tmp_path, AGENT, {**FILES, "git.list": "github.com\n*.bad*.example\n"})
    code, out, err = run(["pypi.org", "--config", conf], capsys)
    assert code == 2 and out == ""
    assert f"{tmp_path}/git.list:2" in err
    conf = config(tmp_path, AGENT.replace("port = 153", "port = 53"), FILES)
    code, _, err = run(["pypi.org", "--config", conf], capsys)
    line = Path(conf).read_text(encoding="utf-8").split("\n").index("port = 53") + 1
    assert code == 2 and f"{conf}:{line}" in err and "profiles.agent.port" in err
    code, _, err = run(["pypi.org", "--config", str(tmp_path / "missing.toml")], capsys)
    assert code == 2 and "missing.toml" in err


# --- --resolve -------------------------------------------------------------------------------


def test_resolve_when_not_running_exits_3(
    conf: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "control"
    code, out, err = run(["pypi.org", "--resolve", "--socket", str(sock)], capsys)
    assert code == 3 and out == ""
    assert err.startswith("egressd: ") and "not running" in err and str(sock) in err
    assert "without --resolve" in err


class Server:
    """A control server on a temp socket serving "resolve" as the daemon does."""

    def __init__(self, path: str, policy: Policy, resolver: FakeResolver) -> None:
        async def resolve(args: dict[str, Any]) -> Any:
            try:
                return await explain.resolve_live(
                    policy, resolver, args["profile"], args["name"], args["type"]
                )
            except explain.CheckError as err:  # what the daemon's handler does
                raise control.ControlError(str(err)) from None

        self.loop = asyncio.new_event_loop()
        self.server = control.ControlServer(path, {"resolve": resolve})
        self.loop.run_until_complete(self.server.start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FakeResolver]]:
    monkeypatch.setattr(control, "peer_uid", lambda sock: 0)  # the tests may not run as root
    conf = config(
        tmp_path,
        AGENT,
        {**FILES, "git.list": "!tracker.example\n"},
        daemon=f'control = "{tmp_path}/control"',
    )
    resolver = FakeResolver(CDN)
    server = Server(f"{tmp_path}/control", Policy(load(conf, Sources())), resolver)
    try:
        yield conf, resolver
    finally:
        server.close()


def test_resolve_shows_the_live_cname_chain(
    daemon: tuple[str, FakeResolver], capsys: pytest.CaptureFixture[str]
) -> None:
    conf, resolver = daemon
    code, out, err = run(["alias.pypi.org", "--resolve", "--config", conf], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("alias.pypi.org  profile agent  ALLOWED by **.pypi.org (")
    assert lines[1:] == [
        "  resolved live (A, NOERROR) through egressd's upstream; nothing was granted:",
        "    alias.pypi.org  CNAME  edge.cdn.example  (ttl 300)",
        "    edge.cdn.example  CNAME  e1.edge.cdn.example  (ttl 60)",
        "    addresses: 203.0.113.30 (ttl 20), 10.1.2.3 (ttl 20)",
        "  profile agent: 10.1.2.3 is removed from the answer, never granted: "
        "10.0.0.0/8 (private (RFC 1918))",
    ]
    assert resolver.asked == [((b"alias", b"pypi", b"org"), 1, True)]


def test_resolve_of_a_chain_with_a_denied_target_exits_1(
    daemon: tuple[str, FakeResolver], capsys: pytest.CaptureFixture[str]
) -> None:
    conf, _ = daemon
    code, out, _ = run(["sneaky.pypi.org", "--resolve", "--config", conf, "--json"], capsys)
    assert code == 1
    data = json.loads(out)
    assert data["checks"][0]["verdict"] == "allow"
    assert data["resolved"]["profiles"][0]["denied_by"]["rule"] == "!tracker.example"
    code, out, _ = run(["sneaky.pypi.org", "--resolve", "--config", conf], capsys)
    assert "BLOCKED by a deny line on the CNAME chain: tracker.example matches" in out


def test_resolve_of_a_blocked_name_sends_no_query(
    daemon: tuple[str, FakeResolver], capsys: pytest.CaptureFixture[str]
) -> None:
    conf, resolver = daemon
    code, out, _ = run(["secret.exfil.example", "--resolve", "--config", conf], capsys)
    assert code == 1
    assert "BLOCKED: no rule allows it" in out
    assert "not resolved: the policy blocks secret.exfil.example, so no query was sent" in out
    assert resolver.asked == []
    # Positive twin: an allowed name does reach the upstream.
    assert run(["pypi.org", "--resolve", "--config", conf], capsys)[0] == 0
    assert resolver.asked == [((b"pypi", b"org"), 1, True)]


def test_resolve_errors_of_the_daemon_exit_2(
    daemon: tuple[str, FakeResolver], capsys: pytest.CaptureFixture[str]
) -> None:
    conf, _ = daemon
    code, _, err = run(["pypi.org", "--resolve", "--config", conf, "--profile", "x"], capsys)
    assert code == 2 and "no profile 'x'" in err
