"""Why a name is allowed or blocked, and what would change it (``egressd check``).

``check`` decides a name against each profile exactly as the pipeline does (the same
``policy.decide`` on the same lower-cased IDNA labels) and says which allowlist line
decided, which ports that line grants, and, for a blocked name, the line to add and the
file to add it to; for a denied one, the deny line that has to go.

``resolve_live`` is the daemon's side of ``check --resolve``: it resolves a name the policy
allows through the daemon's own upstream resolver and reports the CNAME chain and the
addresses. It never resolves a name the policy blocks (asking an upstream about a blocked
name is the DNS exfiltration egressd exists to stop), grants nothing and leaves the cache
alone: it only reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dns.rcode
import dns.rdatatype

from . import answers, dnswire, rebind
from .allowlist import Labels, Rule, Scope, parse_pattern
from .config import Profile
from .errors import ConfigError, UpstreamError
from .pipeline import Resolver, ports_of
from .policy import Policy, ProfilePolicy, Verdict, decide, decide_chain
from .suggest import registrable


class CheckError(ValueError):
    """The name, type or profile asked about is not one egressd can check."""


class BadName(CheckError):
    """Not a domain name."""


class UnknownProfile(CheckError):
    """No such profile."""


@dataclass(frozen=True, slots=True)
class Name:
    """A name as the policy sees it: lower-cased IDNA labels, no root label."""

    text: str  # ASCII (punycode) form, no final dot, e.g. "xn--bcher-kva.example"
    given: str  # as the user typed it, e.g. "Bücher.example."
    labels: Labels


@dataclass(frozen=True, slots=True)
class Fix:
    """How to allow a blocked name: the line, and where it goes."""

    line: str  # the pattern to add, e.g. "files.example.net"
    file: str  # the allowlist file to add it to, or the config file (then ``key`` is set)
    key: str  # "profiles.agent.allow" when the config's inline list is the place, else ""
    wider: str  # the `**.` form covering more, "" when none fits
    wider_covers: str  # what ``wider`` matches, in words
    hint: str  # a near miss worth knowing (e.g. a `*.` line that misses the apex), or ""


@dataclass(frozen=True, slots=True)
class Explanation:
    """One name against one profile."""

    profile: str
    mode: str  # "enforce" | "audit"
    name: Name
    qtype: str
    verdict: Verdict
    rule: Rule | None  # the deciding line (the allow line, or the deny line); None: block
    ports: tuple[int, ...]  # what its addresses are (or would be) granted on; (): every port
    fix: Fix | None  # for a block
    also_allowed_by: Rule | None  # for a deny: an allow line the deny overrides

    @property
    def answered(self) -> bool:
        """The agent gets an answer: allowed, or an audit profile (which answers all)."""
        return self.verdict is Verdict.ALLOW or self.mode == "audit"

    def to_json(self) -> dict[str, Any]:
        fix = self.fix
        return {
            "profile": self.profile,
            "mode": self.mode,
            "name": self.name.text,
            "input": self.name.given,
            "type": self.qtype,
            "verdict": self.verdict.value,
            "rule": self.rule.pattern if self.rule else None,
            "source": self.rule.source if self.rule else None,
            "ports": list(self.ports),
            "answered": self.answered,
            "fix": None
            if fix is None
            else {
                "line": fix.line,
                "file": fix.file,
                "key": fix.key,
                "wider": fix.wider,
                "wider_covers": fix.wider_covers,
                "hint": fix.hint,
            },
            "also_allowed_by": None
            if self.also_allowed_by is None
            else {"rule": self.also_allowed_by.pattern, "source": self.also_allowed_by.source},
        }


def parse_name(text: str) -> Name:
    """The name's labels as the allowlist grammar reads a pattern: IDNA for unicode input,
    case and one trailing dot ignored. BadName says what is wrong."""
    given = text
    stripped = text.strip()
    if not stripped or stripped != text or any(c.isspace() for c in stripped):
        raise BadName(f"{given!r} is not a domain name (empty, or it has spaces)")
    if stripped.startswith("!") or "*" in stripped:
        raise BadName(f"{given!r} is a pattern; check a name (e.g. {stripped.lstrip('!*.')!r})")
    if stripped.startswith("."):
        raise BadName(f"{given!r} is not a domain name (it starts with a dot)")
    try:
        rule = parse_pattern(stripped, "check")
    except ConfigError as err:
        raise BadName(f"{given!r} is not a valid domain name: {err.detail}") from None
    return Name(b".".join(rule.labels).decode("ascii"), given, rule.labels)


def parse_type(text: str) -> tuple[str, int]:
    """("AAAA", 28) from "aaaa"; the meta types (AXFR, OPT, ...) but ANY are refused."""
    try:
        rdtype = dns.rdatatype.from_text(text)
    except (dns.rdatatype.UnknownRdatatype, ValueError):
        raise CheckError(f"{text!r} is not a DNS record type (A, AAAA, TXT, TYPE65, ...)") from None
    if dns.rdatatype.is_metatype(rdtype) and rdtype != dns.rdatatype.ANY:
        raise CheckError(f"type {dns.rdatatype.to_text(rdtype)} is not a query egressd answers")
    return dns.rdatatype.to_text(rdtype), int(rdtype)


def profiles_of(policy: Policy, profile: str | None) -> list[ProfilePolicy]:
    if profile is None:
        return list(policy.by_name.values())
    pp = policy.by_name.get(profile)
    if pp is None:
        known = ", ".join(policy.by_name)
        raise UnknownProfile(f"no profile {profile!r} (profiles: {known})")
    return [pp]


def check(policy: Policy, name: str, profile: str | None, qtype: str) -> list[Explanation]:
    """The decision on ``name`` in ``profile`` (every profile when None), and why."""
    parsed = parse_name(name)
    type_text, _ = parse_type(qtype)
    return [
        explain(pp, parsed, type_text, policy.config.path) for pp in profiles_of(policy, profile)
    ]


def explain(pp: ProfilePolicy, name: Name, qtype: str, config_path: str) -> Explanation:
    decision = decide(pp.matcher, name.labels)
    p = pp.profile
    fix = _fix(p, name, config_path) if decision.verdict is Verdict.BLOCK else None
    overridden = pp.matcher.allow_rule(name.labels) if decision.verdict is Verdict.DENY else None
    return Explanation(
        profile=p.name,
        mode=p.mode,
        name=name,
        qtype=qtype,
        verdict=decision.verdict,
        rule=decision.rule,
        ports=ports_of(decision, pp),
        fix=fix,
        also_allowed_by=overridden,
    )


def _fix(p: Profile, name: Name, config_path: str) -> Fix:
    file, key = _where(p, name, config_path)
    wider, covers = _wider(name)
    hint = ""
    for rule in p.rules:
        # "*.example.com" does not match example.com itself: the commonest near miss.
        if not rule.deny and rule.scope is Scope.BELOW and rule.labels == name.labels:
            hint = (
                f"{rule.pattern} ({rule.source}) matches only names below {name.text}; "
                f"**.{name.text} matches {name.text} too"
            )
            break
    return Fix(name.text, file, key, wider, covers, hint)


def _where(p: Profile, name: Name, config_path: str) -> tuple[str, str]:
    """The allowlist file of the profile that already holds the closest relative of the
    name (most labels in common beyond its public suffix), else its first allowlist file,
    else the config's inline ``allow`` list."""
    if not p.allowlists:
        return config_path, f"profiles.{p.name}.allow"
    domain = registrable(name.text)  # its public suffix is one label shorter
    floor = max(len(name.labels) if domain is None else domain.count("."), 1)
    best, best_common = p.allowlists[0], floor
    for rule in p.rules:
        file = rule.source.rsplit(":", 1)[0]
        if rule.deny or file not in p.allowlists:
            continue
        common = _common_suffix(rule.labels, name.labels)
        if common > best_common:
            best, best_common = file, common
    return best, ""


def _common_suffix(a: Labels, b: Labels) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return n


def _wider(name: Name) -> tuple[str, str]:
    """The `**.` alternative: the registrable domain and all below it (``files.example.net``
    -> ``**.example.net``). None for a public suffix (``**.co.uk`` would be half a country,
    ``**.cloudfront.net`` everybody's CDN names)."""
    domain = registrable(name.text)
    if domain is None:
        return "", ""
    return f"**.{domain}", f"{domain} and every name below it"


# --- check --resolve (the daemon's side) -----------------------------------------------------


async def resolve_live(
    policy: Policy,
    resolver: Resolver,
    profile: str | None,
    name: str,
    qtype: str,
    local: frozenset[rebind.IPAddress] = frozenset(),
) -> dict[str, Any]:
    """Decide ``name`` under the running policy and, only if some profile asked allows it,
    resolve it through ``resolver`` (the daemon's upstream) and report what came back.

    Returns ``{"name", "type", "checks": [Explanation.to_json()...], "resolved": R}`` where
    R is None when no profile asked allows the name (no query was sent), else
    ``{"rcode", "chain": [{"owner", "target", "ttl"}], "addresses": [{"ip", "family",
    "ttl"}], "error": str, "profiles": [{"profile", "denied_by": None | {"name", "rule",
    "source"}, "filtered": [{"ip", "why"}]}]}`` (per allowed profile: a deny line on a CNAME
    target, and the addresses its rebinding guard would remove; ``local`` is the host's
    own addresses for that). ``error`` is set (and the rest empty) when the upstream gave
    no usable answer. Nothing is granted or cached. CheckError for a bad name, type or
    profile.
    """
    parsed = parse_name(name)
    type_text, rdtype = parse_type(qtype)
    profiles = profiles_of(policy, profile)
    checks = [explain(pp, parsed, type_text, policy.config.path) for pp in profiles]
    result: dict[str, Any] = {
        "name": parsed.text,
        "type": type_text,
        "checks": [c.to_json() for c in checks],
        "resolved": None,
    }
    allowed = [pp for pp, c in zip(profiles, checks, strict=True) if c.verdict is Verdict.ALLOW]
    if not allowed:
        return result  # blocked everywhere asked: never sent anywhere
    resolved: dict[str, Any] = {
        "rcode": "",
        "chain": [],
        "addresses": [],
        "profiles": [],
        "error": "",
    }
    result["resolved"] = resolved
    try:
        wire = await resolver.resolve(parsed.labels, rdtype, True)
        response = dnswire.parse_response(wire)
    except UpstreamError as err:
        resolved["error"] = str(err)
        return result
    except dnswire.WireError as err:
        resolved["error"] = f"malformed answer: {err}"
        return result
    ans = answers.extract(response)
    resolved["rcode"] = dns.rcode.to_text(dns.rcode.Rcode.make(response.rcode))
    resolved["chain"] = _chain(ans)
    resolved["addresses"] = [{"ip": a.ip, "family": a.family, "ttl": a.ttl} for a in ans.addresses]
    resolved["profiles"] = [_on_chain(pp, ans, local) for pp in allowed]
    return result


def _chain(ans: answers.Answer) -> list[dict[str, Any]]:
    hops: list[dict[str, Any]] = []
    for r in ans.records:
        if r.rtype == answers.TYPE_CNAME:
            hops.append(
                {
                    "owner": _text(r.owner),
                    "target": _text(r.target),
                    "ttl": r.ttl,
                }
            )
    return hops


def _on_chain(
    pp: ProfilePolicy, ans: answers.Answer, local: frozenset[rebind.IPAddress]
) -> dict[str, Any]:
    """What this profile's pipeline would make of the answer (it grants nothing here)."""
    deny = decide_chain(pp.matcher, ans.chain[1:])
    denied_by = None
    if deny is not None and deny.rule is not None:
        target = next(t for t in ans.chain[1:] if pp.matcher.deny_rule(t) is deny.rule)
        denied_by = {"name": _text(target), "rule": deny.rule.pattern, "source": deny.source}
    p = pp.profile
    screened = rebind.screen(
        [a.ip for a in ans.addresses],
        rebind.Exceptions(p.private_cidrs, p.private_names),
        local,
        ans.chain[0],
    )
    return {
        "profile": p.name,
        "denied_by": denied_by,
        "filtered": [{"ip": d.ip, "why": str(d.why)} for d in screened.dropped],
    }


def _text(labels: Labels | Sequence[bytes]) -> str:
    return dnswire.name_text(tuple(labels))
