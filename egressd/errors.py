"""egressd's exception hierarchy. The docstrings are the generic messages."""

from __future__ import annotations


class EgressdError(Exception):
    """egressd failed."""


class ConfigError(EgressdError):
    """The configuration is invalid.

    Carries where the problem is (file, line, key) so that the message points the admin
    straight at it.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.detail = message
        where = ""
        if file is not None:
            where = file if line is None else f"{file}:{line}"
        parts = [p for p in (where, f"key '{key}'" if key else "") if p]
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class FirewallError(EgressdError):
    """A firewall operation (rules or sets) failed."""


class UpstreamError(EgressdError):
    """No upstream resolver gave a usable answer."""


class MalformedQuery(EgressdError):
    """A DNS message from a client could not be parsed."""
