"""packaging/egressd-lockdown: the boot-time deny-all (golden text, strict state parsing).

Runs the script with --print (no root, no iptables). The boot itself is tested under a
real systemd in tests/integration/test_systemd.py. Regenerate the golden file after an
intended change with

    EGRESSD_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_lockdown.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from egressd.firewall import rules

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "packaging" / "egressd-lockdown"
GOLDEN = Path(__file__).parent / "golden" / "lockdown.rules"
UPDATE = os.environ.get("EGRESSD_UPDATE_GOLDEN") == "1"
# Both shells a Debian system runs it with: dash as /bin/sh, and bash.
SHELLS = [s for s in ("/bin/sh", "/bin/dash", "/bin/bash") if shutil.which(s)]

SAMPLE = """\
# Written by egressd: the uids it restricts.
64123
100000-165535   # a subordinate range
\t 1001 \r
"""


def lockdown(
    tmp_path: Path, state: str | None, *args: str, shell: str = "/bin/sh"
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "restricted"
    if state is not None:
        path.write_text(state, encoding="utf-8")
    return subprocess.run(
        [shell, str(SCRIPT), "--state", str(path), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize("shell", SHELLS)
def test_print_matches_the_golden_text(tmp_path: Path, shell: str) -> None:
    r = lockdown(tmp_path, SAMPLE, "--print", shell=shell)
    assert r.returncode == 0 and r.stderr == "", r
    if UPDATE:
        GOLDEN.write_text(r.stdout, encoding="utf-8")
    assert r.stdout == GOLDEN.read_text(encoding="utf-8")


def test_golden_text_is_egressds_chain_and_reject_types(tmp_path: Path) -> None:
    """The chain egressd's install takes over, and the same REJECTs as its profile chains."""
    text = lockdown(tmp_path, SAMPLE, "--print").stdout
    v4, v6 = text.split("# IPv6: ip6tables-restore -w --noflush\n")
    for fam, part in ((rules.V4, v4), (rules.V6, v6)):
        lines = [ln for ln in part.splitlines() if not ln.startswith("#")]
        chain = rules.FILTER_CHAIN
        assert lines[:2] == ["*filter", f":{chain} - [0:0]"]
        assert lines[-2:] == [f"-I OUTPUT 1 -j {chain}", "COMMIT"]
        for uid in ("64123", "100000-165535", "1001"):
            assert (
                f"-A {chain} -p tcp -m owner --uid-owner {uid} -j REJECT --reject-with tcp-reset"
            ) in lines
            assert (
                f"-A {chain} -m owner --uid-owner {uid} -j REJECT --reject-with {fam.reject}"
                in (lines)
            )
        assert len(lines) == 2 + 3 * 2 + 2


@pytest.mark.parametrize(
    "bad",
    [
        "0",  # root: never locked
        "0-10",
        "00",
        "0123",  # a leading zero (dash would read it as octal)
        "10-5",  # first > last
        "5-",
        "-5",
        "1-2-3",
        "abc",
        "12a",
        "+12",
        "1.5",
        "4294967295",  # (uid_t)-1
        "99999999999",
        "1000 1001",  # one entry per line
        "agent",
    ],
)
def test_a_malformed_line_is_reported_and_skipped(tmp_path: Path, bad: str) -> None:
    r = lockdown(tmp_path, f"64123\n{bad}\n", "--print")
    assert r.returncode == 1, r
    assert "restricted:2: not a uid" in r.stderr and bad in r.stderr, r.stderr
    # The valid line is still locked; nothing of the bad one made it into the rules.
    assert "--uid-owner 64123 " in r.stdout
    owners = {
        ln.split("--uid-owner ")[1].split()[0] for ln in r.stdout.splitlines() if "owner" in ln
    }
    assert owners == {"64123"}, r.stdout


def test_edge_values_are_accepted(tmp_path: Path) -> None:
    r = lockdown(tmp_path, "1\n4294967294\n7-7\n", "--print")
    assert r.returncode == 0 and r.stderr == "", r
    for uid in ("1", "4294967294", "7-7"):
        assert f"--uid-owner {uid} " in r.stdout


@pytest.mark.parametrize("state", [None, "", "# nothing yet\n\n   \n"])
def test_missing_or_empty_state_is_nothing_to_lock(tmp_path: Path, state: str | None) -> None:
    r = lockdown(tmp_path, state, "--print")
    assert r.returncode == 0 and r.stdout == "", r
    assert "nothing to lock" in r.stderr, r.stderr


def test_only_malformed_lines_lock_nothing_and_fail(tmp_path: Path) -> None:
    r = lockdown(tmp_path, "0\n", "--print")
    assert r.returncode == 1 and r.stdout == "", r
    assert "not a uid" in r.stderr and "nothing to lock" in r.stderr, r.stderr


def test_a_last_line_without_newline_counts(tmp_path: Path) -> None:
    r = lockdown(tmp_path, "64123\n1001", "--print")
    assert r.returncode == 0 and "--uid-owner 1001 " in r.stdout, r


def test_state_dir_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "restricted").write_text("64123\n", encoding="utf-8")
    r = subprocess.run(
        ["/bin/sh", str(SCRIPT), "--print"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
        env={"PATH": "/usr/bin:/bin", "EGRESSD_STATE_DIR": str(tmp_path)},
    )
    assert r.returncode == 0 and "--uid-owner 64123 " in r.stdout, r


def test_usage_error(tmp_path: Path) -> None:
    r = lockdown(tmp_path, "64123\n", "--bogus")
    assert r.returncode == 2 and "usage" in r.stderr, r


def test_script_is_executable_posix_sh() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text(encoding="utf-8").startswith("#!/bin/sh\n")
    if shutil.which("checkbashisms"):
        r = subprocess.run(["checkbashisms", str(SCRIPT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_the_script_and_the_daemon_write_the_same_deny_all(tmp_path: Path) -> None:
    """What packaging/egressd-lockdown applies at boot from the state file egressd wrote
    is exactly what egressd itself applies before its rules (rules.render_lock)."""
    from egressd.config import Profile

    profiles = [
        Profile(name="agent", uids=(64123, 1001), uid_ranges=((100000, 165535),)),
        Profile(name="build", uids=(1002,)),
    ]
    r = lockdown(tmp_path, rules.restricted(profiles), "--print")
    assert r.returncode == 0 and r.stderr == "", r
    expected = (
        "# IPv4: iptables-restore -w --noflush\n"
        + rules.render_lock(profiles, rules.V4, add_jump=True)
        + "# IPv6: ip6tables-restore -w --noflush\n"
        + rules.render_lock(profiles, rules.V6, add_jump=True)
    )
    assert r.stdout == expected
