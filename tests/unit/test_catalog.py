"""The journal catalog (catalog/egressd.catalog): one entry per event type, keyed by its
MESSAGE_ID, and a file journalctl compiles (``journalctl -x`` explains each record)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from egressd import events

CATALOG = Path(__file__).resolve().parents[2] / "catalog" / "egressd.catalog"
HEADERS = ("Subject", "Defined-By", "Support", "Documentation")
# Substitutions journalctl makes: @NAME@ with upper-case letters and '_' only (systemd's
# replace_var), so a field with a digit in its name could never be substituted.
VARIABLE = re.compile(r"@([A-Z_]+)@")


def event_classes() -> dict[str, type[events.Event]]:
    return {
        name: obj
        for name, obj in vars(events).items()
        if isinstance(obj, type) and issubclass(obj, events.Event) and obj is not events.Event
    }


@dataclasses.dataclass
class Entry:
    message_id: str
    headers: dict[str, str]
    body: str


def parse(text: str) -> list[Entry]:
    """The catalog format: '-- ID' starts an entry, header lines up to the first empty line,
    then the body; '#' lines outside entries are comments."""
    entries: list[Entry] = []
    current: list[str] | None = None
    ident = ""

    def close() -> None:
        if current is None:
            return
        head, _, body = "\n".join(current).partition("\n\n")
        headers = dict(line.split(": ", 1) for line in head.splitlines())
        entries.append(Entry(ident, headers, body.strip()))

    for line in text.splitlines():
        if line.startswith("-- "):
            close()
            ident = line[3:].strip()
            current = []
        elif current is not None:
            current.append(line)
        else:
            assert line == "" or line.startswith("#"), f"text outside an entry: {line!r}"
    close()
    return entries


ENTRIES = parse(CATALOG.read_text())
BY_ID = {e.message_id: e for e in ENTRIES}


def test_every_event_has_exactly_one_entry_and_nothing_else() -> None:
    ids = [e.message_id for e in ENTRIES]
    assert len(ids) == len(set(ids)), "an entry appears twice"
    assert set(ids) == {cls.MESSAGE_ID for cls in event_classes().values()}


@pytest.mark.parametrize("name", sorted(event_classes()))
def test_entry_is_complete(name: str) -> None:
    cls = event_classes()[name]
    entry = BY_ID[cls.MESSAGE_ID]
    assert re.fullmatch(r"[0-9a-f]{32}", entry.message_id)
    assert set(entry.headers) == set(HEADERS), entry.headers
    assert entry.headers["Defined-By"] == "egressd"
    assert all(u.startswith("man:") for u in entry.headers["Documentation"].split())
    assert len(entry.body) > 100, "say what happened and what to do"


@pytest.mark.parametrize("name", sorted(event_classes()))
def test_substitutions_are_fields_of_the_event(name: str) -> None:
    cls = event_classes()[name]
    entry = BY_ID[cls.MESSAGE_ID]
    own = {f"EGRESSD_{f.name.upper()}" for f in dataclasses.fields(cls)}
    used = set(VARIABLE.findall(entry.headers["Subject"] + "\n" + entry.body))
    assert used <= own, used - own
    # A field name journalctl could not substitute (a digit): it would show as @NAME@.
    assert all(re.fullmatch(r"EGRESSD_[A-Z_]+", f) for f in own), own


def test_optional_fields_stay_out_of_subjects() -> None:
    """A field the record leaves out (empty) would show as its bare name in the subject."""
    for cls in event_classes().values():
        optional = {
            f"EGRESSD_{f.name.upper()}"
            for f in dataclasses.fields(cls)
            if f.default in ("", None, ()) or f.default_factory is not dataclasses.MISSING
        }
        subject = BY_ID[cls.MESSAGE_ID].headers["Subject"]
        assert not optional & set(VARIABLE.findall(subject)), cls.__name__


def test_journalctl_compiles_and_lists_every_entry(tmp_path: Path) -> None:
    journalctl = shutil.which("journalctl")
    assert journalctl, "journalctl (package systemd) is needed"
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir / "egressd.catalog")
    update = subprocess.run(
        [journalctl, f"--root={tmp_path}", "--update-catalog"],
        capture_output=True,
        text=True,
        check=False,
    )
    # journalctl logs a parse error and carries on: a clean run says nothing.
    assert update.returncode == 0 and update.stderr == "", update.stderr
    assert (tmp_path / "var/lib/systemd/catalog/database").stat().st_size > 0
    listed = subprocess.run(
        [journalctl, f"--root={tmp_path}", "--list-catalog"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    got = {line.split()[0]: line.split(" ", 1)[1] for line in listed.splitlines() if line}
    assert set(got) == set(BY_ID)
    for ident, entry in BY_ID.items():
        assert got[ident] == f"egressd: {entry.headers['Subject']}"
    one = events.QueryBlocked.MESSAGE_ID
    dumped = subprocess.run(
        [journalctl, f"--root={tmp_path}", "--dump-catalog", one],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "egressd check @EGRESSD_QNAME@" in dumped
