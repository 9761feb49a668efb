"""The parts of pyroute2 egressd uses, without the rest of the library.

``import pyroute2`` runs its package ``__init__``, which imports every module pyroute2 has
(NDB, IPDB, ethtool, nl80211, conntrack, ...): ~85 ms and 11 MB before egressd uses any
of it, a third of the time from spawn to READY. Here the package is registered without
running that ``__init__``, and only the modules egressd needs are imported: 6 MB and
30-40 ms less (measured, docs/design.md "The hot path").

The package stays whole for anyone else in the process: a name the package itself
provides (``from pyroute2 import IPRoute``) runs the real ``__init__`` once, on first use;
a submodule is imported as usual. When pyroute2 was imported before, nothing changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def _bare_package() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        raise ImportError("pyroute2 is not installed")
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def __getattr__(name: str) -> object:  # noqa: N807 - PEP 562 module __getattr__
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")
        # A name of the package's own: become the whole package, once.
        del package.__getattr__
        loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules["pyroute2"] = package


_bare_package()

from pyroute2.iproute import AsyncIPRoute  # type: ignore[import-untyped]  # noqa: E402
from pyroute2.ipset import AsyncIPSet, _IPSetError  # type: ignore[import-untyped]  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]  # noqa: E402

IPSetError = _IPSetError

__all__ = ["AsyncIPRoute", "AsyncIPSet", "IPSetError", "NetlinkError"]
