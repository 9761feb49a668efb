"""Allowlist patterns: parsing and matching on wire-format labels.

Grammar (one pattern per line, ``#`` starts a comment, blank lines ignored):

  ``example.com``      exactly that name
  ``*.example.com``    every name below example.com, not the apex
  ``**.example.com``   example.com and every name below it
  ``!<pattern>``       deny: a name that matches any deny rule is blocked, even if an
                       allow rule matches too (deny beats allow)
  ``<pattern> ports=443,8443``
                       the addresses this name resolves to are reachable on those ports
                       only (TCP and UDP); without ``ports=`` the profile's ``ports``
                       apply (none: every port)

Matching is case-insensitive, ignores one trailing dot and works on the IDNA (punycode)
form. Names are compared as tuples of wire-format labels, never as text, so a label that
contains an escaped dot or a NUL byte can never look like two labels (``evil\\.example.com``
is one label ``evil.example`` and matches nothing that ``*.example.com`` would).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

import dns.name

from .errors import ConfigError

Labels = tuple[bytes, ...]  # lower-cased, root label dropped, leftmost first

# Characters IDNA 2003 and IDNA 2008 treat differently (UTS #46 "deviations").
_IDNA_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")

_LABEL = re.compile(rb"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


class Scope(enum.Enum):
    EXACT = "exact"  # example.com
    BELOW = "below"  # *.example.com
    SUBTREE = "subtree"  # **.example.com


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: str  # as written (normalised), e.g. "**.example.com" or "!ads.example.com"
    labels: Labels
    scope: Scope
    deny: bool
    source: str  # "file:line" (or "--allow" / "config:allow" for inline rules)
    ports: tuple[int, ...] | None = None  # None: the profile's ports

    def __str__(self) -> str:
        return f"{self.pattern} ({self.source})"


def _ports(text: str, value: str) -> tuple[int, ...]:
    ports: set[int] = set()
    for item in value.split(","):
        item = item.strip()
        if not (item.isascii() and item.isdigit()) or not 0 < int(item) < 65536:
            raise ConfigError(f"{text.strip()!r}: {item!r} is not a port (1..65535)")
        ports.add(int(item))
    return tuple(sorted(ports))


def labels_of(name: dns.name.Name) -> Labels:
    """The lower-cased labels of a dnspython name, without the root label."""
    labels = name.labels
    if labels and labels[-1] == b"":
        labels = labels[:-1]
    return tuple(label.lower() for label in labels)


def parse_pattern(text: str, source: str) -> Rule:
    """Parse one pattern; raise ConfigError (naming ``source``) when it is not valid."""
    stripped = text.strip()
    deny = stripped.startswith("!")
    raw, *options = (stripped[1:] if deny else stripped).split() or [""]
    ports: tuple[int, ...] | None = None
    for option in options:
        key, sep, value = option.partition("=")
        if key != "ports" or not sep or ports is not None:
            raise ConfigError(
                f"{text.strip()!r}: {option!r} is not an option here (one 'ports=443,8443')"
            )
        ports = _ports(text, value)
    if deny and ports is not None:
        raise ConfigError(f"{text.strip()!r}: a deny line takes no ports (it denies the name)")
    body = raw
    if body.startswith("**."):
        scope, host = Scope.SUBTREE, body[3:]
    elif body.startswith("*."):
        scope, host = Scope.BELOW, body[2:]
    else:
        scope, host = Scope.EXACT, body
    if host.startswith("."):
        raise ConfigError(
            f"pattern {text.strip()!r}: a leading dot is not a pattern; write "
            f"'**.{host.lstrip('.')}' for the name and everything below it",
        )
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise ConfigError(f"pattern {text.strip()!r} matches every name; list domains instead")
    if host in ("*", "**"):
        raise ConfigError(f"pattern {text.strip()!r} matches every name; list domains instead")
    if "*" in host:
        raise ConfigError(
            f"pattern {text.strip()!r}: '*' and '**' are only allowed as the whole leftmost "
            "label ('*.example.com', '**.example.com')",
        )
    deviations = sorted(set(host) & _IDNA_DEVIATIONS)
    if deviations:
        # IDNA 2003 maps these (ß -> ss), IDNA 2008 keeps them (xn--...): the two forms are
        # different names, and clients disagree on which one they look up. A rule must not
        # cover one form while a deny misses the other, so the admin writes the punycode.
        raise ConfigError(
            f"pattern {text.strip()!r}: {', '.join(repr(c) for c in deviations)} is spelled "
            "differently by IDNA 2003 and IDNA 2008; write the punycode (xn--) form(s) instead",
        )
    try:
        name = dns.name.from_unicode(host, origin=None)
        # Unicode input goes through IDNA; ASCII input is lower-cased.
        labels = tuple(label.lower() for label in name.labels)
    except (dns.exception.DNSException, UnicodeError, ValueError) as err:
        raise ConfigError(f"pattern {text.strip()!r} is not a valid domain name: {err}") from err
    if len(host) > 253:
        raise ConfigError(f"pattern {text.strip()!r} is longer than 253 characters")
    for label in labels:
        if not _LABEL.match(label):
            raise ConfigError(
                f"pattern {text.strip()!r}: label {label.decode(errors='replace')!r} is not a "
                "valid host name label (letters, digits, '-', '_'; at most 63)",
            )
    ascii_host = b".".join(labels).decode()
    prefix = {Scope.EXACT: "", Scope.BELOW: "*.", Scope.SUBTREE: "**."}[scope]
    return Rule(
        pattern=("!" if deny else "") + prefix + ascii_host,
        labels=labels,
        scope=scope,
        deny=deny,
        source=source,
        ports=ports,
    )


def parse_lines(text: str, filename: str) -> list[Rule]:
    """Parse an allowlist file's text; errors name ``filename:line``."""
    rules: list[Rule] = []
    # Lines end at "\n" only: str.splitlines() would also break at \f, \v, \x1c-\x1e, \x85,
    # U+2028/U+2029, turning the rest of a comment into a rule an editor shows as comment.
    for lineno, line in enumerate(text.split("\n"), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        try:
            rules.append(parse_pattern(content, f"{filename}:{lineno}"))
        except ConfigError as err:
            raise ConfigError(err.detail, file=filename, line=lineno) from None
    return rules


class Matcher:
    """Decides names against a set of rules in O(number of labels) dict look-ups."""

    __slots__ = ("_allow", "_deny", "rules")

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        # For each polarity: exact names, and suffixes whose strict subdomains match,
        # and suffixes that match themselves too. The first rule written wins a tie so that
        # the reported file:line is stable.
        self._allow: tuple[dict[Labels, Rule], dict[Labels, Rule]] = ({}, {})
        self._deny: tuple[dict[Labels, Rule], dict[Labels, Rule]] = ({}, {})
        for rule in self.rules:
            exact, below = self._deny if rule.deny else self._allow
            if rule.scope in (Scope.EXACT, Scope.SUBTREE):
                exact.setdefault(rule.labels, rule)
            if rule.scope in (Scope.BELOW, Scope.SUBTREE):
                below.setdefault(rule.labels, rule)

    @staticmethod
    def _find(tables: tuple[dict[Labels, Rule], dict[Labels, Rule]], labels: Labels) -> Rule | None:
        exact, below = tables
        rule = exact.get(labels)
        if rule is not None:
            return rule
        # Most specific suffix first, so the reported rule is the closest one.
        for i in range(1, len(labels)):
            rule = below.get(labels[i:])
            if rule is not None:
                return rule
        return None

    def deny_rule(self, labels: Labels) -> Rule | None:
        return self._find(self._deny, labels)

    def allow_rule(self, labels: Labels) -> Rule | None:
        return self._find(self._allow, labels)
