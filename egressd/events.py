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
    MESSAGE_ID: ClassVar[str] = "1cf3818a89bc4b63bd9688aac4e787a2"
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

    MESSAGE_ID: ClassVar[str] = "012d6e20f4c4485092bd8b68cc117d3c"
    PRIORITY: ClassVar[int] = 4
    count: int
    events: str  # per profile, e.g. "agent:QueryBlocked=950,build:UpstreamFailed=3"

    def message(self) -> str:
        return f"{self.count} more per-query records were not logged one by one ({self.events})"


@dataclass(frozen=True, slots=True)
class QueryRefused(Event):
    """A query refused before policy: several questions, bad class or opcode, garbage."""

    MESSAGE_ID: ClassVar[str] = "6d851dda8d4b4db8bd8502f0322aa1a6"
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
    MESSAGE_ID: ClassVar[str] = "fa723dfe09ee43308697f4c10105d082"
    PER_QUERY: ClassVar[bool] = True
    PRIORITY: ClassVar[int] = 3  # err
    profile: str
    qname: str
    error: str

    def message(self) -> str:
        return f"could not grant addresses of {self.qname} to profile {self.profile}: {self.error}"


@dataclass(frozen=True, slots=True)
class UpstreamFailed(Event):
    MESSAGE_ID: ClassVar[str] = "3b05678c27954ada83e19c6838558bac"
    PER_QUERY: ClassVar[bool] = True
    PRIORITY: ClassVar[int] = 4  # warning
    profile: str
    qname: str
    error: str

    def message(self) -> str:
        return f"upstream lookup of {self.qname} for profile {self.profile} failed: {self.error}"


@dataclass(frozen=True, slots=True)
class RulesInstalled(Event):
    MESSAGE_ID: ClassVar[str] = "8681d5e026b04eafb65724d0fde32668"
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
    MESSAGE_ID: ClassVar[str] = "ea738286feed4a7f8d143efebfdfbb9d"
    version: str
    config: str
    upstreams: tuple[str, ...]
    listeners: tuple[str, ...]

    def message(self) -> str:
        return f"egressd {self.version} serving on {', '.join(self.listeners)}"


@dataclass(frozen=True, slots=True)
class Reloaded(Event):
    MESSAGE_ID: ClassVar[str] = "31a9cbc6ae2445239609e229566cf0ad"
    config: str
    policy_hash: str

    def message(self) -> str:
        return f"configuration reloaded from {self.config}, policy {self.policy_hash}"


@dataclass(frozen=True, slots=True)
class ReloadFailed(Event):
    MESSAGE_ID: ClassVar[str] = "0bbcb07ab8e7403ba61c22a571696efd"
    PRIORITY: ClassVar[int] = 3
    config: str
    error: str

    def message(self) -> str:
        return f"reload failed, keeping the running policy: {self.error}"


@dataclass(frozen=True, slots=True)
class Revoked(Event):
    """A reload took back set entries only names it no longer allows had justified."""

    MESSAGE_ID: ClassVar[str] = "49452356a0e64bffbd2c0bcb519b4bb4"
    removed: int
    added: int  # entries a line's new ports= justify
    addresses: tuple[str, ...]  # the first 20 removed, ip or ip:port

    def message(self) -> str:
        shown = ", ".join(self.addresses) or "none"
        return f"reload took back {self.removed} set entries ({shown}) and added {self.added}"


@dataclass(frozen=True, slots=True)
class Stopping(Event):
    MESSAGE_ID: ClassVar[str] = "340c484b1b434c51942c51728235d217"
    reason: str

    def message(self) -> str:
        return f"egressd stopping ({self.reason}); rules and sets stay in place (fail closed)"


@dataclass(frozen=True, slots=True)
class Repaired(Event):
    MESSAGE_ID: ClassVar[str] = "0a9d4259ed8247a7a2504ab7b6ad87a8"
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
    MESSAGE_ID: ClassVar[str] = "6773676c9b62447c86fa430d0ed1886f"
    PRIORITY: ClassVar[int] = 3
    where: str
    error: str
    extra: tuple[str, ...] = field(default=())

    def message(self) -> str:
        return f"error in {self.where}: {self.error}"
