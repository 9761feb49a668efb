"""Suggest allowlist lines from what was blocked: journal records in, a reviewable diff out.

Pure: no journal, no files, no clock. ``egressd.commands.suggest`` reads the records
(``journalctl -o json`` or egressd's JSON-lines log) and writes the file.

What it decides, and why:

- **Input**: ``QueryBlocked`` (enforcing mode said NXDOMAIN) and ``QueryAudited`` (audit
  mode answered a name enforcing mode would block) records. Counts are of *records*: per
  query records are rate-limited (``Unlogged``), so a count is a lower bound.
- **Never a DNS query.** Names are grouped by their registrable domain with the Public
  Suffix List (``publicsuffixlist``, offline); a blocked name is never resolved.
- **Exact names first.** Each name becomes an exact line (``files.example.com``); when a
  registrable domain has several names, ``**.domain`` is offered as a commented
  alternative under them: the reviewer picks, the default grants the least.
- **Never a public suffix.** A wildcard is only ever offered for a registrable domain
  (``**.github.io``, ``**.co.uk``, ``**.com`` never appear); a queried name that *is* a
  public suffix (or a single label such as a search-domain probe) is left out, and so are
  reverse lookups (``in-addr.arpa``/``ip6.arpa``: an allowlist line there grants nothing).
- **Deny lines stand.** A name any record says a deny line blocked (verdict ``deny``), or
  that the current configuration denies, is never suggested: it is listed as
  "denied by FILE:LINE; not suggested". Removing a deny line is a decision for a person.
- **Already allowed is left out.** With the current configuration (``current``: profile ->
  Matcher), records of names that profile now allows (logged before the last reload) are
  dropped, and listed as "already allowed by FILE:LINE".
- **IDNA.** Lines are written in the form allowlist matching uses (punycode, lower case);
  the Unicode spelling goes into the comment. Every line passes ``allowlist.parse_pattern``
  before it is offered (a name that is not a host name is listed, not suggested), so the
  block always parses with ``allowlist.parse_lines``.
- **Output.** ``render`` is diff-like text for people (``+name  # 4 queries, first ...,
  profile agent`` under a ``# domain`` header per registrable domain); ``allowlist_text``
  is the same block without the ``+``, with a dated header, for ``--write``; ``to_json``
  for scripts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

import dns.exception
import dns.name
from publicsuffixlist import PublicSuffixList

from .allowlist import Labels, Matcher, parse_pattern
from .errors import ConfigError
from .events import QueryAudited, QueryBlocked
from .policy import Verdict, decide

EVENTS = {QueryBlocked.MESSAGE_ID: "QueryBlocked", QueryAudited.MESSAGE_ID: "QueryAudited"}
FIELDS = (
    "EGRESSD_PROFILE",
    "EGRESSD_QNAME",
    "EGRESSD_QTYPE",
    "EGRESSD_VERDICT",
    "EGRESSD_RULE",
)
_REVERSE = ((b"in-addr", b"arpa"), (b"ip6", b"arpa"))


@dataclass(frozen=True, slots=True)
class Record:
    """One blocked (or audited) query, as the journal kept it."""

    at: float  # unix time
    event: str  # "QueryBlocked" | "QueryAudited"
    profile: str
    qname: str  # as logged: wire form as text, escapes included, case as the client sent it
    qtype: str
    verdict: str  # "block" | "deny"
    rule: str  # the deny line's file:line, or ""


@dataclass(frozen=True, slots=True)
class Tally:
    """One name to allow: how often and since when it was asked for."""

    name: str  # the allowlist form: IDNA (punycode), lower case, no trailing dot
    unicode: str  # the Unicode spelling when it differs from ``name``, else ""
    count: int
    first: float
    last: float
    profiles: tuple[str, ...]
    qtypes: tuple[str, ...]
    audited: int  # of ``count``: audit-mode records (answered, not blocked)


@dataclass(frozen=True, slots=True)
class Group:
    domain: str  # the registrable domain (public suffix + one label)
    names: tuple[Tally, ...]

    @property
    def alternative(self) -> str | None:
        """``**.domain`` when several names share the domain: offered, commented out."""
        return f"**.{self.domain}" if len(self.names) > 1 else None

    @property
    def count(self) -> int:
        return sum(t.count for t in self.names)


@dataclass(frozen=True, slots=True)
class Left:
    """A name that was asked for and is not suggested, and why."""

    name: str
    why: str  # "denied by FILE:LINE", "already allowed by FILE:LINE", ...
    count: int
    first: float


@dataclass(frozen=True, slots=True)
class Suggestion:
    groups: tuple[Group, ...]
    left: tuple[Left, ...]
    records: int  # records read (after the profile and time filters)
    since: float | None
    profile: str | None

    @property
    def lines(self) -> tuple[str, ...]:
        """The allowlist lines suggested (without comments)."""
        return tuple(t.name for g in self.groups for t in g.names)


def record_of(entry: Mapping[str, Any]) -> Record | None:
    """A journal entry (``journalctl -o json``) or a line of egressd's JSON log (stderr,
    no journald) -> Record; None for anything else or a record missing its fields."""
    event = EVENTS.get(str(entry.get("MESSAGE_ID") or entry.get("message_id") or ""))
    if event is None:
        return None
    values = [entry.get(f) for f in FIELDS]
    # journalctl writes a field that is not UTF-8, or that appears twice, as a list.
    if not all(isinstance(v, str) for v in values[:4]) or not isinstance(values[4], str | None):
        return None
    profile, qname, qtype, verdict, rule = (str(v or "") for v in values)
    if not profile or not qname:
        return None
    at: float
    try:
        if "__REALTIME_TIMESTAMP" in entry:
            at = int(entry["__REALTIME_TIMESTAMP"]) / 1e6
        else:
            at = float(entry["ts"])
    except (KeyError, TypeError, ValueError):
        return None
    return Record(at, event, profile, qname, qtype, verdict, rule)


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # the list bundled with the package: offline, ~50 ms


def registrable(name: str) -> str | None:
    """The registrable domain of an IDNA name (``a.b.co.uk`` -> ``b.co.uk``); None when the
    name is itself a public suffix (``co.uk``, ``github.io``, ``com``, an unknown TLD)."""
    found = _psl().privatesuffix(name)
    return str(found) if found else None


@dataclass(frozen=True, slots=True)
class _Name:
    text: str  # IDNA, lower case
    labels: Labels
    unicode: str


def _normal(qname: str) -> _Name | str:
    """The allowlist form of a logged name, or why it can't be one."""
    try:
        name = dns.name.from_text(qname, origin=dns.name.root)
        labels = tuple(label.lower() for label in name.labels[:-1])
        text = dns.name.Name(labels).to_text() if labels else ""
        parse_pattern(text, "suggest")  # what the allowlist will accept
    except (dns.exception.DNSException, ConfigError, UnicodeError, ValueError):
        # The allowlist would refuse it: an escaped dot, a space, a label too long...
        return "not a host name an allowlist line can name; not suggested"
    try:
        shown = dns.name.Name(labels).to_unicode()
    except (dns.exception.DNSException, UnicodeError):
        shown = text
    return _Name(text, labels, "" if shown == text else shown)


@dataclass
class _Acc:
    count: int = 0
    first: float = float("inf")
    last: float = 0.0
    audited: int = 0

    def add(self, r: Record) -> None:
        self.count += 1
        self.first = min(self.first, r.at)
        self.last = max(self.last, r.at)
        self.audited += r.event == "QueryAudited"

    def merge(self, other: _Acc) -> None:
        self.count += other.count
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        self.audited += other.audited


def suggest(
    records: Iterable[Record],
    *,
    profile: str | None = None,
    since: float | None = None,
    current: Mapping[str, Matcher] | None = None,
) -> Suggestion:
    """Group the blocked names by registrable domain; leave out denied, already allowed and
    impossible ones (each with its reason). ``current``: the profiles' matchers of the
    configuration in force now (None: not known, nothing is filtered as already allowed)."""
    wanted: dict[str, _Acc] = {}
    names: dict[str, _Name] = {}
    profiles: dict[str, set[str]] = {}
    qtypes: dict[str, set[str]] = {}
    left: dict[tuple[str, str], _Acc] = {}  # (name as shown, why)
    read = 0
    for r in records:
        if (profile is not None and r.profile != profile) or (since is not None and r.at < since):
            continue
        read += 1
        norm = _normal(r.qname)
        if isinstance(norm, str):
            left.setdefault((r.qname, norm), _Acc()).add(r)
            continue
        why = _why_not(norm, r, current)
        if why is not None:
            left.setdefault((norm.text, why), _Acc()).add(r)
            continue
        wanted.setdefault(norm.text, _Acc()).add(r)
        names[norm.text] = norm
        profiles.setdefault(norm.text, set()).add(r.profile)
        if r.qtype:
            qtypes.setdefault(norm.text, set()).add(r.qtype)
    # A name denied in one record is denied: deny lines stand, whatever other records say.
    denied = {key[0]: key for key in left if key[1].startswith("denied by")}
    by_domain: dict[str, list[Tally]] = {}
    for text, acc in wanted.items():
        if text in denied:
            left[denied[text]].merge(acc)
            continue
        domain = registrable(text)
        if domain is None:
            left[(text, "a public suffix (or a single label); not suggested")] = acc
            continue
        by_domain.setdefault(domain, []).append(
            Tally(
                name=text,
                unicode=names[text].unicode,
                count=acc.count,
                first=acc.first,
                last=acc.last,
                profiles=tuple(sorted(profiles[text])),
                qtypes=tuple(sorted(qtypes.get(text, ()))),
                audited=acc.audited,
            )
        )
    groups = tuple(
        Group(domain, tuple(sorted(tallies, key=lambda t: t.name)))
        for domain, tallies in sorted(by_domain.items())
    )
    return Suggestion(
        groups=groups,
        left=tuple(
            Left(name, why, acc.count, acc.first) for (name, why), acc in sorted(left.items())
        ),
        records=read,
        since=since,
        profile=profile,
    )


def _why_not(name: _Name, r: Record, current: Mapping[str, Matcher] | None) -> str | None:
    """Why this record's name is not to be suggested, or None."""
    labels = name.labels
    if len(labels) >= 2 and labels[-2:] in _REVERSE:
        return "a reverse lookup; not suggested"
    matcher = current.get(r.profile) if current is not None else None
    if matcher is not None:
        decision = decide(matcher, labels)
        if decision.verdict is Verdict.DENY:
            return f"denied by {decision.source}; not suggested"
        if decision.verdict is Verdict.ALLOW:
            if r.verdict == "deny":
                # The name is allowed, a deny line hit its CNAME chain: that line stands.
                return f"denied by {r.rule or 'a deny line'}; not suggested"
            return f"already allowed for profile {r.profile} by {decision.source}"
    if r.verdict == "deny":
        return f"denied by {r.rule or 'a deny line'}; not suggested"
    return None


# --------------------------------------------------------------------------- output


def _when(at: float, tz: tzinfo | None) -> str:
    return datetime.fromtimestamp(at, tz).strftime("%Y-%m-%d %H:%M:%S")


def _plural(n: int, word: str, many: str = "") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


def _queries(n: int) -> str:
    return _plural(n, "query", "queries")


def _comment(t: Tally, tz: tzinfo | None) -> str:
    parts = [_queries(t.count)]
    if t.qtypes:
        parts[0] += f" ({', '.join(t.qtypes)})"
    if t.audited:
        parts.append(f"{t.audited} answered in audit mode")
    parts.append(f"first {_when(t.first, tz)}")
    parts.append(f"profile {', '.join(t.profiles)}")
    if t.unicode:
        parts.insert(0, t.unicode)
    return ", ".join(parts)


def _block(s: Suggestion, tz: tzinfo | None, plus: str) -> list[str]:
    """The lines for each registrable domain; ``plus`` marks an allow line ("+" or "")."""
    out: list[str] = []
    for g in s.groups:
        out.append(f"# {g.domain}: {_plural(len(g.names), 'name')}, {_queries(g.count)}")
        width = max(len(t.name) for t in g.names)
        for t in g.names:
            out.append(f"{plus}{t.name.ljust(width)}  # {_comment(t, tz)}")
        if g.alternative:
            out.append(
                f"# or, instead of these {len(g.names)} lines, every name in {g.domain}: "
                f"{g.alternative}"
            )
        out.append("")
    return out


def render(s: Suggestion, *, tz: tzinfo | None = None) -> str:
    """Diff-like text for a person: ``+`` lines to add, grouped by registrable domain, and
    what was left out and why."""
    scope = f" of profile {s.profile}" if s.profile else ""
    since = f" since {_when(s.since, tz)}" if s.since is not None else ""
    head = [f"# {_plural(s.records, 'blocked or audited query record')}{scope}{since}"]
    if s.groups:
        n = len(s.lines)
        head.append(
            f"# {_plural(n, 'name')} to allow in {_plural(len(s.groups), 'registrable domain')}"
            " (review; `--write FILE` appends them to an allowlist file)"
        )
    else:
        head.append("# nothing to suggest")
    out = [*head, "", *_block(s, tz, "+")]
    if s.left:
        out.append("# left out:")
        for item in s.left:
            out.append(
                f"#   {item.name}: {item.why} ({_plural(item.count, 'record')}, "
                f"first {_when(item.first, tz)})"
            )
    return "\n".join(out).rstrip("\n") + "\n"


def allowlist_text(s: Suggestion, *, now: float, tz: tzinfo | None = None) -> str:
    """The block ``--write`` appends: a dated header comment, then the lines (no ``+``).

    Always parses with ``allowlist.parse_lines`` (every name went through parse_pattern)."""
    scope = f", profile {s.profile}" if s.profile else ""
    since = f" since {_when(s.since, tz)}" if s.since is not None else ""
    head = [
        f"# added by `egressd suggest` on {_when(now, tz)} "
        f"from blocked queries{since}{scope}; review, then `egressd reload`",
    ]
    return "\n".join([*head, *_block(s, tz, "")]).rstrip("\n") + "\n"


def to_json(s: Suggestion) -> dict[str, Any]:
    return {
        "records": s.records,
        "since": s.since,
        "profile": s.profile,
        "lines": list(s.lines),
        "groups": [
            {
                "domain": g.domain,
                "alternative": g.alternative,
                "names": [
                    {
                        "name": t.name,
                        "unicode": t.unicode or None,
                        "count": t.count,
                        "audited": t.audited,
                        "first": t.first,
                        "last": t.last,
                        "profiles": list(t.profiles),
                        "qtypes": list(t.qtypes),
                    }
                    for t in g.names
                ],
            }
            for g in s.groups
        ],
        "not_suggested": [
            {"name": i.name, "why": i.why, "count": i.count, "first": i.first} for i in s.left
        ],
    }
