"""egressd.netlinklib: pyroute2's modules egressd needs, without the whole library."""

from __future__ import annotations

import subprocess
import sys

HEAVY = "pyroute2.ndb.main"  # one of the modules pyroute2's package __init__ imports


def python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


def test_egressd_loads_only_what_it_uses_and_the_package_stays_whole() -> None:
    out = python(
        "import sys, egressd.netlinklib as n\n"
        f"print({HEAVY!r} in sys.modules)\n"
        "print(n.AsyncIPSet.__module__, n.AsyncIPRoute.__module__)\n"
        # Anyone else in the process still gets the whole package, on first use.
        "from pyroute2 import IPRoute, IPSet\n"
        "import pyroute2\n"
        f"print({HEAVY!r} in sys.modules, IPSet.__name__, IPRoute.__name__)\n"
        "print(bool(pyroute2.__version__))\n"
    )
    lines = out.splitlines()
    assert lines[0] == "False"
    assert lines[1] == "pyroute2.ipset pyroute2.iproute.linux"
    assert lines[2] == "True IPSet IPRoute"
    assert lines[3] == "True"


def test_the_positive_twin_plain_pyroute2_loads_everything() -> None:
    # The observation works: importing pyroute2 itself does load the heavy module.
    assert python(f"import sys, pyroute2\nprint({HEAVY!r} in sys.modules)") == "True"
