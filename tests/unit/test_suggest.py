"""egressd.suggest (pure) and the `egressd suggest` command's file and log handling."""

from __future__ import annotations

import argparse
import json
import os
import stat
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from egressd import suggest as core
from egressd.allowlist import Matcher, parse_lines
from egressd.commands import suggest as cmd
from egressd.events import QueryAudited, QueryBlocked

T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


def rec(
    qname: str,
    at: float = T0,
    *,
    verdict: str = "block",
    rule: str = "",
    profile: str = "agent",
    event: str = "QueryBlocked",
    qtype: str = "A",
) -> core.Record:
    return core.Record(at, event, profile, qname, qtype, verdict, rule)


def matchers(text: str, profile: str = "agent") -> dict[str, Matcher]:
    return {profile: Matcher(parse_lines(text, "/etc/egressd/allowlist.d/a.txt"))}


def names(s: core.Suggestion) -> dict[str, list[str]]:
    return {g.domain: [t.name for t in g.names] for g in s.groups}


def why(s: core.Suggestion) -> dict[str, str]:
    return {i.name: i.why for i in s.left}


# --------------------------------------------------------------------------- grouping


def test_groups_by_registrable_domain_with_multi_label_public_suffixes() -> None:
    s = core.suggest(
        [
            rec("files.pythonhosted.org"),
            rec("pypi.pythonhosted.org"),
            rec("a.b.example.co.uk"),
            rec("c.example.co.uk"),
            rec("other.co.uk"),
            rec("alice.github.io"),
            rec("x.alice.github.io"),
            rec("bob.github.io"),
        ]
    )
    assert names(s) == {
        "alice.github.io": ["alice.github.io", "x.alice.github.io"],
        "bob.github.io": ["bob.github.io"],
        "example.co.uk": ["a.b.example.co.uk", "c.example.co.uk"],
        "other.co.uk": ["other.co.uk"],
        "pythonhosted.org": ["files.pythonhosted.org", "pypi.pythonhosted.org"],
    }
    alternatives = {g.domain: g.alternative for g in s.groups}
    assert alternatives == {
        "alice.github.io": "**.alice.github.io",
        "bob.github.io": None,  # one name: the exact line only
        "example.co.uk": "**.example.co.uk",
        "other.co.uk": None,
        "pythonhosted.org": "**.pythonhosted.org",
    }


def test_never_a_public_suffix_nor_a_reverse_lookup() -> None:
    s = core.suggest(
        [rec("github.io"), rec("co.uk"), rec("com"), rec("wpad"), rec("4.3.2.1.in-addr.arpa")]
    )
    assert s.groups == ()
    assert why(s) == {
        "github.io": "a public suffix (or a single label); not suggested",
        "co.uk": "a public suffix (or a single label); not suggested",
        "com": "a public suffix (or a single label); not suggested",
        "wpad": "a public suffix (or a single label); not suggested",
        "4.3.2.1.in-addr.arpa": "a reverse lookup; not suggested",
    }
    text = core.render(s) + core.allowlist_text(s, now=T0)
    for suffix in ("**.com", "**.co.uk", "**.github.io", "*.com"):
        assert suffix not in text


def test_counts_first_seen_case_and_trailing_dot_are_one_name() -> None:
    s = core.suggest(
        [
            rec("CDN.Example.com", T0 + 30),
            rec("cdn.example.com.", T0 + 10, qtype="AAAA"),
            rec("cdn.example.com", T0 + 20, event="QueryAudited"),
        ]
    )
    (group,) = s.groups
    (t,) = group.names
    assert (t.name, t.count, t.first, t.last) == ("cdn.example.com", 3, T0 + 10, T0 + 30)
    assert t.qtypes == ("A", "AAAA") and t.profiles == ("agent",) and t.audited == 1
    assert s.records == 3


def test_idna_names_are_written_as_punycode_with_the_unicode_in_the_comment() -> None:
    s = core.suggest([rec("xn--bcher-kva.example"), rec("www.xn--mller-kva.de")])
    assert names(s) == {
        "xn--bcher-kva.example": ["xn--bcher-kva.example"],
        "xn--mller-kva.de": ["www.xn--mller-kva.de"],
    }
    text = core.render(s, tz=UTC)
    assert "+xn--bcher-kva.example  # bücher.example, 1 query (A)" in text
    assert "www.müller.de" in text


def test_a_name_the_allowlist_could_not_name_is_listed_not_suggested() -> None:
    s = core.suggest([rec("evil\\.dot.example.com"), rec("sp\\032ace.example.com")])
    assert s.groups == ()
    assert set(why(s)) == {"evil\\.dot.example.com", "sp\\032ace.example.com"}
    assert all("not a host name" in w for w in why(s).values())


# --------------------------------------------------------------------------- filters


def test_denied_names_are_not_suggested_and_say_which_line() -> None:
    s = core.suggest(
        [
            rec("ads.example.com", verdict="deny", rule="/etc/egressd/deny.txt:3"),
            rec("ads.example.com", T0 - 5),  # blocked before the deny line existed
            rec("good.example.com"),
        ]
    )
    assert names(s) == {"example.com": ["good.example.com"]}
    (left,) = s.left
    assert left.name == "ads.example.com" and left.count == 2 and left.first == T0 - 5
    assert left.why == "denied by /etc/egressd/deny.txt:3; not suggested"
    assert "#   ads.example.com: denied by /etc/egressd/deny.txt:3; not suggested" in (
        core.render(s)
    )


def test_a_name_the_current_config_denies_is_not_suggested() -> None:
    s = core.suggest([rec("ads.example.com")], current=matchers("!ads.example.com\n"))
    assert s.groups == ()
    assert why(s) == {
        "ads.example.com": "denied by /etc/egressd/allowlist.d/a.txt:1; not suggested"
    }


def test_names_the_current_config_allows_are_left_out() -> None:
    current = matchers("# pypi\n**.pythonhosted.org\n")
    s = core.suggest([rec("files.pythonhosted.org"), rec("cdn.example.com")], current=current)
    assert names(s) == {"example.com": ["cdn.example.com"]}
    assert why(s) == {
        "files.pythonhosted.org": "already allowed for profile agent by "
        "/etc/egressd/allowlist.d/a.txt:2"
    }
    # Per profile: another profile that blocked it still gets the line.
    s = core.suggest([rec("files.pythonhosted.org", profile="build")], current=current)
    assert s.lines == ("files.pythonhosted.org",)


def test_a_deny_on_the_cname_chain_of_an_allowed_name_stands() -> None:
    # The qname is allowed; a deny line hit a CNAME target: the record says deny.
    s = core.suggest(
        [rec("www.example.com", verdict="deny", rule="/etc/d.txt:9")],
        current=matchers("www.example.com\n"),
    )
    assert s.groups == () and why(s) == {"www.example.com": "denied by /etc/d.txt:9; not suggested"}


def test_profile_and_since_filters() -> None:
    s = core.suggest(
        [rec("a.example.com", T0 - 100), rec("b.example.com"), rec("c.example.com", profile="ci")],
        profile="agent",
        since=T0 - 50,
    )
    assert s.lines == ("b.example.com",) and s.records == 1


# --------------------------------------------------------------------------- output


def test_suggested_block_round_trips_through_parse_lines() -> None:
    s = core.suggest(
        [
            rec("files.pythonhosted.org"),
            rec("pypi.pythonhosted.org"),
            rec("xn--bcher-kva.example"),
            rec("a.b.example.co.uk"),
            rec("ads.example.com", verdict="deny", rule="/x:1"),
        ]
    )
    text = core.allowlist_text(s, now=T0, tz=UTC)
    rules = parse_lines(text, "suggested.txt")
    assert [r.pattern for r in rules] == list(s.lines)
    assert all(not r.deny for r in rules)
    # The commented alternative parses too, once uncommented.
    alt = [line for line in text.splitlines() if "instead of these" in line]
    (line,) = alt
    assert parse_lines(line.rsplit(": ", 1)[1], "x")[0].pattern == "**.pythonhosted.org"
    assert text.startswith("# added by `egressd suggest` on 2027-01-15 08:00:00")


def test_render_is_a_diff_with_a_header_per_domain() -> None:
    s = core.suggest(
        [rec("files.cdn.example.net", T0 + i) for i in range(12)] + [rec("api.example.net", T0)],
        since=T0 - 3600,
    )
    text = core.render(s, tz=UTC)
    assert text == (
        "# 13 blocked or audited query records since 2027-01-15 07:00:00\n"
        "# 2 names to allow in 1 registrable domain (review; `--write FILE` appends them "
        "to an allowlist file)\n"
        "\n"
        "# example.net: 2 names, 13 queries\n"
        "+api.example.net        # 1 query (A), first 2027-01-15 08:00:00, profile agent\n"
        "+files.cdn.example.net  # 12 queries (A), first 2027-01-15 08:00:00, profile agent\n"
        "# or, instead of these 2 lines, every name in example.net: **.example.net\n"
    )


def test_to_json_is_serialisable_and_complete() -> None:
    s = core.suggest([rec("a.example.com"), rec("x.example", verdict="deny", rule="/r:1")])
    data = json.loads(json.dumps(core.to_json(s)))
    assert data["lines"] == ["a.example.com"]
    assert data["groups"][0]["names"][0]["count"] == 1
    assert data["not_suggested"][0]["why"].startswith("denied by /r:1")


# --------------------------------------------------------------------------- records


def test_record_of_journal_entries_and_json_log_lines() -> None:
    journal = {
        "MESSAGE_ID": QueryBlocked.MESSAGE_ID,
        "__REALTIME_TIMESTAMP": "1800000000123456",
        "EGRESSD_PROFILE": "agent",
        "EGRESSD_QNAME": "x.example.com",
        "EGRESSD_QTYPE": "A",
        "EGRESSD_VERDICT": "block",
    }
    r = core.record_of(journal)
    assert r == core.Record(1800000000.123456, "QueryBlocked", "agent", "x.example.com", "A",
                            "block", "")  # fmt: skip
    log = {"ts": 1800000001.5, "message_id": QueryAudited.MESSAGE_ID, **journal}
    del log["MESSAGE_ID"], log["__REALTIME_TIMESTAMP"]
    assert core.record_of(log) == core.Record(
        1800000001.5, "QueryAudited", "agent", "x.example.com", "A", "block", ""
    )
    # Not ours, or fields journalctl could not give as text: skipped.
    assert core.record_of({**journal, "MESSAGE_ID": "0" * 32}) is None
    assert core.record_of({**journal, "EGRESSD_QNAME": [120, 255]}) is None
    assert core.record_of({k: v for k, v in journal.items() if k != "EGRESSD_QNAME"}) is None


# --------------------------------------------------------------------------- the command


def test_parse_since() -> None:
    assert cmd.parse_since("1h", T0) == T0 - 3600
    assert cmd.parse_since("30m", T0) == T0 - 1800
    assert cmd.parse_since("2d", T0) == T0 - 172800
    assert cmd.parse_since("all", T0) is None
    assert cmd.parse_since("@1700000000", T0) == 1700000000
    assert cmd.parse_since("2027-01-15T08:00:00+00:00", T0) == T0
    with pytest.raises(ValueError, match="--since"):
        cmd.parse_since("yesterday-ish", T0)


def test_append_creates_0644_and_never_truncates(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        path = tmp_path / "suggested.txt"
        cmd.append(str(path), "a.example.com\n")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.write_text("# mine\nb.example.com", encoding="utf-8")  # no final newline
        path.chmod(0o600)
        cmd.append(str(path), "# added\nc.example.com\n")
        assert path.read_text() == "# mine\nb.example.com\n\n# added\nc.example.com\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # an existing file keeps its mode
        cmd.append(str(path), "d.example.com\n")
        assert path.read_text().endswith("c.example.com\n\nd.example.com\n")
    finally:
        os.umask(old)


def journal_line(qname: str, at: float, **fields: str) -> str:
    entry: dict[str, Any] = {
        "MESSAGE_ID": QueryBlocked.MESSAGE_ID,
        "__REALTIME_TIMESTAMP": str(int(at * 1e6)),
        "EGRESSD_PROFILE": "agent",
        "EGRESSD_QNAME": qname,
        "EGRESSD_QTYPE": "A",
        "EGRESSD_VERDICT": "block",
        **fields,
    }
    return json.dumps(entry)


def args_for(tmp_path: Path, *argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    cmd.add_parser(ap.add_subparsers(dest="command"))
    return ap.parse_args(["suggest", *argv])


def write_config(tmp_path: Path, allow: str) -> tuple[Path, Path]:
    allowlist = tmp_path / "allow.txt"
    allowlist.write_text(allow, encoding="utf-8")
    # A config lists only files that exist: the drop-in is created (empty) with the config.
    (tmp_path / "suggested.txt").write_text("", encoding="utf-8")
    config = tmp_path / "egressd.toml"
    config.write_text(
        f'[daemon]\nupstreams = ["192.0.2.1"]\n\n[profiles.agent]\nusers = [64123]\n'
        f'allowlists = ["{allowlist.name}", "suggested.txt"]\n',
        encoding="utf-8",
    )
    return config, allowlist


def test_run_reads_a_log_filters_what_the_config_allows_and_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    now = time.time()
    log = tmp_path / "egressd.jsonl"
    log.write_text(
        "\n".join(
            [
                "Traceback (not json)",
                journal_line("pypi.example.org", now - 60),
                journal_line("files.cdn.example.net", now - 50),
                journal_line("files.cdn.example.net", now - 40),
                journal_line("old.example.org", now - 7200),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    config, _ = write_config(tmp_path, "pypi.example.org\n")
    target = tmp_path / "suggested.txt"
    args = args_for(tmp_path, "--log", str(log), "--config", str(config), "--write", str(target))
    assert cmd.run(args) == 0
    out = capsys.readouterr()
    assert "+files.cdn.example.net  # 2 queries (A)" in out.out
    assert "pypi.example.org: already allowed for profile agent by" in out.out
    assert f"appended 1 line(s) to {target}; run `egressd reload`" in out.out
    assert "old.example.org" not in out.out  # before --since 1h
    assert out.err == ""  # the file is one the config lists: no warning
    assert [r.pattern for r in parse_lines(target.read_text(), "t")] == ["files.cdn.example.net"]

    # Run again after the reload would have applied it: nothing left, exit 1, file untouched.
    before = target.read_text()
    assert cmd.run(args) == 1
    out = capsys.readouterr()
    assert "# nothing to suggest" in out.out and "nothing to write" in out.out
    assert target.read_text() == before


def test_run_warns_when_the_written_file_is_not_read_by_the_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    log = tmp_path / "egressd.jsonl"
    log.write_text(journal_line("a.example.com", time.time()) + "\n", encoding="utf-8")
    config, _ = write_config(tmp_path, "")
    other = tmp_path / "elsewhere.txt"
    args = args_for(
        tmp_path, "--log", str(log), "--config", str(config), "--write", str(other), "--json"
    )
    assert cmd.run(args) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["written"] == str(other)
    assert "no profile in" in out.err and "allowlists" in out.err


def test_run_without_a_loadable_config_still_suggests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    log = tmp_path / "egressd.jsonl"
    log.write_text(journal_line("a.example.com", time.time()) + "\n", encoding="utf-8")
    broken = tmp_path / "broken.toml"
    broken.write_text("[daemon\n", encoding="utf-8")
    assert cmd.run(args_for(tmp_path, "--log", str(log), "--config", str(broken))) == 0
    out = capsys.readouterr()
    assert "+a.example.com" in out.out and "not left out" in out.err
    assert cmd.run(args_for(tmp_path, "--log", str(log), "--since", "soon")) == 2
