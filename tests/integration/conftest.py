"""Fixtures for the netns integration lab (see lab.py)."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Generator, Iterator
from types import FrameType

import pytest
from lab import CREATED_NAMESPACES, Lab, netns_list

NOT_ROOT_REASON = (
    "netns integration tests need root (uid 0): they create network namespaces, "
    "veth pairs, iptables rules and a private journald"
)
REQUIRED_TOOLS = (
    "ip",
    "iptables",
    "ip6tables",
    "ipset",
    "conntrack",
    "setpriv",
    "unshare",
    "nsenter",
    "journalctl",
    "mountpoint",
)


def _terminated(signum: int, frame: FrameType | None) -> None:
    # As Ctrl-C: pytest stops the session and runs every fixture's teardown, so the labs
    # of the tests in progress are removed (namespaces, processes, temp dirs). The default
    # action of SIGTERM (a CI timeout, `kill`) would leave them on the machine.
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # pyproject registers it too; repeating keeps --strict-markers happy if it doesn't.
    config.addinivalue_line(
        "markers", "netns: needs root; builds its own network namespaces and runs the real daemon"
    )
    signal.signal(signal.SIGTERM, _terminated)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("EGRESSD_REQUIRE_NETNS") == "1":
        # tests/run and CI: a skipped integration test would be counted as coverage.
        raise pytest.UsageError(f"EGRESSD_REQUIRE_NETNS=1 but {NOT_ROOT_REASON}")
    skip = pytest.mark.skip(reason=NOT_ROOT_REASON)
    for item in items:
        if item.get_closest_marker("netns"):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Remember each phase's report so the lab fixture can dump diagnostics on failure.
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(scope="session")
def netns_session() -> Iterator[None]:
    """Session-level gate: root + tools present; afterwards, no lab namespace left."""
    if os.geteuid() != 0:
        pytest.skip(NOT_ROOT_REASON)
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        # As root (CI) a missing tool is a broken setup, not a reason to skip.
        pytest.fail(f"netns lab needs these tools: {', '.join(missing)}")
    yield
    leaked = sorted(set(CREATED_NAMESPACES) & set(netns_list()))
    assert not leaked, f"lab network namespaces left behind: {leaked}"


@pytest.fixture
def lab(netns_session: None, request: pytest.FixtureRequest) -> Iterator[Lab]:
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            # Shown by pytest under "Captured stdout teardown" of the failed test.
            print(the_lab.diagnostics())
        the_lab.close()
