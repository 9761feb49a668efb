"""Where the configuration comes from: files, drop-in directories, the user database,
subordinate uid files and /etc/resolv.conf.

The adapter in front of the pure ``egressd.config``: it reads the main file and its
conf.d drop-ins (``conf.d/*.toml``, sorted, merged over it), asks ``config.wanted`` what
else the merged settings name, reads that (allowlist files, allowlist.d/*.list and
allowlist.d/PROFILE/*.list, presets, users, /etc/subuid, getsubids, /etc/resolv.conf)
into ``config.Facts``, and hands both to ``config.build``. How it reads is injected
(``Sources``) so tests need no root and ``egressd doctor`` can look at another root.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import pwd
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import (
    COMMAND_LINE,
    CommandLine,
    Config,
    Document,
    Facts,
    Text,
    build,
    command_line,
    merge,
    resolve_user,
    wanted,
)
from .errors import ConfigError

CONF_D = "conf.d"  # beside the main file: *.toml merged over it
ALLOWLIST_D = "allowlist.d"  # beside the main file: *.list for every profile, PROFILE/*.list
PRESET_SUFFIX = ".list"


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _lookup_user(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def _lookup_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _no_nss_subuids(user: str) -> Sequence[tuple[int, int]]:
    return ()  # this module runs no program; cli injects subids.getsubids


def _same(path: str) -> str:
    return path


@dataclass(frozen=True)
class Sources:
    """Where the configuration's outside facts come from (the real system by default)."""

    read_text: Callable[[str], str] = _read_text
    lookup_user: Callable[[str], int] = _lookup_user
    resolv_conf: str = "/etc/resolv.conf"
    # uid -> passwd name (None if there is none): subordinate ranges are listed by name.
    lookup_name: Callable[[int], str | None] = _lookup_name
    # shadow's subordinate uid file (subuid(5)), read at every load; missing means empty.
    subuid_file: str = "/etc/subuid"
    # A user's subordinate uid ranges from NSS (sssd, LDAP) as (start, count) pairs;
    # raises ConfigError when they cannot be read.
    nss_subuids: Callable[[str], Sequence[tuple[int, int]]] = _no_nss_subuids
    # The names in a directory (OSError as os.listdir raises it).
    list_dir: Callable[[str], Sequence[str]] = os.listdir
    # Where an absolute path of the configuration (the presets dir) is on this host:
    # `egressd doctor --root DIR` looks at another root.
    host_path: Callable[[str], str] = _same


def load(path: str, sources: Sources | None = None) -> Config:
    """The configuration file, its conf.d drop-ins and everything they name."""
    sources = sources or Sources()
    texts = [_read_main(path, sources)]
    for dropin in _listing(posixpath.join(_dir(path), CONF_D), ".toml", sources):
        try:
            texts.append(Text(dropin, sources.read_text(dropin)))
        except OSError as err:
            raise ConfigError(f"cannot read: {err.strerror}", file=dropin) from None
    doc = merge(texts, base_dir=_dir(path), drop_ins=True)
    return build(doc, gather(doc, sources))


def parse(text: str, path: str, sources: Sources | None = None) -> Config:
    """One configuration file's text alone: no conf.d or allowlist.d beside it."""
    sources = sources or Sources()
    doc = merge([Text(path, text)], base_dir=_dir(path), drop_ins=False)
    return build(doc, gather(doc, sources))


def from_command_line(cl: CommandLine, sources: Sources | None = None) -> Config:
    """The one-line form's Config: one profile, "default", through the same ``build``."""
    sources = sources or Sources()
    doc = command_line(cl)
    config = build(doc, gather(doc, sources))
    if not config.profiles[0].rules:
        raise ConfigError(
            "no allowlist: the files given hold no pattern", file=COMMAND_LINE, key="--allowlist"
        )
    return config


def gather(doc: Document, sources: Sources) -> Facts:
    """Read what the merged settings name. A file that cannot be read is recorded, not
    raised: ``build`` reports it at the key that named it."""
    want = wanted(doc)
    files: dict[str, str] = {}
    unreadable: dict[str, str] = {}

    def read(path: str, missing_ok: bool = False) -> None:
        try:
            files[path] = sources.read_text(path)
        except FileNotFoundError as err:
            if not missing_ok:
                unreadable[path] = err.strerror or str(err)
        except OSError as err:
            unreadable[path] = err.strerror or str(err)

    for path in want.allowlists:
        read(path)
    read(sources.subuid_file, missing_ok=True)
    if want.resolv_conf:
        read(sources.resolv_conf)

    presets: dict[str, str] | None = None
    if want.presets_dir is not None:
        where = sources.host_path(want.presets_dir)
        try:
            presets = {
                name[: -len(PRESET_SUFFIX)]: posixpath.join(where, name)
                for name in sources.list_dir(where)
                if name.endswith(PRESET_SUFFIX) and not name.startswith(".")
            }
        except OSError as err:
            unreadable[want.presets_dir] = err.strerror or str(err)
        for name in want.presets:
            if presets is not None and name in presets:
                read(presets[name])

    allowlist_d: tuple[str, ...] = ()
    per_profile: dict[str, tuple[str, ...]] = {}
    if doc.drop_ins:
        top = posixpath.join(doc.base_dir, ALLOWLIST_D)
        allowlist_d = _listing(top, PRESET_SUFFIX, sources)
        for name in want.profiles:
            per_profile[name] = _listing(posixpath.join(top, name), PRESET_SUFFIX, sources)
        for path in (*allowlist_d, *(f for fs in per_profile.values() for f in fs)):
            read(path)

    uids: dict[str, int] = {}
    for item in want.users:
        if isinstance(item, str):
            with contextlib.suppress(KeyError):  # an unknown user: build says so
                uids[item] = sources.lookup_user(item)
    names: dict[int, str] = {}
    for item in want.users:
        uid = resolve_user(item, uids)
        passwd = sources.lookup_name(uid) if uid is not None else None
        if uid is not None and passwd is not None:
            names[uid] = passwd
    nss: dict[str, Sequence[tuple[int, int]]] = {}
    nss_errors: dict[str, str] = {}
    # In order, so a test's fake (or a slow getsubids) sees the same calls every time.
    asked = [u for u in want.users if isinstance(u, str)] + list(names.values())
    for name in dict.fromkeys(asked):
        try:
            nss[name] = tuple(sources.nss_subuids(name))
        except ConfigError as err:
            nss_errors[name] = err.detail
    return Facts(
        files=files,
        unreadable=unreadable,
        uids=uids,
        names=names,
        nss_subuids=nss,
        nss_errors=nss_errors,
        subuid_file=sources.subuid_file,
        resolv_conf=sources.resolv_conf,
        presets=presets,
        allowlist_d=allowlist_d,
        profile_allowlist_d=per_profile,
    )


def _dir(path: str) -> str:
    return posixpath.dirname(posixpath.abspath(path))


def _read_main(path: str, sources: Sources) -> Text:
    try:
        return Text(path, sources.read_text(path))
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", file=path) from None


def _listing(directory: str, suffix: str, sources: Sources) -> tuple[str, ...]:
    """The files ending in `suffix` in a drop-in directory, sorted by name (a missing
    directory has none). Anything else is left alone: dpkg's .dpkg-old and .dpkg-dist
    copies, editors' backups, and hidden files (an editor's lock or swap file)."""
    try:
        entries = sources.list_dir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return ()
    except OSError as err:
        raise ConfigError(f"cannot list: {err.strerror}", file=directory) from None
    return tuple(
        posixpath.join(directory, name)
        for name in sorted(entries)
        if name.endswith(suffix) and not name.startswith(".")
    )
