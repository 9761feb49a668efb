"""Events egressd reports, as frozen data with a stable journald MESSAGE_ID each.

The MESSAGE_IDs never change once released: operators filter on them
(``journalctl MESSAGE_ID=...``). Fields become ``EGRESSD_<NAME>`` journal fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class Event:
    MESSAGE_ID: ClassVar[str] = ""
    PRIORITY: ClassVar[int] = 6  # info
    # One record per query: something the agent can trigger at will, so rate-limited
    # (blocklog.BlockLog) to keep a flood from drowning the journal.
    PER_QUERY: ClassVar[bool] = False

    def message(self) -> str:
        raise NotImplementedError

    def fields(self) -> dict[str, str]:
        """The event's data as EGRESSD_* journal fields (empty values left out)."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == "" or value == ():
                continue
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            out[f"EGRESSD_{f.name.upper()}"] = str(value)
        return out


@dataclass(frozen=True, slots=True)
class QueryBlocked(Event):
    MESSAGE_ID: ClassVar[str] = "0c8d6f0e9a0b4a57a1c4f1a7d4b2e901"
    PER_QUERY: ClassVar[bool] = True
    PRIORITY: ClassVar[int] = 5  # notice
    profile: str
    uids: tuple[int, ...]
    qname: str
    qtype: str
    verdict: str  # "block" (no rule allowed it) or "deny" (a deny rule matched)
    rule: str  # file:line of the deciding rule, or "" when nothing matched
    reason: str = ""
    client: str = ""

    def message(self) -> str:
        why = f"by rule {self.rule}" if self.rule else "(not on the allowlist)"
        return f"blocked {self.qtype} query for {self.qname} from profile {self.profile} {why}"


@dataclass(frozen=True, slots=True)
class QueryAudited(Event):
    """A profile in audit (learning) mode answered a name enforcing mode would block."""

    MESSAGE_ID: ClassVar[str] = "e47a164b7a564b97aedd564b26c28de5"
    PER_QUERY: ClassVar[bool] = True
    PRIORITY: ClassVar[int] = 5  # notice
    profile: str
    uids: tuple[int, ...]
    qname: str
    qtype: str
    verdict: str  # what enforcing mode would have done: "block" or "deny"
    rule: str  # file:line of the deny rule, or "" when nothing matched
    needed: str  # the allowlist line enforcing mode would need, e.g. "cdn.example.com"
    client: str = ""

    def message(self) -> str:
        why = f"denied by rule {self.rule}" if self.rule else f"needs the line {self.needed!r}"
        return (
            f"audit: answered {self.qtype} query for {self.qname} from profile "
            f"{self.profile} that enforcing mode would block ({why})"
        )


@dataclass(frozen=True, slots=True)
class AuditMode(Event):
    """Said at every start and reload while a profile is in audit mode: it is not enforcing."""

    MESSAGE_ID: ClassVar[str] = "af0514f8d2b44337a1134ecf995b6f4d"
    PRIORITY: ClassVar[int] = 4  # warning
    profile: str
    uids: tuple[int, ...]

    def message(self) -> str:
        return (
            f"profile {self.profile} is in AUDIT mode: every name is answered and granted, "
            'nothing is blocked (set mode = "enforce" to enforce the allowlist)'
        )


@dataclass(frozen=True, slots=True)
class ConnectionBlocked(Event):
    """A connection (or datagram) the firewall rejected, read back from NFLOG, with what
    egressd knows of the destination address."""

    MESSAGE_ID: ClassVar[str] = "1a7aa55f80fe4e08b2acaedf958be9ea"
    PER_QUERY: ClassVar[bool] = True
    PRIORITY: ClassVar[int] = 5  # notice
    profile: str
    uid: int
    destination: str
    port: int
    protocol: str  # "tcp", "udp", "icmp", ...
    known: str  # what egressd knows of the address, e.g. "never resolved through egressd"
    names: tuple[str, ...] = ()  # allowed names that resolved to it (any profile)

    def message(self) -> str:
        host = f"[{self.destination}]" if ":" in self.destination else self.destination
        where = f"{host}:{self.port}" if self.port else self.destination
        return (
            f"blocked {self.protocol} connection from uid {self.uid} (profile {self.profile}) "
            f"to {where}: {self.known}"
        )


@dataclass(frozen=True, slots=True)
class Unlogged(Event):
    """Per-query records over the logging rate limit: counted, not logged one by one."""

    MESSAGE_ID: ClassVar[str] = "9e1d2c3b4a5f4e6d8c7b6a5f4e3d2c1b"
    PRIORITY: ClassVar[int] = 4
    count: int
    events: str  # per profile, e.g. "agent:QueryBlocked=950,build:UpstreamFailed=3"

    def message(self) -> str:
        return f"{self.count} more per-query records were not logged one by one ({self.events})"


@dataclass(frozen=True, slots=True)
class QueryRefused(Event):
    """A query refused before policy: several questions, bad class or opcode, garbage."""

    MESSAGE_ID: ClassVar[str] = "5b0e0ec3b8a14b7c9d3e55a4f0c6a1b2"
    PER_QUERY: ClassVar[bool] = True
    PRIORITY: ClassVar[int] = 5
    profile: str
    reason: str
    client: str = ""

    def message(self) -> str:
        return f"refused query from profile {self.profile}: {self.reason}"


@dataclass(frozen=True, slots=True)
class AnswerFiltered(Event):
    """Special addresses (loopback, RFC 1918, metadata, the host's own...) removed from an
    answer and never granted: the rebinding guard (egressd.rebind)."""

    MESSAGE_ID: ClassVar[str] = "01e2dc953e1944a7a191df3736262081"
    PER_QUERY: ClassVar[bool] = True
    PRIORITY: ClassVar[int] = 4  # warning: possibly an attempt to reach internal services
    profile: str
    qname: str
    qtype: str
    dropped: tuple[str, ...]  # the removed addresses, as the answer spelled them
    rules: tuple[str, ...]  # per removed address: the CIDR (or "own-address") that matched
    reason: str  # "ADDRESS: RULE (WHY); ..."
    kept: int  # addresses left in the answer; 0: the agent got an empty answer
    client: str = ""

    def message(self) -> str:
        left = f"{self.kept} address(es) left" if self.kept else "no address left"
        return (
            f"removed {', '.join(self.dropped)} from the {self.qtype} answer for {self.qname} "
            f"(profile {self.profile}; {left}): {self.reason}"
        )


@dataclass(frozen=True, slots=True)
class GrantFailed(Event):
    MESSAGE_ID: ClassVar[str] = "8f3c2d1e6b5a4c3d9e8f7a6b5c4d3e2f"
    PER_QUERY: ClassVar[bool] = True
    PRIORITY: ClassVar[int] = 3  # err
    profile: str
    qname: str
    error: str

    def message(self) -> str:
        return f"could not grant addresses of {self.qname} to profile {self.profile}: {self.error}"


@dataclass(frozen=True, slots=True)
class UpstreamFailed(Event):
    MESSAGE_ID: ClassVar[str] = "2a7b9c0d1e2f4a5b8c9d0e1f2a3b4c5d"
    PER_QUERY: ClassVar[bool] = True
    PRIORITY: ClassVar[int] = 4  # warning
    profile: str
    qname: str
    error: str

    def message(self) -> str:
        return f"upstream lookup of {self.qname} for profile {self.profile} failed: {self.error}"


@dataclass(frozen=True, slots=True)
class RulesInstalled(Event):
    MESSAGE_ID: ClassVar[str] = "6d1f4e2a9b8c4d7e8f0a1b2c3d4e5f60"
    profiles: tuple[str, ...]
    families: tuple[str, ...]
    policy_hash: str

    def message(self) -> str:
        return (
            f"firewall rules installed for profiles {', '.join(self.profiles)} "
            f"({'/'.join(self.families)}), policy {self.policy_hash}"
        )


@dataclass(frozen=True, slots=True)
class Started(Event):
    MESSAGE_ID: ClassVar[str] = "b1c2d3e4f5a64b7c8d9e0f1a2b3c4d5e"
    version: str
    config: str
    upstreams: tuple[str, ...]
    listeners: tuple[str, ...]

    def message(self) -> str:
        return f"egressd {self.version} serving on {', '.join(self.listeners)}"


@dataclass(frozen=True, slots=True)
class Reloaded(Event):
    MESSAGE_ID: ClassVar[str] = "c3d4e5f6a7b84c9d0e1f2a3b4c5d6e7f"
    config: str
    policy_hash: str

    def message(self) -> str:
        return f"configuration reloaded from {self.config}, policy {self.policy_hash}"


@dataclass(frozen=True, slots=True)
class ReloadFailed(Event):
    MESSAGE_ID: ClassVar[str] = "d4e5f6a7b8c94d0e1f2a3b4c5d6e7f80"
    PRIORITY: ClassVar[int] = 3
    config: str
    error: str

    def message(self) -> str:
        return f"reload failed, keeping the running policy: {self.error}"


@dataclass(frozen=True, slots=True)
class Revoked(Event):
    """A reload took back set entries only names it no longer allows had justified."""

    MESSAGE_ID: ClassVar[str] = "4b7e1f0c2d9a4e38b6c5a1d2e3f40516"
    removed: int
    added: int  # entries a line's new ports= justify
    addresses: tuple[str, ...]  # the first 20 removed, ip or ip:port

    def message(self) -> str:
        shown = ", ".join(self.addresses) or "none"
        return f"reload took back {self.removed} set entries ({shown}) and added {self.added}"


@dataclass(frozen=True, slots=True)
class Stopping(Event):
    MESSAGE_ID: ClassVar[str] = "e5f6a7b8c9d04e1f2a3b4c5d6e7f8091"
    reason: str

    def message(self) -> str:
        return f"egressd stopping ({self.reason}); rules and sets stay in place (fail closed)"


@dataclass(frozen=True, slots=True)
class Repaired(Event):
    MESSAGE_ID: ClassVar[str] = "f6a7b8c9d0e14f2a3b4c5d6e7f8091a2"
    PRIORITY: ClassVar[int] = 4
    what: str
    # Milliseconds from the first nf_tables change event (or, without one, from the verify
    # that found the drift) until the re-apply was done: how long the rules were off.
    window_ms: int = 0

    def message(self) -> str:
        return (
            f"firewall state had drifted and was re-applied within {self.window_ms} ms: {self.what}"
        )


@dataclass(frozen=True, slots=True)
class Error(Event):
    MESSAGE_ID: ClassVar[str] = "0a1b2c3d4e5f4a6b7c8d9e0f1a2b3c4d"
    PRIORITY: ClassVar[int] = 3
    where: str
    error: str
    extra: tuple[str, ...] = field(default=())

    def message(self) -> str:
        return f"error in {self.where}: {self.error}"
