"""Loading the configuration from its files (egressd.sources): conf.d drop-ins merged over
the main file, allowlist.d, presets, the one-line form through the same ``build``, and
``egressd run`` / ``check-config`` on a config that restricts nobody. Real files in tmp
dirs; users, /etc/subuid and /etc/resolv.conf are faked (no root)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from egressd import cli
from egressd.config import CommandLine, restricts_nobody
from egressd.errors import ConfigError
from egressd.sources import Sources, from_command_line, load

USERS = {"agent": 1000, "agent2": 1001, "builder": 1002}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir()
    (tmp_path / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "python.list").write_text("# pip\npypi.org\nfiles.pythonhosted.org\n")
    (presets / "node.list").write_text("registry.npmjs.org\n")
    (presets / "README").write_text("not a preset\n")
    return d


def src(etc: Path, **kw: object) -> Sources:
    base = {
        "lookup_user": USERS.__getitem__,
        "lookup_name": lambda uid: None,
        "resolv_conf": str(etc.parent / "resolv.conf"),
        "subuid_file": str(etc.parent / "no-subuid"),
    }
    return Sources(**{**base, **kw})  # type: ignore[arg-type]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def conf(etc: Path, body: str, presets_dir: bool = True) -> str:
    head = f'[daemon]\npresets_dir = "{etc.parent / "presets"}"\n' if presets_dir else ""
    return str(write(etc / "egressd.toml", head + body))


BASE = """\
[grants]
floor = 100
ceiling = 5000

[profiles.agent]
users = []
allow = ["base.example"]
port = 154
"""


# --- conf.d -----------------------------------------------------------------------------------


def test_dropins_merge_key_by_key_later_wins(etc: Path) -> None:
    path = conf(etc, BASE)
    write(etc / "conf.d" / "50-install.toml", '[profiles.agent]\nusers = ["agent"]\n')
    write(etc / "conf.d" / "60-more.toml", "[grants]\nfloor = 200\n")
    write(
        etc / "conf.d" / "90-last.toml",
        '[profiles.agent]\nport = 160\n[profiles.ci]\nusers = ["builder"]\nallow = ["b.example"]\n',
    )
    # ignored: not *.toml (dpkg's copies), hidden (an editor's)
    write(etc / "conf.d" / "10-old.toml.dpkg-old", '[profiles.agent]\nusers = ["agent2"]\n')
    write(etc / "conf.d" / ".#90-last.toml", "not toml at all")
    cfg = load(path, src(etc))
    agent, ci = cfg.profiles
    assert agent.uids == (1000,)  # from 50-install
    assert agent.port == 160  # from 90-last, over the main file's 154
    assert [r.pattern for r in agent.rules] == ["base.example"]  # kept from the main file
    assert ci.name == "ci" and ci.uids == (1002,)
    assert (cfg.grants.floor, cfg.grants.ceiling) == (200, 5000)  # one key of [grants]
    assert cfg.files == (
        path,
        str(etc / "conf.d" / "50-install.toml"),
        str(etc / "conf.d" / "60-more.toml"),
        str(etc / "conf.d" / "90-last.toml"),
    )


def test_dropin_list_replaces_the_whole_list(etc: Path) -> None:
    path = conf(etc, BASE.replace("users = []", 'users = ["agent", "agent2"]'))
    write(etc / "conf.d" / "50.toml", '[profiles.agent]\nusers = ["agent2"]\n')
    assert load(path, src(etc)).profiles[0].uids == (1001,)


def test_dropin_order_is_by_name(etc: Path) -> None:
    path = conf(etc, BASE)
    write(etc / "conf.d" / "b.toml", '[profiles.agent]\nusers = ["agent2"]\n')
    write(etc / "conf.d" / "a.toml", '[profiles.agent]\nusers = ["agent"]\n')
    assert load(path, src(etc)).profiles[0].uids == (1001,)


def test_dropin_syntax_error_names_itself(etc: Path) -> None:
    path = conf(etc, BASE)
    bad = write(etc / "conf.d" / "50-install.toml", '[profiles.agent]\n\nusers = = ["agent"]\n')
    with pytest.raises(ConfigError) as exc:
        load(path, src(etc))
    assert (exc.value.file, exc.value.line) == (str(bad), 3)
    assert str(bad) in str(exc.value)


def test_dropin_errors_name_the_dropin_line_and_key(etc: Path) -> None:
    path = conf(etc, BASE)
    bad = write(etc / "conf.d" / "50.toml", '# x\n[profiles.agent]\n\nusers = ["nobody"]\n')
    with pytest.raises(ConfigError) as exc:
        load(path, src(etc))
    assert (exc.value.file, exc.value.line, exc.value.key) == (
        str(bad),
        4,
        "profiles.agent.users",
    )
    write(bad, "[grants]\nfloor = 1\nbogus = 3\n")
    with pytest.raises(ConfigError) as exc:
        load(path, src(etc))
    assert (exc.value.file, exc.value.line, exc.value.key) == (str(bad), 3, "grants.bogus")
    # a value that is fine alone but not with the main file's: the drop-in's line
    write(bad, "[grants]\nfloor = 9000\n")
    with pytest.raises(ConfigError) as exc:
        load(path, src(etc))
    assert (exc.value.file, exc.value.key) == (path, "grants.ceiling")  # ceiling < floor
    write(bad, "\n[grants]\nceiling = 50\n")
    with pytest.raises(ConfigError) as exc:
        load(path, src(etc))
    assert (exc.value.file, exc.value.line, exc.value.key) == (str(bad), 3, "grants.ceiling")


def test_unreadable_main_file(etc: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(str(etc / "missing.toml"), src(etc))
    assert exc.value.file == str(etc / "missing.toml")


# --- allowlist.d ---------------------------------------------------------------------------------


def test_allowlist_d_every_profile_then_its_own_sorted(etc: Path) -> None:
    path = conf(
        etc,
        BASE.replace("users = []", 'users = ["agent"]')
        + '[profiles.ci]\nusers = ["builder"]\nallowlists = ["lists/ci.txt"]\n',
    )
    d = etc / "allowlist.d"
    write(etc / "lists" / "ci.txt", "ci.example\n")
    write(d / "b.list", "b.example\n")
    write(d / "a.list", "a.example\n")
    write(d / "local.list", "# nothing yet\n")
    write(d / "agent" / "z.list", "agent-only.example\n")
    write(d / "ci" / "y.list", "ci-only.example\n")
    write(d / "a.list.dpkg-old", "old.example\n")  # ignored, like .dpkg-dist and the rest
    write(d / "a.list.dpkg-dist", "dist.example\n")
    write(d / "notes.txt", "txt.example\n")
    write(d / ".hidden.list", "hidden.example\n")
    write(d / "nobody" / "x.list", "nobody.example\n")  # no such profile: unused
    agent, ci = load(path, src(etc)).profiles
    assert [r.pattern for r in agent.rules] == [
        "a.example",
        "b.example",
        "agent-only.example",
        "base.example",
    ]
    assert [r.pattern for r in ci.rules] == [
        "ci.example",
        "a.example",
        "b.example",
        "ci-only.example",
    ]
    assert agent.allowlists == tuple(
        str(d / n) for n in ("a.list", "b.list", "local.list", "agent/z.list")
    )
    assert ci.allowlists[0] == str(etc / "lists" / "ci.txt")
    assert agent.rules[0].source == f"{d / 'a.list'}:1"


def test_allowlist_d_file_named_in_allowlists_is_read_once(etc: Path) -> None:
    path = conf(
        etc, BASE.replace('allow = ["base.example"]', 'allowlists = ["allowlist.d/a.list"]')
    )
    write(etc / "allowlist.d" / "a.list", "a.example\n")
    (p,) = load(path, src(etc)).profiles
    assert [r.pattern for r in p.rules] == ["a.example"]


def test_allowlist_d_error_names_file_and_line(etc: Path) -> None:
    path = conf(etc, BASE)
    bad = write(etc / "allowlist.d" / "local.list", "ok.example\n*\n")
    with pytest.raises(ConfigError) as exc:
        load(path, src(etc))
    assert (exc.value.file, exc.value.line) == (str(bad), 2)


def test_explicit_allowlists_key_keeps_working(etc: Path) -> None:
    # what tests/integration write_config does: absolute and relative files
    lists = write(etc.parent / "elsewhere" / "x.txt", "x.example\n")
    write(etc / "rel.txt", "rel.example\n")
    path = conf(
        etc, BASE.replace('allow = ["base.example"]', f'allowlists = ["{lists}", "rel.txt"]')
    )
    (p,) = load(path, src(etc)).profiles
    assert [r.pattern for r in p.rules] == ["x.example", "rel.example"]
    assert p.allowlists == (str(lists), str(etc / "rel.txt"))


# --- presets ----------------------------------------------------------------------------------


def test_presets_by_name(etc: Path) -> None:
    path = conf(etc, BASE + 'presets = ["node", "python", "node"]\n')
    (p,) = load(path, src(etc)).profiles
    assert p.presets == ("node", "python")
    assert [r.pattern for r in p.rules] == [
        "registry.npmjs.org",
        "pypi.org",
        "files.pythonhosted.org",
        "base.example",
    ]
    assert p.rules[1].source == f"{etc.parent / 'presets' / 'python.list'}:2"
    assert p.allowlists == ()  # presets are not the operator's files


def test_unknown_preset_lists_the_available_ones(etc: Path) -> None:
    path = conf(etc, BASE + 'presets = ["python", "rust"]\n')
    with pytest.raises(ConfigError) as exc:
        load(path, src(etc))
    assert exc.value.key == "profiles.agent.presets" and exc.value.file == path
    assert exc.value.line == BASE.count("\n") + 3
    assert "'rust'" in exc.value.detail and "node, python" in exc.value.detail
    assert "README" not in exc.value.detail


def test_missing_presets_dir_is_a_clear_error(etc: Path) -> None:
    path = str(
        write(
            etc / "egressd.toml",
            '[daemon]\npresets_dir = "/nonexistent/presets"\n' + BASE + 'presets = ["python"]\n',
        )
    )
    with pytest.raises(ConfigError) as exc:
        load(path, src(etc))
    assert exc.value.key == "profiles.agent.presets"
    assert "/nonexistent/presets" in exc.value.detail
    assert "No such file or directory" in exc.value.detail


def test_presets_dir_must_be_absolute(etc: Path) -> None:
    path = str(write(etc / "egressd.toml", '[daemon]\npresets_dir = "presets"\n' + BASE))
    with pytest.raises(ConfigError) as exc:
        load(path, src(etc))
    assert (exc.value.key, exc.value.line) == ("daemon.presets_dir", 2)


def test_no_presets_no_presets_dir_needed(etc: Path) -> None:
    path = str(write(etc / "egressd.toml", BASE))  # default dir, absent here: not read
    assert load(path, src(etc)).daemon.presets_dir == "/usr/share/egressd/presets"


def test_doctor_root_maps_the_presets_dir(etc: Path) -> None:
    path = str(write(etc / "egressd.toml", BASE + 'presets = ["node"]\n'))
    root = src(etc, host_path=lambda p: str(etc.parent / "presets"))
    assert load(path, root).profiles[0].presets == ("node",)


# --- users ------------------------------------------------------------------------------------


def test_empty_users_is_valid_and_restricts_nobody(etc: Path) -> None:
    cfg = load(conf(etc, BASE), src(etc))
    assert cfg.profiles[0].uids == () and restricts_nobody(cfg)
    cfg = load(conf(etc, BASE + '[profiles.ci]\nusers = ["builder"]\nport = 155\n'), src(etc))
    assert not restricts_nobody(cfg)


def test_missing_users_key_is_still_an_error(etc: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(conf(etc, "[profiles.agent]\nallow = []\n"), src(etc))
    assert exc.value.key == "profiles.agent.users" and exc.value.line == 3


@pytest.fixture
def real(etc: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(cli, "SOURCES", src(etc))
    return etc


def test_run_refuses_a_config_that_restricts_nobody(
    real: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = conf(real, BASE)
    assert cli.main(["run", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "no user configured" in err and path in err and "conf.d" in err


def test_reload_refuses_it_too(real: Path) -> None:
    # the daemon calls the same loader at every reload, and keeps the old policy on error
    loader = cli._loader(cli._parser().parse_args(["run", "--config", conf(real, BASE)]))
    with pytest.raises(ConfigError, match="no user configured"):
        loader()
    write(real / "conf.d" / "50-install.toml", '[profiles.agent]\nusers = ["agent"]\n')
    assert loader().profiles[0].uids == (1000,)


def test_check_config_says_no_user_configured(
    real: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = conf(real, BASE)
    write(real / "allowlist.d" / "local.list", "l.example\n")
    assert cli.main(["check-config", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "no user configured" in out
    assert f"config: {path}" in out
    assert f"allowlist {real / 'allowlist.d' / 'local.list'}" in out
    assert "uids none (restricts nobody)" in out


def test_check_config_lists_what_contributed(
    real: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = conf(real, BASE)
    dropin = write(
        real / "conf.d" / "50-install.toml",
        '[profiles.agent]\nusers = ["agent"]\npresets = ["python"]\n',
    )
    assert cli.main(["check-config", "--config", path]) == 0
    out = capsys.readouterr().out
    assert f"config: {path}, {dropin}" in out
    assert f"presets python (from {real.parent / 'presets'})" in out
    assert "no user configured" not in out and "uids 1000," in out


# --- one function for both paths ----------------------------------------------------------------


def test_command_line_and_toml_build_equal_profiles(etc: Path) -> None:
    lists = write(etc.parent / "x.txt", "x.example\n!bad.x.example\n")
    presets = etc.parent / "presets"
    cl = CommandLine(
        users=["agent", "4242"],
        allowlists=[str(lists)],
        presets=["python"],
        presets_dir=str(presets),
        upstreams=["192.0.2.9"],
        listen="127.0.0.1:154",
        min_ttl=30,
        allow_private=["10.20.0.0/16"],
    )
    path = str(
        write(
            etc / "egressd.toml",
            f'[daemon]\nupstreams = ["192.0.2.9"]\npresets_dir = "{presets}"\n'
            "[grants]\nfloor = 30\n"
            f'[profiles.default]\nusers = ["agent", 4242]\npresets = ["python"]\n'
            f'allowlists = ["{lists}"]\nport = 154\nprivate_answers = ["10.20.0.0/16"]\n',
        )
    )
    one_line = from_command_line(cl, src(etc))
    toml = load(path, src(etc))
    assert one_line.profiles == toml.profiles
    assert one_line.daemon == toml.daemon
    assert one_line.grants == toml.grants


def test_command_line_presets(etc: Path) -> None:
    cl = CommandLine(users=["agent"], presets=["node"], presets_dir=str(etc.parent / "presets"))
    (p,) = from_command_line(cl, src(etc)).profiles
    assert [r.pattern for r in p.rules] == ["registry.npmjs.org"] and p.presets == ("node",)
    with pytest.raises(ConfigError) as exc:
        from_command_line(
            CommandLine(users=["agent"], presets=["nope"], presets_dir=cl.presets_dir), src(etc)
        )
    assert exc.value.key == "--preset" and "node, python" in exc.value.detail
    with pytest.raises(ConfigError) as exc:
        from_command_line(
            CommandLine(users=["agent"], presets=["node"], presets_dir="rel"), src(etc)
        )
    assert exc.value.key == "--presets-dir"


def test_command_line_ignores_dropin_dirs(etc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(etc)
    write(etc / "allowlist.d" / "a.list", "a.example\n")
    write(etc / "conf.d" / "a.toml", "[grants]\nfloor = 7\n")
    cfg = from_command_line(CommandLine(users=["agent"], allow=["b.example"]), src(etc))
    assert [r.pattern for r in cfg.profiles[0].rules] == ["b.example"]
    assert cfg.grants.floor == 300 and cfg.files == ()


def test_cli_run_takes_preset_options(real: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a config error is reported before root is needed: the options reached the loader
    argv = [
        "run",
        "--user",
        "agent",
        "--preset",
        "nope",
        "--presets-dir",
        str(real.parent / "presets"),
    ]
    assert cli.main(argv) == 2
    assert "--preset" in capsys.readouterr().err


# --- the pure layer does no I/O -------------------------------------------------------------


def test_config_module_does_no_io() -> None:
    """egressd.config gets texts and facts from egressd.sources: it imports nothing that
    reads the system and calls no open(). (lint-imports keeps sockets, subprocess and
    the rest out of it; this keeps files and the user database out.)"""
    tree = ast.parse((REPO / "egressd" / "config.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("open", "exec", "eval"), node.func.id
    forbidden = {"os", "pwd", "grp", "io", "pathlib", "glob", "shutil", "socket", "subprocess"}
    assert not imported & forbidden, imported & forbidden
