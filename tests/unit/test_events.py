"""Events (egressd.events): stable MESSAGE_IDs and EGRESSD_* journal fields."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from egressd import events
from egressd.events import (
    Error,
    Event,
    GrantFailed,
    QueryBlocked,
    QueryRefused,
    Reloaded,
    RulesInstalled,
    Started,
)


def all_event_classes() -> list[type[Event]]:
    # dataclass(slots=True) replaces each class by a new one; the discarded original can
    # linger in __subclasses__(), so keep one class per qualified name (the live one).
    found: dict[str, type[Event]] = {}
    todo = list(Event.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        live = getattr(__import__(cls.__module__, fromlist=["_"]), cls.__name__, None)
        found[f"{cls.__module__}.{cls.__qualname__}"] = live if live is not None else cls
    return sorted(found.values(), key=lambda c: c.__name__)


def sample(cls: type[Event]) -> Event:
    """An instance with every field filled in."""
    hints = typing.get_type_hints(cls)
    values: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if hint is str:
            values[f.name] = f"{f.name}-value"
        elif hint is int:
            values[f.name] = 7
        elif typing.get_origin(hint) is tuple:
            values[f.name] = (1, 2) if typing.get_args(hint)[0] is int else ("a", "b")
        else:  # pragma: no cover - a new field type: extend this helper
            raise AssertionError(f"{cls.__name__}.{f.name}: {hint}")
    return cls(**values)  # type: ignore[arg-type]


CLASSES = all_event_classes()


def test_the_known_events_are_all_found() -> None:
    names = {c.__name__ for c in CLASSES}
    assert {
        "QueryBlocked",
        "QueryRefused",
        "GrantFailed",
        "UpstreamFailed",
        "RulesInstalled",
        "Started",
        "Reloaded",
        "ReloadFailed",
        "Stopping",
        "Repaired",
        "Error",
    } <= names
    # and every Event class in the module is a subclass we test
    in_module = {
        name
        for name, obj in vars(events).items()
        if isinstance(obj, type) and issubclass(obj, Event) and obj is not Event
    }
    assert in_module == names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_message_id_is_32_hex(cls: type[Event]) -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", cls.MESSAGE_ID), cls.MESSAGE_ID


def test_message_ids_are_unique() -> None:
    ids = [c.MESSAGE_ID for c in CLASSES]
    assert len(set(ids)) == len(ids)
    assert Event.MESSAGE_ID not in ids


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_priority_is_a_syslog_level(cls: type[Event]) -> None:
    assert 0 <= cls.PRIORITY <= 7


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_fields_and_message(cls: type[Event]) -> None:
    ev = sample(cls)
    f = ev.fields()
    assert set(f) == {f"EGRESSD_{fld.name.upper()}" for fld in dataclasses.fields(cls)}
    assert all(re.fullmatch(r"EGRESSD_[A-Z0-9_]+", k) for k in f)
    assert all(isinstance(v, str) and v for v in f.values())
    msg = ev.message()
    assert isinstance(msg, str) and msg


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_events_are_frozen(cls: type[Event]) -> None:
    ev = sample(cls)
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(ev, name, "x")


def test_fields_omit_empty_values_and_join_tuples() -> None:
    ev = QueryBlocked(
        profile="agent",
        uids=(1000, 1001),
        qname="x.example",
        qtype="A",
        verdict="block",
        rule="",
    )
    assert ev.fields() == {
        "EGRESSD_PROFILE": "agent",
        "EGRESSD_UIDS": "1000,1001",
        "EGRESSD_QNAME": "x.example",
        "EGRESSD_QTYPE": "A",
        "EGRESSD_VERDICT": "block",
    }
    assert "not on the allowlist" in ev.message()


def test_fields_of_a_full_blocked_event() -> None:
    ev = QueryBlocked(
        "agent",
        (1000,),
        "ads.example",
        "AAAA",
        "deny",
        "/l/a.txt:3",
        reason="CNAME target denied",
        client="udp:127.0.0.1:4000",
    )
    assert ev.fields() == {
        "EGRESSD_PROFILE": "agent",
        "EGRESSD_UIDS": "1000",
        "EGRESSD_QNAME": "ads.example",
        "EGRESSD_QTYPE": "AAAA",
        "EGRESSD_VERDICT": "deny",
        "EGRESSD_RULE": "/l/a.txt:3",
        "EGRESSD_REASON": "CNAME target denied",
        "EGRESSD_CLIENT": "udp:127.0.0.1:4000",
    }
    assert "by rule /l/a.txt:3" in ev.message()


def test_empty_tuple_is_omitted() -> None:
    ev = Error(where="config", error="boom")
    assert ev.fields() == {"EGRESSD_WHERE": "config", "EGRESSD_ERROR": "boom"}
    assert Error("a", "b", ("x", "y")).fields()["EGRESSD_EXTRA"] == "x,y"
    assert RulesInstalled((), ("ipv4",), "abc").fields() == {
        "EGRESSD_FAMILIES": "ipv4",
        "EGRESSD_POLICY_HASH": "abc",
    }


def test_messages_mention_the_essentials() -> None:
    assert "x.example" in GrantFailed("agent", "x.example", "full").message()
    assert "profile agent" in QueryRefused("agent", "class CH").message()
    assert "127.0.0.1:153" in Started("0.1", "/c", ("192.0.2.1:53",), ("127.0.0.1:153",)).message()
    assert "abc123" in Reloaded("/c", "abc123").message()


def test_base_event_has_no_message() -> None:
    with pytest.raises(NotImplementedError):
        Event().message()


def test_every_event_type_is_documented_with_its_message_id() -> None:
    import inspect
    from pathlib import Path

    from egressd import events

    doc = (Path(__file__).resolve().parents[2] / "docs" / "journal.md").read_text()
    for name, cls in inspect.getmembers(events, inspect.isclass):
        if issubclass(cls, events.Event) and cls is not events.Event:
            assert f"| {name} | `{cls.MESSAGE_ID}` |" in doc, name
