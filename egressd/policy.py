"""Policy: the immutable, compiled form of a configuration, and the decisions it makes.

A reload builds a whole new Policy and swaps one reference; nothing here is mutated after
construction, so a query in flight always sees one consistent policy.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .allowlist import Labels, Matcher, Rule
from .config import Config, Profile


class Verdict(enum.Enum):
    ALLOW = "allow"
    BLOCK = "block"  # no allow rule matched
    DENY = "deny"  # an explicit deny rule matched


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    rule: Rule | None  # the allowlist line that decided, with file:line

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    @property
    def source(self) -> str:
        return self.rule.source if self.rule else ""


def decide(matcher: Matcher, labels: Labels) -> Decision:
    """Decide one name. An explicit deny beats any allow."""
    deny = matcher.deny_rule(labels)
    if deny is not None:
        return Decision(Verdict.DENY, deny)
    allow = matcher.allow_rule(labels)
    if allow is not None:
        return Decision(Verdict.ALLOW, allow)
    return Decision(Verdict.BLOCK, None)


def decide_chain(matcher: Matcher, chain: Iterable[Labels]) -> Decision | None:
    """Check the CNAME targets of an allowed answer.

    Targets inherit the allow of the queried name (CDNs alias to names nobody can list in
    advance), but an explicit deny on any target still wins. Returns the deny decision,
    or None when the chain may be granted.
    """
    for labels in chain:
        deny = matcher.deny_rule(labels)
        if deny is not None:
            return Decision(Verdict.DENY, deny)
    return None


@dataclass(frozen=True, slots=True)
class ProfilePolicy:
    profile: Profile
    matcher: Matcher

    @property
    def audit(self) -> bool:
        """Audit (learning) mode: what enforcing mode would block is answered and logged."""
        return self.profile.mode == "audit"


class Policy:
    """All profiles of one configuration, compiled, indexed by name and listener port."""

    __slots__ = ("blocked_rcode", "by_name", "by_port", "config", "digest", "rebind_rcode")

    def __init__(self, config: Config) -> None:
        self.config = config
        self.by_name: Mapping[str, ProfilePolicy] = {
            p.name: ProfilePolicy(p, Matcher(p.rules)) for p in config.profiles
        }
        self.by_port: Mapping[int, ProfilePolicy] = {
            pp.profile.port: pp for pp in self.by_name.values()
        }
        self.digest = _digest(config)
        # Resolved once here, not per query.
        self.blocked_rcode = RCODES[config.daemon.blocked_rcode]
        self.rebind_rcode = RCODES[config.daemon.rebind_rcode]


RCODES = {"noerror": 0, "servfail": 2, "nxdomain": 3, "refused": 5}


def _digest(config: Config) -> str:
    """A short hash of everything that shapes enforcement, to tell policies apart in logs."""
    h = hashlib.sha256()
    h.update(repr(config.daemon).encode())
    h.update(repr(config.grants).encode())
    for p in config.profiles:
        # Every field but the rules (whose file:line sources would change the hash on a
        # mere re-ordering of comments): uid ranges, mark ids, limits, exceptions...
        h.update(repr(dataclasses.replace(p, rules=())).encode())
        for r in p.rules:
            h.update(f"{r.pattern}\0".encode())
    return h.hexdigest()[:12]
