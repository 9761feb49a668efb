"""The shipped presets (presets/*.list): names, grammar, comments, ports, no public
suffixes, and the upload hosts marked in the files equal those listed in docs/presets.md."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from publicsuffixlist import PublicSuffixList

from egressd.allowlist import Matcher, Rule, Scope, parse_lines, parse_pattern

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "presets"
DOCS = ROOT / "docs" / "presets.md"

# Issue 9's list: the ecosystems, then one preset per agent.
EXPECTED = {
    "python",
    "node",
    "github",
    "rust",
    "go",
    "ruby",
    "java",
    "huggingface",
    "containers",
    "debian",
    "claude-code",
    "codex",
    "gemini",
    "cursor",
}
NAME = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
# 443 everywhere; 22 for git over SSH, 80 for apt (plain HTTP, signed Release files).
PORTS = {22, 80, 443}
UPLOADS = re.compile(r"\bUPLOADS:\s*(\S.*)$")

_PSL = PublicSuffixList()


@dataclass(frozen=True)
class Line:
    lineno: int
    rule: Rule
    comment: str  # the text after '#', stripped ("" when there is none)


def rule_lines(text: str, filename: str) -> list[Line]:
    """Each pattern line with its trailing comment, split the way parse_lines splits."""
    out = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        content, _, comment = raw.partition("#")
        if content.strip():
            rule = parse_pattern(content, f"{filename}:{lineno}")
            out.append(Line(lineno, rule, comment.strip()))
    return out


def covers_public_suffix(rule: Rule) -> bool:
    """A bare TLD, or a name on the Public Suffix List (ICANN or private section): a line
    for it, or for everything below it, allows names nobody in particular owns."""
    host = b".".join(rule.labels).decode()
    return len(rule.labels) < 2 or _PSL.is_public(host)


def upload_patterns(text: str, filename: str) -> set[str]:
    return {ln.rule.pattern for ln in rule_lines(text, filename) if UPLOADS.search(ln.comment)}


def docs_upload_table(markdown: str) -> set[tuple[str, str]]:
    """(preset, pattern) rows of the table under '## Hosts that accept uploads'."""
    section = markdown.split("## Hosts that accept uploads", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in section.splitlines():
        m = re.match(r"^\|\s*`([^`]+)`\s*\|\s*`([^`]+)`\s*\|", line)
        if m:
            rows.add((m[1], parse_pattern(m[2], "docs").pattern))
    return rows


def preset_files() -> list[Path]:
    return sorted(PRESETS.glob("*.list"))


def preset_text(name: str) -> str:
    return (PRESETS / f"{name}.list").read_text(encoding="utf-8")


# -- the set of presets ---------------------------------------------------------------


def test_presets_are_exactly_the_issues_list() -> None:
    assert {p.stem for p in preset_files()} == EXPECTED


def test_the_presets_dir_holds_only_list_files() -> None:
    # Everything there is installed to /usr/share/egressd/presets and offered by name.
    assert sorted(p.name for p in PRESETS.iterdir() if p.suffix != ".list") == []


@pytest.mark.parametrize("path", preset_files(), ids=lambda p: p.name)
def test_file_name_is_a_valid_preset_name(path: Path) -> None:
    assert NAME.match(path.stem), path.name


def test_name_grammar_refuses_what_it_should() -> None:
    for bad in ("Python", "claude_code", "-node", "node-", "a--b", "go.list", ""):
        assert not NAME.match(bad), bad
    for good in ("go", "claude-code", "k8s"):
        assert NAME.match(good), good


# -- each preset ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parses(name: str) -> None:
    rules = parse_lines(preset_text(name), f"{name}.list")
    assert rules, f"{name}: no patterns"
    assert [ln.rule.pattern for ln in rule_lines(preset_text(name), name)] == [
        r.pattern for r in rules
    ]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_starts_with_a_header_comment(name: str) -> None:
    first = preset_text(name).split("\n", 1)[0]
    assert first.startswith(f"# {name}: ") and len(first) > len(f"# {name}: ") + 10, first


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_line_says_what_needs_it(name: str) -> None:
    missing = [ln.lineno for ln in rule_lines(preset_text(name), name) if len(ln.comment) < 10]
    assert missing == [], f"{name}.list: lines without a trailing comment: {missing}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_line_names_its_ports(name: str) -> None:
    for ln in rule_lines(preset_text(name), name):
        assert ln.rule.ports is not None, f"{name}.list:{ln.lineno} opens every port"
        assert set(ln.rule.ports) <= PORTS, f"{name}.list:{ln.lineno}: {ln.rule.ports}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_deny_lines(name: str) -> None:
    # A deny line in a preset would silently block what another preset or local.list
    # allows; denying is the operator's call (allowlist.d/local.list).
    denies = [ln.lineno for ln in rule_lines(preset_text(name), name) if ln.rule.deny]
    assert denies == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_line_covers_a_public_suffix_or_a_tld(name: str) -> None:
    bad = [
        f"{ln.lineno}: {ln.rule.pattern}"
        for ln in rule_lines(preset_text(name), name)
        if covers_public_suffix(ln.rule)
    ]
    assert bad == []


def test_public_suffix_check_catches_them() -> None:
    # The positive twin of the test above: the check does flag what it must.
    for text in ("com", "*.co.uk", "**.githubusercontent.com", "*.io", "**.googleapis.com"):
        assert covers_public_suffix(parse_pattern(text, "t")), text
    for text in ("raw.githubusercontent.com", "*.cursor.sh", "storage.googleapis.com"):
        assert not covers_public_suffix(parse_pattern(text, "t")), text


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_wildcards_say_why(name: str) -> None:
    for ln in rule_lines(preset_text(name), name):
        if ln.rule.scope is not Scope.EXACT:
            assert "wildcard:" in ln.comment, f"{name}.list:{ln.lineno}: why the wildcard?"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_duplicate_lines(name: str) -> None:
    patterns = [ln.rule.pattern for ln in rule_lines(preset_text(name), name)]
    assert len(patterns) == len(set(patterns)), sorted(p for p in patterns if patterns.count(p) > 1)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_upload_marks_say_what_they_accept(name: str) -> None:
    for ln in rule_lines(preset_text(name), name):
        if "UPLOADS" in ln.comment:
            m = UPLOADS.search(ln.comment)
            assert m and len(m[1]) >= 10, f"{name}.list:{ln.lineno}: 'UPLOADS: <what>'"


# -- the docs -------------------------------------------------------------------------


def test_upload_hosts_in_the_docs_equal_those_marked_in_the_presets() -> None:
    marked = {(n, p) for n in EXPECTED for p in upload_patterns(preset_text(n), n)}
    listed = docs_upload_table(DOCS.read_text(encoding="utf-8"))
    assert marked, "no preset marks an upload host"
    assert sorted(listed - marked) == [], "in docs/presets.md but not marked in a preset"
    assert sorted(marked - listed) == [], "marked in a preset but not in docs/presets.md"


def test_upload_parsers_see_what_they_must() -> None:
    # The positive twin: both parsers find a mark / a row when there is one.
    text = "# x: header\na.example ports=443  # needs; UPLOADS: pushes\nb.example  # reads\n"
    assert upload_patterns(text, "x") == {"a.example"}
    doc = "## Hosts that accept uploads\n\n| p | h | w |\n|---|---|---|\n"
    doc += "| `x` | `A.example` | w |\n"
    assert docs_upload_table(doc) == {("x", "a.example")}


def test_docs_list_every_preset() -> None:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## The presets", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\|\s*`([a-z0-9-]+)`\s*\|", section, flags=re.MULTILINE))
    assert rows == EXPECTED


# -- what the presets are for ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hosts"),
    [
        # The allowlist files shipped before presets (etc/egressd/allowlist.d/*.txt):
        # the default config enables these three presets, so nothing it allowed is lost.
        ("python", ["pypi.org", "files.pythonhosted.org"]),
        ("node", ["registry.npmjs.org", "registry.yarnpkg.com"]),
        (
            "github",
            [
                "github.com",
                "api.github.com",
                "codeload.github.com",
                "objects.githubusercontent.com",
                "raw.githubusercontent.com",
                "release-assets.githubusercontent.com",
            ],
        ),
        # Issue 9: the default allowlist blocked the agent's own model API.
        ("claude-code", ["api.anthropic.com"]),
        ("codex", ["api.openai.com"]),
        ("gemini", ["generativelanguage.googleapis.com", "cloudcode-pa.googleapis.com"]),
        ("cursor", ["api2.cursor.sh"]),
        ("debian", ["deb.debian.org", "security.debian.org"]),
        ("go", ["proxy.golang.org", "sum.golang.org"]),
    ],
)
def test_preset_allows(name: str, hosts: list[str]) -> None:
    matcher = Matcher(parse_lines(preset_text(name), f"{name}.list"))
    for host in hosts:
        rule = matcher.allow_rule(parse_pattern(host, "t").labels)
        assert rule is not None, f"{name} does not allow {host}"
        assert rule.ports is not None and 443 in rule.ports


def test_github_allows_ssh_and_debian_plain_http() -> None:
    github = Matcher(parse_lines(preset_text("github"), "github.list"))
    assert (rule := github.allow_rule(parse_pattern("github.com", "t").labels))
    assert rule.ports == (22, 443)
    debian = Matcher(parse_lines(preset_text("debian"), "debian.list"))
    assert (rule := debian.allow_rule(parse_pattern("deb.debian.org", "t").labels))
    assert rule.ports == (80, 443)


def test_presets_do_not_allow_what_they_leave_out() -> None:
    # The hosts left out on purpose (publishing, or storage anyone can write to) stay out,
    # in every preset; the positive twin is test_preset_allows.
    matcher = Matcher(r for n in EXPECTED for r in parse_lines(preset_text(n), n))
    for host in (
        "upload.pypi.org",
        "uploads.github.com",
        "gist.github.com",
        "scans.gradle.com",
        "www.googleapis.com",
        "registry.k8s.io",
        "evil.githubusercontent.com",
        "anthropic.com",
    ):
        assert matcher.allow_rule(parse_pattern(host, "t").labels) is None, host
