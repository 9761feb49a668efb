"""The control socket: a real Unix socket in a temp dir, the server on a running loop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egressd.control import ControlError, ControlServer, NotRunning, call


class Served:
    """A ControlServer on a loop in a thread, so the blocking client can be used as is."""

    def __init__(self, path: Path, handlers: dict[str, Any]) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(str(path), handlers)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def echo(args: dict[str, Any]) -> dict[str, Any]:
    return {"echo": args}


async def broken(args: dict[str, Any]) -> None:
    raise ControlError("reload failed: bad line")


async def buggy(args: dict[str, Any]) -> None:
    raise KeyError("oops")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Served]]:
    path = tmp_path / "run" / "control"
    s = Served(path, {"echo": echo, "broken": broken, "buggy": buggy})
    try:
        yield path, s
    finally:
        s.close()


def raw(path: Path, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(data)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    return dict(json.loads(reply))


def test_a_command_and_its_result(served: tuple[Path, Served]) -> None:
    path, _ = served
    assert call(str(path), "echo", {"x": 1}) == {"echo": {"x": 1}}


def test_the_socket_is_root_only(served: tuple[Path, Served]) -> None:
    path, _ = served
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_another_uid_is_refused() -> None:
    # A directory the other uid can enter (pytest's tmp_path is root's alone).
    top = Path(tempfile.mkdtemp(prefix="egd-control-"))
    os.chmod(top, 0o755)
    path = top / "control"
    server = Served(path, {"echo": echo})
    try:
        asked_by_other(path)
    finally:
        server.close()
        shutil.rmtree(top)


def asked_by_other(path: Path) -> None:
    os.chmod(path, 0o666)  # past the file mode: the peer's uid is still checked
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to an unused uid and ask
        os.close(r)
        try:
            os.setresuid(64999, 64999, 64999)
            reply = raw(path, b'{"command": "echo"}\n')
            os.write(w, json.dumps(reply).encode())
        except BaseException as err:  # noqa: BLE001 - tell the parent, whatever it was
            os.write(w, json.dumps({"child": repr(err)}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        reply = json.loads(fh.read())
    os.waitpid(pid, 0)
    assert reply == {"ok": False, "error": "the control socket is for root only"}
    assert call(str(path), "echo") == {"echo": {}}  # positive twin: root is answered


def test_errors_are_answers_and_the_server_keeps_serving(served: tuple[Path, Served]) -> None:
    path, _ = served
    with pytest.raises(ControlError, match="reload failed: bad line"):
        call(str(path), "broken")
    with pytest.raises(ControlError, match="internal error: KeyError"):
        call(str(path), "buggy")
    with pytest.raises(ControlError, match="unknown command 'nope'"):
        call(str(path), "nope")
    assert raw(path, b"not json\n")["ok"] is False
    assert raw(path, b'["a list"]\n')["ok"] is False
    assert raw(path, b'{"command": "echo", "args": 3}\n')["ok"] is False
    assert call(str(path), "echo") == {"echo": {}}


def test_not_running_is_said_clearly(tmp_path: Path) -> None:
    with pytest.raises(NotRunning, match="not running"):
        call(str(tmp_path / "control"), "status")
    stale = tmp_path / "stale"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))  # a socket file nobody listens on (a crashed daemon's)
    s.close()
    with pytest.raises(NotRunning):
        call(str(stale), "status")


def test_a_stale_socket_is_replaced_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "control"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    first = Served(path, {"echo": echo})  # replaced the stale file
    try:
        assert call(str(path), "echo") == {"echo": {}}
        with pytest.raises(OSError, match="another egressd answers"):
            Served(path, {"echo": echo})
        assert call(str(path), "echo") == {"echo": {}}  # the first still serves
    finally:
        first.close()
    assert not path.exists()  # removed on close
