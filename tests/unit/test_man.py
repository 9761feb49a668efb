"""The man pages (man/egressd.8, man/egressd.toml.5): they render without a warning, and
they cover every subcommand and option of the CLI and every key of the default config."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "man" / "egressd.8", ROOT / "man" / "egressd.toml.5"]
DEFAULT_CONFIG = ROOT / "etc" / "egressd" / "egressd.toml"


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is needed (Debian package {package}; tests/run installs it)"
    return path


def render(page: Path) -> str:
    """The page as plain text (no bold/underline escapes), 80 columns."""
    out = subprocess.run(
        [tool("groff", "groff-base"), "-man", "-Tutf8", "-P-cbou", "-rLL=80n", str(page)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_renders_without_warnings(page: Path) -> None:
    # -ww: every groff warning (unknown macros, bad escapes, lines that overflow...).
    groff = subprocess.run(
        [tool("groff", "groff-base"), "-man", "-Tutf8", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr
    # And as an operator reads it: man-db's own checks (tbl, preconv, the macro set).
    man = subprocess.run(
        [tool("man", "man-db"), "--warnings", "-l", str(page)],
        capture_output=True,
        text=True,
        check=False,
        env={"MANWIDTH": "80", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
    )
    assert man.returncode == 0 and man.stderr == "", man.stderr
    assert "NAME" in man.stdout and "SEE ALSO" in man.stdout


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from egressd import cli

    parser = cli._parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_egressd_8_covers_every_subcommand_and_option() -> None:
    text = render(PAGES[0])
    commands = subcommands()
    assert set(commands) >= {"run", "check-config", "uninstall", "status", "check", "grants"}
    for name, parser in commands.items():
        # A section of its own, and a synopsis line.
        assert re.search(rf"^   egressd {re.escape(name)}\b", text, re.M), name
        assert re.search(rf"^       egressd {re.escape(name)}\b", text, re.M), name
        for action in parser._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert opt in text, f"egressd {name} {opt}"
    for heading in ("EXIT STATUS", "SIGNALS", "FILES", "JOURNAL RECORDS", "SEE ALSO"):
        assert re.search(rf"^{heading}$", text, re.M), heading
    assert "egressd.toml(5)" in text and "journalctl -x" in text


def test_egressd_8_names_every_journal_record_type() -> None:
    from egressd import events

    text = render(PAGES[0])
    names = [
        n
        for n, obj in vars(events).items()
        if isinstance(obj, type) and issubclass(obj, events.Event) and obj is not events.Event
    ]
    journal = text.split("\nJOURNAL RECORDS\n", 1)[1].split("\nSYSTEMD\n", 1)[0]
    for name in names:
        assert name in journal, name


def sections(text: str) -> dict[str, str]:
    """Top-level sections of a rendered page by heading (headings start in column 0)."""
    parts = re.split(r"^(\S.*)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_egressd_toml_5_documents_every_key_of_the_default_config() -> None:
    text = render(PAGES[1])
    by_heading = sections(text)
    config = tomllib.loads(DEFAULT_CONFIG.read_text())
    tables: dict[str, set[str]] = {
        "[daemon]": set(config.get("daemon", {})),
        "[grants]": set(config.get("grants", {})),
        "[profiles.NAME]": {k for p in config.get("profiles", {}).values() for k in p},
    }
    assert tables["[daemon]"] and tables["[grants]"] and tables["[profiles.NAME]"]
    for heading, keys in tables.items():
        section = by_heading[heading]
        for key in keys:
            # Each key is an item of its own table's section: "key = default" (or "key").
            assert re.search(rf"^       {re.escape(key)}( = .*)?$", section, re.M), (heading, key)


def test_egressd_toml_5_shows_the_shipped_defaults() -> None:
    """A key documented as 'key = value' shows the default config's own value."""
    text = render(PAGES[1])
    config = tomllib.loads(DEFAULT_CONFIG.read_text())
    shown = dict(re.findall(r"^       ([a-z_]+) = (.+)$", text, re.M))
    flat = {**config.get("daemon", {}), **config.get("grants", {})}
    for body in config.get("profiles", {}).values():
        flat.update(body)
    for key, value in flat.items():
        if key not in shown:
            continue
        doc = tomllib.loads(f"v = {shown[key]}")["v"]
        assert doc == value, (key, shown[key], value)
