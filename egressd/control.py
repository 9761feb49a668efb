"""The control socket: how the CLI (``egressd status``, ``grants``, ``reload``, ``check
--resolve``) asks the running daemon.

Protocol (documented in docs/commands/control.md): a Unix stream socket, root only
(mode 0600 and the peer's uid checked with SO_PEERCRED). The client sends one JSON object
on one line, ``{"command": "status", "args": {...}}``, and reads one JSON line back,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``; then the daemon closes
the connection. One request per connection keeps the server trivial to reason about.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 5.0  # a client that connects and says nothing is dropped after this

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(Exception):
    """The daemon answered, and the answer is an error (e.g. a reload that failed)."""


class NotRunning(ControlError):
    """Nobody answers on the control socket: egressd is not running (or not there)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"not running (nobody answers on {path}: {why})")
        self.path = path


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    """Serves the handlers on a root-only Unix socket at ``path``."""

    def __init__(self, path: str, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        """Bind the socket. Refuses (OSError) when another egressd answers on it; a stale
        socket file from a crash is replaced."""
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if _answers(self.path):
            raise OSError(errno.EADDRINUSE, f"another egressd answers on {self.path}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o177)  # created 0600: no window in which others could connect
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=self.path, limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None
        # Remove the socket only if it is still ours (a newer daemon may have replaced it).
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                # Read first, even from a peer about to be refused: closing with its
                # request unread would reset the connection before it reads why.
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            except (TimeoutError, ValueError, asyncio.LimitOverrunError) as err:
                await _send(writer, {"ok": False, "error": f"bad request: {err}"})
                return
            sock = writer.get_extra_info("socket")
            if sock is None or peer_uid(sock) != 0:
                await _send(writer, {"ok": False, "error": "the control socket is for root only"})
                return
            try:
                request = json.loads(line)
            except ValueError as err:
                await _send(writer, {"ok": False, "error": f"bad request: {err}"})
                return
            await _send(writer, await self._dispatch(request))
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'bad request: expected {"command": ..., "args": {...}}'}
        args = request.get("args") or {}
        if not isinstance(args, dict):
            return {"ok": False, "error": "bad request: args must be an object"}
        handler = self.handlers.get(request["command"])
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown command {request['command']!r} ({known})"}
        try:
            return {"ok": True, "result": await handler(args)}
        except ControlError as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:  # noqa: BLE001 - the daemon keeps serving; the CLI is told
            return {"ok": False, "error": f"internal error: {type(err).__name__}: {err}"}


async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def call(
    path: str, command: str, args: Mapping[str, Any] | None = None, timeout: float = 60.0
) -> Any:
    """Ask the daemon; returns the result. Raises NotRunning when nobody answers, and
    ControlError with the daemon's message when the answer is an error."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise NotRunning(path, err.strerror or str(err)) from None
        except PermissionError as err:
            raise ControlError(f"cannot use {path}: {err.strerror} (run as root)") from None
        request = {"command": command, "args": dict(args or {})}
        s.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        raise ControlError(f"egressd did not answer on {path} within {timeout:g} s") from None
    finally:
        s.close()
    data = b"".join(chunks)
    if not data:
        raise NotRunning(path, "the connection closed without an answer")
    try:
        reply = json.loads(data)
    except ValueError as err:
        raise ControlError(f"unreadable answer on {path}: {err}") from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")))
    return reply.get("result")
