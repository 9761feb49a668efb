"""Allowlist grammar and matching (egressd.allowlist)."""

from __future__ import annotations

import dns.message
import dns.name
import pytest

from egressd.allowlist import Matcher, Rule, Scope, labels_of, parse_lines, parse_pattern
from egressd.errors import ConfigError
from egressd.policy import Verdict, decide


def matcher(*patterns: str) -> Matcher:
    return Matcher(parse_pattern(p, f"test:{i}") for i, p in enumerate(patterns, start=1))


def verdict(m: Matcher, name: str | dns.name.Name) -> Verdict:
    if isinstance(name, str):
        name = dns.name.from_text(name)
    return decide(m, labels_of(name)).verdict


def allowed(m: Matcher, name: str | dns.name.Name) -> bool:
    return verdict(m, name) is Verdict.ALLOW


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pattern", "labels", "scope", "deny"),
    [
        ("example.com", "example.com", (b"example", b"com"), Scope.EXACT, False),
        ("*.example.com", "*.example.com", (b"example", b"com"), Scope.BELOW, False),
        ("**.example.com", "**.example.com", (b"example", b"com"), Scope.SUBTREE, False),
        ("!ads.example.com", "!ads.example.com", (b"ads", b"example", b"com"), Scope.EXACT, True),
        (
            "! **.Ads.Example.COM",
            "!**.ads.example.com",
            (b"ads", b"example", b"com"),
            Scope.SUBTREE,
            True,
        ),
        ("  EXAMPLE.Com.  ", "example.com", (b"example", b"com"), Scope.EXACT, False),
        (
            "_dmarc.example.com",
            "_dmarc.example.com",
            (b"_dmarc", b"example", b"com"),
            Scope.EXACT,
            False,
        ),
        (
            "bücher.example",
            "xn--bcher-kva.example",
            (b"xn--bcher-kva", b"example"),
            Scope.EXACT,
            False,
        ),
        (
            "**.BÜCHER.example",
            "**.xn--bcher-kva.example",
            (b"xn--bcher-kva", b"example"),
            Scope.SUBTREE,
            False,
        ),
    ],
)
def test_parse_pattern_normalises(
    text: str, pattern: str, labels: tuple[bytes, ...], scope: Scope, deny: bool
) -> None:
    rule = parse_pattern(text, "file:7")
    assert rule == Rule(pattern=pattern, labels=labels, scope=scope, deny=deny, source="file:7")
    assert str(rule) == f"{pattern} (file:7)"


def test_one_trailing_dot_is_ignored_but_not_two() -> None:
    assert parse_pattern("example.com.", "x").labels == (b"example", b"com")
    assert parse_pattern("**.example.com.", "x").labels == (b"example", b"com")
    with pytest.raises(ConfigError):
        parse_pattern("example.com..", "x")


def test_leading_dot_error_hints_at_double_star() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_pattern(".example.com", "x")
    assert "leading dot" in exc.value.detail
    assert "'**.example.com'" in exc.value.detail
    with pytest.raises(ConfigError) as exc:
        parse_pattern("!.example.com", "x")
    assert "'**.example.com'" in exc.value.detail


@pytest.mark.parametrize(
    "text",
    [
        "*",
        "**",
        "!*",
        "!**",
        "*.",
        "**.",
        "",
        "!",
        "www.*.example.com",
        "*.*.example.com",
        "**.*.example.com",
        "*example.com",
        "***.example.com",
        "ex*ample.com",
        "example.*",
    ],
)
def test_wildcards_only_as_whole_leftmost_label(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_pattern(text, "x")


def test_bare_wildcards_are_explained() -> None:
    # Each refusal for its own reason: every message quotes the pattern, so matching a
    # bare "*" (as this test once did) passed for any refusal at all.
    for text in ("*.", "**.", "*", "**"):
        with pytest.raises(ConfigError, match="matches every name; list domains instead"):
            parse_pattern(text, "x")
    with pytest.raises(ConfigError, match="only allowed as the whole leftmost label"):
        parse_pattern("a.*.b", "x")


NOT_A_NAME = "is not a valid domain name"
BAD_LABEL = "is not a valid host name label"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("a" * 64 + ".com", "label is > 63 octets"),
        (".".join(["a" * 63] * 4) + ".com", "name is > 255 octets"),
        ("exa mple.com", "'mple.com' is not an option here"),  # a space ends the pattern
        ("foo/bar.com", f"label 'foo/bar' {BAD_LABEL}"),
        ("foo@bar.com", f"label 'foo@bar' {BAD_LABEL}"),
        ("-foo.com", f"label '-foo' {BAD_LABEL}"),
        ("foo-.com", f"label 'foo-' {BAD_LABEL}"),
        ("foo..com", f"{NOT_A_NAME}: A DNS label is empty"),
        # an escaped dot: one label with a dot in it
        ("evil\\.example.com", f"label 'evil.example' {BAD_LABEL}"),
        ("e\\000x.com", f"label 'e\\x00x' {BAD_LABEL}"),  # a NUL byte
        ("example.com\\", f"{NOT_A_NAME}: An escaped code"),
        ("http://example.com", f"label 'http://example' {BAD_LABEL}"),
        ("example.com:443", f"label 'com:443' {BAD_LABEL}"),
    ],
)
def test_invalid_names_are_refused(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_pattern(text, "x")
    # The pattern as written, and the reason it is refused: not merely some refusal.
    assert repr(text.strip()) in str(exc.value)
    assert why in str(exc.value)


def test_longest_valid_label_and_name() -> None:
    assert parse_pattern("a" * 63 + ".com", "x").labels == (b"a" * 63, b"com")
    host = ".".join(["x" * 63, "y" * 63, "z" * 63, "w" * 61])  # 253 characters
    assert len(host) == 253
    assert len(parse_pattern(host, "x").labels) == 4


# --- parse_lines -----------------------------------------------------------------------------


def test_parse_lines_comments_blank_lines_and_sources() -> None:
    text = (
        "# a comment\n"
        "\n"
        "   \n"
        "example.com\n"
        "  *.example.org   # trailing comment\n"
        "\t!ads.example.org#no space\n"
        "#**.commented.out\n"
        "**.example.net\n"
    )
    rules = parse_lines(text, "/etc/egressd/allowlist.d/base.txt")
    assert [r.pattern for r in rules] == [
        "example.com",
        "*.example.org",
        "!ads.example.org",
        "**.example.net",
    ]
    assert [r.source for r in rules] == [
        "/etc/egressd/allowlist.d/base.txt:4",
        "/etc/egressd/allowlist.d/base.txt:5",
        "/etc/egressd/allowlist.d/base.txt:6",
        "/etc/egressd/allowlist.d/base.txt:8",
    ]


def test_parse_lines_empty_file() -> None:
    assert parse_lines("", "f") == []
    assert parse_lines("# only comments\n\n", "f") == []


def test_parse_lines_error_names_file_and_line() -> None:
    text = "example.com\n# fine\n\n*.ok.example\nbad..name\n"
    with pytest.raises(ConfigError) as exc:
        parse_lines(text, "lists/agent.txt")
    err = exc.value
    assert err.file == "lists/agent.txt"
    assert err.line == 5
    assert str(err).startswith("lists/agent.txt:5: ")
    assert "bad..name" in str(err)


def test_parse_lines_error_for_wildcard_in_the_middle() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_lines("a.example\nwww.*.example.com  # oops\n", "f.txt")
    assert (exc.value.file, exc.value.line) == ("f.txt", 2)


def test_parse_lines_crlf() -> None:
    rules = parse_lines("a.example\r\n\r\nb.example\r\n", "f")
    assert [(r.pattern, r.source) for r in rules] == [("a.example", "f:1"), ("b.example", "f:3")]


# --- matching --------------------------------------------------------------------------------


def test_exact_matches_only_the_name() -> None:
    m = matcher("example.com")
    assert allowed(m, "example.com")
    assert not allowed(m, "www.example.com")
    assert not allowed(m, "com")
    assert not allowed(m, "example.org")


def test_below_matches_subdomains_not_the_apex() -> None:
    m = matcher("*.example.com")
    assert not allowed(m, "example.com")
    assert allowed(m, "www.example.com")
    assert allowed(m, "a.b.c.example.com")
    assert not allowed(m, "com")


def test_subtree_matches_apex_and_below() -> None:
    m = matcher("**.example.com")
    assert allowed(m, "example.com")
    assert allowed(m, "www.example.com")
    assert allowed(m, "a.b.c.example.com")
    assert not allowed(m, "com")


@pytest.mark.parametrize("pattern", ["example.com", "*.example.com", "**.example.com"])
@pytest.mark.parametrize(
    "name",
    [
        "evilexample.com",
        "www.evilexample.com",
        "example.com.evil.net",
        "www.example.com.evil.net",
        "example.co",
        "example.comx",
        "xexample.com",
        "com",
        "example",
    ],
)
def test_lookalikes_never_match(pattern: str, name: str) -> None:
    assert not allowed(matcher(pattern), name)


def test_case_insensitive_and_trailing_dot() -> None:
    m = matcher("**.Example.COM")
    assert allowed(m, "EXAMPLE.com.")
    assert allowed(m, "wWw.ExAmPlE.cOm")
    m2 = matcher("www.example.com.")
    assert allowed(m2, "WWW.EXAMPLE.COM")
    assert allowed(m2, dns.name.from_text("www.example.com", origin=None))


def test_idna_pattern_matches_punycode_wire_name() -> None:
    m = matcher("bücher.example")
    assert allowed(m, "xn--bcher-kva.example")
    assert allowed(m, "XN--BCHER-KVA.EXAMPLE.")
    assert allowed(m, dns.name.from_unicode("bücher.example"))
    assert not allowed(m, "bcher.example")
    # the raw UTF-8 bytes on the wire are not the IDNA form
    assert not allowed(m, dns.name.Name(["bücher".encode(), b"example", b""]))
    sub = matcher("**.bücher.example")
    assert allowed(sub, "www.xn--bcher-kva.example")


def test_punycode_pattern_matches_unicode_name() -> None:
    m = matcher("xn--bcher-kva.example")
    assert allowed(m, dns.name.from_unicode("BÜCHER.example"))


def test_deny_beats_allow() -> None:
    m = matcher("**.example.com", "!ads.example.com", "!**.track.example.com")
    assert verdict(m, "www.example.com") is Verdict.ALLOW
    assert verdict(m, "ads.example.com") is Verdict.DENY
    assert verdict(m, "x.ads.example.com") is Verdict.ALLOW  # exact deny only
    assert verdict(m, "track.example.com") is Verdict.DENY
    assert verdict(m, "a.b.track.example.com") is Verdict.DENY
    assert verdict(m, "other.net") is Verdict.BLOCK


def test_deny_beats_allow_whatever_the_order_and_specificity() -> None:
    m = matcher("!**.example.com", "www.example.com", "*.example.com")
    assert verdict(m, "www.example.com") is Verdict.DENY
    assert verdict(m, "example.com") is Verdict.DENY
    d = decide(m, labels_of(dns.name.from_text("www.example.com")))
    assert d.rule is not None and d.rule.source == "test:1"


def test_deny_below_does_not_deny_apex() -> None:
    m = matcher("**.example.com", "!*.example.com")
    assert verdict(m, "example.com") is Verdict.ALLOW
    assert verdict(m, "www.example.com") is Verdict.DENY


# --- wire-label confusion ----------------------------------------------------------------------


def test_label_with_literal_dot_is_one_label() -> None:
    evil = dns.name.Name([b"evil.example", b"com", b""])
    assert labels_of(evil) == (b"evil.example", b"com")
    for pattern in ("*.example.com", "**.example.com", "example.com", "evil.example.com"):
        assert not allowed(matcher(pattern), evil), pattern
    # only a rule on the parent ("com") can match it
    assert allowed(matcher("*.com"), evil)


def test_label_with_literal_dot_from_wire() -> None:
    q = dns.message.make_query(dns.name.Name([b"www.example", b"com", b""]), "A")
    wire = q.to_wire()
    assert b"\x0bwww.example\x03com\x00" in wire
    parsed = dns.message.from_wire(wire)
    qname = parsed.question[0].name
    assert labels_of(qname) == (b"www.example", b"com")
    m = matcher("**.example.com", "www.example.com", "*.example.com")
    assert verdict(m, qname) is Verdict.BLOCK


def test_deny_cannot_be_dodged_by_a_dotted_label() -> None:
    # a.b.example.com must not turn into something else when sent as "a.b" "example" "com"
    m = matcher("**.example.com", "!a.b.example.com")
    dotted = dns.name.Name([b"a.b", b"example", b"com", b""])
    assert verdict(m, dotted) is Verdict.ALLOW  # it is a different (single-label) name
    assert verdict(m, "a.b.example.com") is Verdict.DENY


def test_nul_byte_inside_a_label() -> None:
    m = matcher("example.com", "*.example.com")
    for labels in (
        [b"example\x00", b"com", b""],
        [b"example\x00.evil", b"com", b""],
        [b"\x00example", b"com", b""],
    ):
        assert not allowed(m, dns.name.Name(labels)), labels
    m2 = matcher("example.com")
    assert not allowed(m2, dns.name.Name([b"example", b"com\x00", b""]))
    # NUL in a subdomain label under an allowed suffix is still below the suffix
    assert allowed(matcher("*.example.com"), dns.name.Name([b"a\x00b", b"example", b"com", b""]))


def test_root_and_empty_names() -> None:
    m = matcher("**.example.com")
    assert verdict(m, dns.name.root) is Verdict.BLOCK
    assert labels_of(dns.name.root) == ()


# --- which rule is reported ------------------------------------------------------------------


def test_decision_reports_rule_source() -> None:
    rules = parse_lines("# list\n**.example.com\n!ads.example.com\n", "/l/a.txt")
    m = Matcher(rules)
    allow = decide(m, labels_of(dns.name.from_text("www.example.com")))
    assert allow.verdict is Verdict.ALLOW and allow.source == "/l/a.txt:2"
    deny = decide(m, labels_of(dns.name.from_text("ads.example.com")))
    assert deny.verdict is Verdict.DENY and deny.source == "/l/a.txt:3"
    block = decide(m, labels_of(dns.name.from_text("example.org")))
    assert block.verdict is Verdict.BLOCK and block.source == "" and block.rule is None


def test_most_specific_rule_is_reported() -> None:
    m = Matcher(
        parse_lines("**.example.com\n*.b.example.com\n**.c.b.example.com\nd.c.b.example.com\n", "f")
    )

    def source(name: str) -> str:
        return decide(m, labels_of(dns.name.from_text(name))).source

    assert source("example.com") == "f:1"
    assert source("x.example.com") == "f:1"
    assert source("b.example.com") == "f:1"  # *.b does not cover b itself
    assert source("x.b.example.com") == "f:2"
    assert source("c.b.example.com") == "f:3"
    assert source("x.c.b.example.com") == "f:3"
    assert source("d.c.b.example.com") == "f:4"
    assert source("x.d.c.b.example.com") == "f:3"


def test_exact_rule_preferred_over_wildcard() -> None:
    m = Matcher(parse_lines("**.example.com\nwww.example.com\n", "f"))
    assert decide(m, labels_of(dns.name.from_text("www.example.com"))).source == "f:2"


def test_first_written_rule_wins_a_tie() -> None:
    m = Matcher(parse_lines("**.example.com\n**.EXAMPLE.com.\n*.example.com\n", "f"))
    assert decide(m, labels_of(dns.name.from_text("a.example.com"))).source == "f:1"
    assert decide(m, labels_of(dns.name.from_text("example.com"))).source == "f:1"


def test_most_specific_deny_is_reported() -> None:
    m = Matcher(parse_lines("**.example.com\n!**.example.com\n!**.ads.example.com\n", "f"))
    assert decide(m, labels_of(dns.name.from_text("x.ads.example.com"))).source == "f:3"
    assert decide(m, labels_of(dns.name.from_text("x.example.com"))).source == "f:2"


def test_matcher_keeps_rules_in_order() -> None:
    rules = parse_lines("b.example\na.example\n", "f")
    assert Matcher(rules).rules == tuple(rules)


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x85"])
def test_only_newline_ends_a_line(sep: str) -> None:
    # An editor shows one comment line; egressd must not see a rule in it.
    text = f"# reviewed{sep}**.evil.example\nok.example\n"
    rules = parse_lines(text, "f")
    assert [(r.pattern, r.source) for r in rules] == [("ok.example", "f:2")]
    # and line numbers stay those of the file
    with pytest.raises(ConfigError) as exc:
        parse_lines(f"# a{sep}b\n\nbad..name\n", "f")
    assert exc.value.line == 3


@pytest.mark.parametrize("pattern", ["straße.example", "*.ςigma.example", "!a\u200db.example"])
def test_idna_deviation_characters_are_refused(pattern: str) -> None:
    # IDNA 2003 and 2008 spell these names differently; a rule must name one form exactly.
    with pytest.raises(ConfigError, match="punycode"):
        parse_pattern(pattern, "test:1")


def test_punycode_form_of_a_deviation_name_is_accepted() -> None:
    rule = parse_pattern("xn--strae-oqa.example", "test:1")
    assert rule.labels == (b"xn--strae-oqa", b"example")


@pytest.mark.parametrize("pattern", ["*", "**", "!*"])
def test_bare_wildcards_are_refused_with_a_clear_message(pattern: str) -> None:
    with pytest.raises(ConfigError, match="matches every name"):
        parse_pattern(pattern, "test:1")
