"""``egressd check``'s core (egressd.explain): decisions with their line, the fix for a
block, and ``resolve_live`` against a fake upstream resolver."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest

from egressd import dnswire, explain
from egressd.allowlist import Labels
from egressd.errors import UpstreamError
from egressd.policy import Policy, Verdict, decide
from egressd.sources import Sources, load


def write(tmp_path: Path, profiles: str, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    path = tmp_path / "egressd.toml"
    path.write_text(f'[daemon]\nupstreams = ["192.0.2.53"]\n\n{profiles}', encoding="utf-8")
    return path


def policy_of(path: Path) -> Policy:
    return Policy(load(str(path), Sources(subuid_file=str(path.parent / "no-subuid"))))


AGENT = """
[profiles.agent]
users = [64123]
port = 153
allowlists = ["python.list", "git.list"]
ports = [443]
"""

FILES = {
    "python.list": "# python\npypi.org\n**.pythonhosted.org\n!evil.pypi.org\n**.pypi.org\n",
    "git.list": "github.com ports=443,22\n*.githubusercontent.com\n",
}


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return policy_of(write(tmp_path, AGENT, FILES))


def one(policy: Policy, name: str, profile: str | None = "agent") -> explain.Explanation:
    (e,) = explain.check(policy, name, profile, "A")
    return e


# --- decisions -------------------------------------------------------------------------------


def test_allowed_names_the_line_and_its_file_line(policy: Policy, tmp_path: Path) -> None:
    e = one(policy, "files.pythonhosted.org")
    assert e.verdict is Verdict.ALLOW
    assert e.rule is not None and e.rule.pattern == "**.pythonhosted.org"
    assert e.rule.source == f"{tmp_path}/python.list:3"
    assert e.ports == (443,)  # the profile's ports: the line has none of its own
    assert e.fix is None and e.answered


def test_a_ports_line_grants_its_own_ports(policy: Policy, tmp_path: Path) -> None:
    e = one(policy, "github.com")
    assert e.verdict is Verdict.ALLOW and e.ports == (22, 443)
    assert e.to_json()["source"] == f"{tmp_path}/git.list:1"


def test_deny_names_the_deny_line_and_the_allow_line_it_overrides(
    policy: Policy, tmp_path: Path
) -> None:
    e = one(policy, "evil.pypi.org")
    assert e.verdict is Verdict.DENY and e.fix is None and not e.answered
    assert e.rule is not None and e.rule.source == f"{tmp_path}/python.list:4"
    assert e.also_allowed_by is not None and e.also_allowed_by.pattern == "**.pypi.org"
    j = e.to_json()
    assert j["verdict"] == "deny" and j["rule"] == "!evil.pypi.org"
    assert j["also_allowed_by"] == {"rule": "**.pypi.org", "source": f"{tmp_path}/python.list:5"}


def test_the_same_decision_as_the_pipeline_for_a_wire_query(policy: Policy) -> None:
    """check must see the labels the pipeline sees: those dnswire reads off a client's query
    (dnspython writes a unicode name in IDNA, as a resolver library does)."""
    for text in ("Files.PythonHosted.org.", "evil.pypi.org", "bücher.example", "x.y.pypi.org"):
        wire = dns.message.make_query(dns.name.from_unicode(text), "A").to_wire()
        q = dnswire.parse_query(wire)
        assert q is not None
        e = one(policy, text)
        assert e.name.labels == q.labels, text
        assert e.verdict is decide(policy.by_name["agent"].matcher, q.labels).verdict


def test_unicode_case_and_trailing_dot_are_read_like_the_allowlist(tmp_path: Path) -> None:
    pol = policy_of(write(tmp_path, AGENT, {**FILES, "git.list": "bücher.example\n"}))
    for text in ("Bücher.Example.", "xn--bcher-kva.example", "XN--BCHER-KVA.EXAMPLE"):
        e = one(pol, text)
        assert e.verdict is Verdict.ALLOW, text
        assert e.name.text == "xn--bcher-kva.example" and e.name.given == text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "not a domain name"),
        ("a b.example", "spaces"),
        ("*.example.com", "is a pattern"),
        ("**.example.com", "is a pattern"),
        ("!example.com", "is a pattern"),
        (".example.com", "starts with a dot"),
        ("a..example.com", "not a valid domain name"),
        ("exa$mple.com", "not a valid host name label"),
        ("x" * 64 + ".com", "not a valid domain name"),
        ("straße.de", "punycode"),  # IDNA 2003 and 2008 disagree: the grammar refuses it too
        ("example.com ports=443", "spaces"),
    ],
)
def test_an_invalid_name_is_refused_with_a_reason(policy: Policy, text: str, words: str) -> None:
    with pytest.raises(explain.BadName, match=words):
        explain.check(policy, text, None, "A")


def test_unknown_profile_and_bad_type_are_refused(policy: Policy) -> None:
    with pytest.raises(explain.UnknownProfile, match=r"no profile 'nope' \(profiles: agent\)"):
        explain.check(policy, "pypi.org", "nope", "A")
    with pytest.raises(explain.CheckError, match="not a DNS record type"):
        explain.check(policy, "pypi.org", None, "BOGUS")
    with pytest.raises(explain.CheckError, match="AXFR"):
        explain.check(policy, "pypi.org", None, "axfr")
    assert one(policy, "pypi.org").qtype == "A"
    assert explain.check(policy, "pypi.org", None, "aaaa")[0].qtype == "AAAA"


# --- the fix for a block ---------------------------------------------------------------------


def test_block_says_which_line_to_add_and_where(policy: Policy, tmp_path: Path) -> None:
    e = one(policy, "files.example.net")
    assert e.verdict is Verdict.BLOCK and e.rule is None and e.fix is not None
    assert e.fix.line == "files.example.net"
    # No allowlist holds a relative of it: the profile's first file.
    assert e.fix.file == f"{tmp_path}/python.list" and e.fix.key == ""
    assert (e.fix.wider, e.fix.wider_covers) == (
        "**.example.net",
        "example.net and every name below it",
    )
    assert e.ports == (443,)  # what the line would grant: the profile's ports


def test_the_fix_goes_to_the_file_with_a_relative_of_the_name(
    policy: Policy, tmp_path: Path
) -> None:
    e = one(policy, "objects.github.com")
    assert e.fix is not None and e.fix.file == f"{tmp_path}/git.list"
    # Sharing only the public suffix ("org") is no kinship.
    e = one(policy, "example.org")
    assert e.fix is not None and e.fix.file == f"{tmp_path}/python.list"


def test_the_lines_to_add_parse_and_then_allow_the_name(tmp_path: Path) -> None:
    """The advice works: appending the line (or the wider form) makes the name allowed."""
    for name in ("files.example.net", "bücher.example", "deep.a.b.example.co.uk"):
        for wider in (False, True):
            d = tmp_path / f"{abs(hash((name, wider)))}"
            d.mkdir()
            pol = policy_of(write(d, AGENT, FILES))
            e = one(pol, name)
            assert e.fix is not None
            line = e.fix.wider if wider else e.fix.line
            assert line
            with open(e.fix.file, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
            assert one(policy_of(d / "egressd.toml"), name).verdict is Verdict.ALLOW, line


def test_without_allowlist_files_the_config_allow_key_is_the_place(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[profiles.agent]\nusers = [64123]\nport = 153\nallow = ["*.example.net"]\n',
        {},
    )
    e = one(policy_of(path), "example.net")
    assert e.fix is not None
    assert (e.fix.file, e.fix.key) == (str(path), "profiles.agent.allow")
    # The near miss: "*." does not cover the apex.
    assert "*.example.net" in e.fix.hint and "**.example.net matches example.net too" in e.fix.hint


@pytest.mark.parametrize(
    ("name", "wider"),
    [
        ("a.b.example.co.uk", "**.example.co.uk"),
        ("example.co.uk", "**.example.co.uk"),
        ("co.uk", ""),  # a public suffix: no "**." advice
        ("com", ""),
        # A private-section suffix: never "**.cloudfront.net" (every customer of a CDN).
        ("d111.cloudfront.net", "**.d111.cloudfront.net"),
    ],
)
def test_the_wider_form_stops_at_the_registrable_domain(
    policy: Policy, name: str, wider: str
) -> None:
    e = one(policy, name)
    assert e.fix is not None and e.fix.wider == wider


# --- profiles and audit mode -----------------------------------------------------------------

TWO = (
    AGENT
    + """
[profiles.learn]
users = [64124]
port = 154
mode = "audit"
allow = ["*.example.net", "!ads.example.net"]
"""
)


def test_every_profile_unless_one_is_asked(tmp_path: Path) -> None:
    pol = policy_of(write(tmp_path, TWO, FILES))
    both = explain.check(pol, "files.example.net", None, "A")
    assert [(e.profile, e.verdict) for e in both] == [
        ("agent", Verdict.BLOCK),
        ("learn", Verdict.ALLOW),
    ]
    (learn,) = explain.check(pol, "files.example.net", "learn", "A")
    lines = (tmp_path / "egressd.toml").read_text(encoding="utf-8").split("\n")
    allow = lines.index('allow = ["*.example.net", "!ads.example.net"]') + 1
    assert learn.rule is not None and learn.rule.source == f"{tmp_path}/egressd.toml:{allow}"


def test_an_audit_profile_says_it_answers_blocked_names_anyway(tmp_path: Path) -> None:
    pol = policy_of(write(tmp_path, TWO, FILES))
    blocked = one(pol, "pypi.org", "learn")
    assert blocked.verdict is Verdict.BLOCK and blocked.mode == "audit" and blocked.answered
    assert blocked.to_json()["answered"] is True
    denied = one(pol, "ads.example.net", "learn")
    assert denied.verdict is Verdict.DENY and denied.answered
    assert not one(pol, "ads.example.net", "agent").answered  # enforce: not answered


# --- resolve_live ----------------------------------------------------------------------------


class FakeResolver:
    """Answers from a table of records; remembers every question it was asked."""

    def __init__(self, records: dict[str, list[tuple[str, str, int]]], fail: str = "") -> None:
        self.records = records
        self.fail = fail
        self.asked: list[tuple[Labels, int, bool]] = []

    async def resolve(self, labels: Labels, qtype: int, rd: bool) -> bytes:
        self.asked.append((labels, qtype, rd))
        if self.fail:
            raise UpstreamError(self.fail)
        name = b".".join(labels).decode() + "."
        q = dns.message.make_query(name, dns.rdatatype.RdataType(qtype))
        r = dns.message.make_response(q)
        owner = name
        for _ in range(8):
            rows = self.records.get(owner, [])
            for rtype, data, ttl in rows:
                r.answer.append(dns.rrset.from_text(owner, ttl, "IN", rtype, data))
            cname = [data for rtype, data, _ in rows if rtype == "CNAME"]
            if not cname:
                break
            owner = cname[0]
        return r.to_wire()


CDN = {
    "alias.pypi.org.": [("CNAME", "edge.cdn.example.", 300)],
    "edge.cdn.example.": [("CNAME", "e1.edge.cdn.example.", 60)],
    "e1.edge.cdn.example.": [("A", "203.0.113.30", 20), ("A", "10.1.2.3", 20)],
    "sneaky.pypi.org.": [("CNAME", "tracker.example.", 300)],
    "tracker.example.": [("A", "203.0.113.31", 300)],
}


def live(
    pol: Policy, resolver: FakeResolver, name: str, profile: str | None = "agent"
) -> dict[str, object]:
    return asyncio.run(explain.resolve_live(pol, resolver, profile, name, "A"))


def test_resolve_live_shows_the_cname_chain_and_addresses(policy: Policy) -> None:
    resolver = FakeResolver(CDN)
    result = live(policy, resolver, "Alias.PyPI.org")
    assert resolver.asked == [((b"alias", b"pypi", b"org"), 1, True)]
    assert result["name"] == "alias.pypi.org" and result["type"] == "A"
    checks = result["checks"]
    assert isinstance(checks, list) and checks[0]["verdict"] == "allow"
    resolved = result["resolved"]
    assert isinstance(resolved, dict)
    assert resolved["rcode"] == "NOERROR" and resolved["error"] == ""
    assert resolved["chain"] == [
        {"owner": "alias.pypi.org", "target": "edge.cdn.example", "ttl": 300},
        {"owner": "edge.cdn.example", "target": "e1.edge.cdn.example", "ttl": 60},
    ]
    assert resolved["addresses"] == [
        {"ip": "203.0.113.30", "family": 4, "ttl": 20},
        {"ip": "10.1.2.3", "family": 4, "ttl": 20},
    ]
    (p,) = resolved["profiles"]
    assert p["profile"] == "agent" and p["denied_by"] is None
    # What the rebinding guard would remove from the agent's answer.
    assert [f["ip"] for f in p["filtered"]] == ["10.1.2.3"]
    assert "10.0.0.0/8" in p["filtered"][0]["why"]


def test_resolve_live_reports_a_deny_line_on_the_cname_chain(tmp_path: Path) -> None:
    pol = policy_of(write(tmp_path, AGENT, {**FILES, "git.list": "!tracker.example\n"}))
    result = live(pol, FakeResolver(CDN), "sneaky.pypi.org")
    resolved = result["resolved"]
    assert isinstance(resolved, dict)
    (p,) = resolved["profiles"]
    assert p["denied_by"] == {
        "name": "tracker.example",
        "rule": "!tracker.example",
        "source": f"{tmp_path}/git.list:1",
    }


@pytest.mark.parametrize("name", ["files.example.net", "evil.pypi.org"])
def test_resolve_live_never_asks_about_a_blocked_name(policy: Policy, name: str) -> None:
    resolver = FakeResolver(CDN)
    result = live(policy, resolver, name)
    assert resolver.asked == []
    assert result["resolved"] is None
    checks = result["checks"]
    assert isinstance(checks, list) and checks[0]["verdict"] in ("block", "deny")
    # Positive twin: the same resolver is asked about an allowed name.
    live(policy, resolver, "pypi.org")
    assert resolver.asked == [((b"pypi", b"org"), 1, True)]


def test_resolve_live_does_not_resolve_for_an_audit_profile_either(tmp_path: Path) -> None:
    """Audit mode answers blocked names for the agent; check --resolve still does not
    send them anywhere: it resolves what the allowlist allows, nothing else."""
    pol = policy_of(write(tmp_path, TWO, FILES))
    resolver = FakeResolver(CDN)
    assert live(pol, resolver, "pypi.org", "learn")["resolved"] is None
    assert resolver.asked == []
    # Every profile: allowed in one is enough; only the allowing profile is judged.
    result = live(pol, resolver, "alias.pypi.org", None)
    resolved = result["resolved"]
    assert isinstance(resolved, dict)
    assert [p["profile"] for p in resolved["profiles"]] == ["agent"]
    assert len(resolver.asked) == 1


def test_resolve_live_reports_an_upstream_failure(policy: Policy) -> None:
    result = live(policy, FakeResolver({}, fail="no upstream answered"), "pypi.org")
    resolved = result["resolved"]
    assert isinstance(resolved, dict)
    assert resolved["error"] == "no upstream answered" and resolved["chain"] == []


def test_resolve_live_refuses_bad_input_before_any_query(policy: Policy) -> None:
    resolver = FakeResolver(CDN)
    with pytest.raises(explain.BadName):
        live(policy, resolver, "*.pypi.org")
    with pytest.raises(explain.UnknownProfile):
        live(policy, resolver, "pypi.org", "nope")
    assert resolver.asked == []
