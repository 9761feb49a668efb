"""Network-namespace lab for egressd integration tests.

Topology (all created fresh per Lab, names "egd-<rand>-inet" / "egd-<rand>-host"):

    host ns  eth0 198.51.100.2/24  2001:db8:100::2/64   (egressd + agent run here)
       |  veth
    inet ns  eth0 198.51.100.1/24  2001:db8:100::1/64   fake authoritative DNS :53
                  198.51.100.99/24 2001:db8:100::99/64  rogue resolver :53
             lo   local 203.0.113.0/24, 2001:db8:113::/64 (AnyIP) TCP echo :80 :443 :8080,
                  UDP echo :9999 (echo also answers on 198.51.100.1)

Nothing here touches the root namespace's firewall or routing; every
process the lab starts is tracked by pid and killed in close().
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
AGENT_SOURCE = (HERE / "agent.py").read_text(encoding="utf-8")
FAKENET = HERE / "fakenet.py"

AGENT_UID = 64123
AGENT_PYTHON = "/usr/bin/python3"  # system python: the agent uid can't read the venv
JOURNALD = "/lib/systemd/systemd-journald"

INET_V4 = "198.51.100.1"
INET_V6 = "2001:db8:100::1"
ROGUE_V4 = "198.51.100.99"
ROGUE_V6 = "2001:db8:100::99"
HOST_V4 = "198.51.100.2"
HOST_V6 = "2001:db8:100::2"
ANYIP_V4 = "203.0.113.0/24"
ANYIP_V6 = "2001:db8:113::/64"
ROGUE_ANSWER = "203.0.113.250"
ECHO_TCP_PORTS = (80, 443, 8080)
ECHO_UDP_PORT = 9999
IFNAME = "eth0"

Records = Mapping[str, Any]
T = TypeVar("T")

# Every namespace name any Lab of this process created (for leak checks).
CREATED_NAMESPACES: list[str] = []
# /etc/netns is only removed (when empty) if it did not exist before the tests;
# decided once per process because concurrent labs share it.
_ETC_NETNS = Path("/etc/netns")
_ETC_NETNS_PREEXISTED = _ETC_NETNS.exists()


class LabError(RuntimeError):
    pass


class LabWarning(UserWarning):
    pass


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        check=False,
    )
    if check and proc.returncode != 0:
        raise LabError(
            f"command failed ({proc.returncode}): {shlex.join(cmd)}\n"
            f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
        )
    return proc


def poll(cond: Callable[[], T], timeout: float, interval: float = 0.05) -> T | None:
    """Return cond()'s first truthy value, or None after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a fake server's log.

    The servers create their log before they say ready, so a missing or unreadable log is
    a broken observation, never "nothing happened": it raises, or a negative check
    ("nothing reached the upstream") would pass when logging broke.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise LabError(f"cannot read the log {path}: {err}") from err
    out = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n") and line.strip():  # skip a line still being written
            out.append(json.loads(line))
    return out


def _matches(entry: Mapping[str, Any], match: Mapping[str, Any]) -> bool:
    return all(entry.get(k) == v for k, v in match.items())


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except FileNotFoundError:
        return ""


def _terminate(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, by pid only (never by name)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


# --------------------------------------------------------------------------- DNS / echo


class DnsControl:
    """Records and query log of one fake DNS server instance."""

    def __init__(self, log_path: Path, records_path: Path | None) -> None:
        self.log_path = log_path
        self.records_path = records_path

    def set(self, records: Records) -> None:
        """Replace all records atomically (temp file + rename, so the server never
        reads a partial file). Takes effect for the next query."""
        if self.records_path is None:
            raise LabError("the rogue resolver has fixed answers")
        tmp = self.records_path.with_suffix(f".tmp{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(records), encoding="utf-8")
        os.replace(tmp, self.records_path)

    def queries(self, **match: Any) -> list[dict[str, Any]]:
        """Logged queries, oldest first; keyword args filter on equal fields
        (qname is lower-case and absolute, e.g. qname="a.test.")."""
        return [q for q in _read_jsonl(self.log_path) if _matches(q, match)]

    def clear(self) -> None:
        """Forget logged queries (the server appends with O_APPEND, so truncating is safe)."""
        with open(self.log_path, "w", encoding="utf-8"):
            pass

    def wait_query(self, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        found = poll(lambda: self.queries(**match), timeout)
        if not found:
            raise LabError(f"no DNS query matching {match} within {timeout}s")
        return found[0]


class EchoControl:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path

    def connections(self, **match: Any) -> list[dict[str, Any]]:
        """Accepted TCP connections ({"event": "accept", "proto": "tcp", "src", "sport",
        "dst", "dport", "ts"}) and UDP datagrams ({"event": "datagram", ...})."""
        return [c for c in _read_jsonl(self.log_path) if _matches(c, match)]


# --------------------------------------------------------------------------- daemons


class NotifyListener:
    """sd_notify receiver: a unix datagram socket on a path (abstract sockets are
    per network namespace, so they would not reach the daemon)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._messages: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        # A reader thread, because the kernel queue is tiny (net.unix.max_dgram_qlen)
        # and a daemon blocked in sendto() would make tests flaky.
        self._thread = threading.Thread(target=self._loop, name=f"notify:{path.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self._messages.append(data.decode("utf-8", "replace"))
                self._cond.notify_all()

    def messages(self) -> list[str]:
        with self._cond:
            return list(self._messages)

    def wait_for(
        self, pred: Callable[[str], bool], timeout: float, alive: Callable[[], bool]
    ) -> str | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self._messages:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    return None
                self._cond.wait(min(left, 0.1))

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Daemon:
    """A process started by Lab.start_daemon/start_process (pid == the real program:
    `ip netns exec` and `nsenter` exec it without forking)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        proc: subprocess.Popen[bytes],
        stdout_path: Path,
        stderr_path: Path,
        notify: NotifyListener,
    ) -> None:
        self.name = name
        self.argv = argv
        self.proc = proc
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self._notify = notify

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """None while running; negative signal number if killed by a signal."""
        return self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def notifications(self) -> list[str]:
        """All sd_notify datagrams received so far (raw text, e.g. "READY=1\\nSTATUS=...")."""
        return self._notify.messages()

    def wait_notification(self, text: str, timeout: float = 15.0) -> str:
        """Wait for a datagram containing a line equal to `text` (e.g. "STOPPING=1")."""
        msg = self._notify.wait_for(lambda m: text in m.splitlines(), timeout, lambda: self.running)
        if msg is None:
            msg = next((m for m in self.notifications() if text in m.splitlines()), None)
        if msg is None:
            state = "running" if self.running else f"exited with {self.returncode}"
            raise LabError(
                f"{self.name}: no {text!r} notification within {timeout}s ({state}); "
                f"got {self.notifications()!r}\n--- stderr ---\n{self.stderr_text()[-6000:]}"
            )
        return msg

    def wait_ready(self, timeout: float = 15.0) -> None:
        self.wait_notification("READY=1", timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> int:
        """SIGKILL by pid (simulates a crash); returns the exit status."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        return self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait. If it does not exit in time it is SIGKILLed and LabError raised."""
        if not self.running:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise LabError(f"{self.name} did not exit within {timeout}s of SIGTERM") from None

    def stdout_text(self) -> str:
        return tail(self.stdout_path, 10**9)

    def stderr_text(self) -> str:
        return tail(self.stderr_path, 10**9)

    def stderr_json(self) -> list[dict[str, Any]]:
        """stderr lines that parse as JSON objects (egressd's no-journald log format)."""
        out = []
        for line in self.stderr_text().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def _cleanup(self) -> None:
        _terminate(self.proc, grace=5)
        self._notify.close()


# --------------------------------------------------------------------------- journald

JOURNALD_CONF = """\
[Journal]
Storage=volatile
RuntimeMaxUse=64M
ReadKMsg=no
Audit=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
"""


class PrivateJournal:
    """A real systemd-journald in a private mount namespace that is joined to the
    lab's host net ns. Inside it /run/systemd is a fresh tmpfs and /run/log is a
    bind mount of a root-only temp dir, so nothing of the machine is touched and
    everything vanishes with the mount namespace when its processes die."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = lab.tmpdir / "journal"
        self.logroot = self.dir / "runlog"
        (self.logroot / "journal").mkdir(parents=True)
        self.journal_dir = self.logroot / "journal"
        self.holder: subprocess.Popen[bytes] | None = None
        self.journald: subprocess.Popen[bytes] | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        # `ip netns exec` gives the host ns's /sys and resolv.conf (like a normal
        # daemon start); unshare then makes the mount ns private, so our mounts
        # never propagate to the machine. Both exec, so the pid is `sleep`.
        holder = self.holder = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.lab.host,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sleep",
                "infinity",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sleep_exe = os.path.realpath(shutil.which("sleep") or "/usr/bin/sleep")
        if not poll(lambda: self._exe(holder) == sleep_exe, 10):
            raise LabError("journal mount-namespace holder did not start")
        conf = self.dir / "journald.conf"
        conf.write_text(JOURNALD_CONF, encoding="utf-8")
        # journald needs a cgroup fs on /sys/fs/cgroup (ip netns exec mounted a
        # fresh /sys without one); a read-only cgroup2 mount is enough.
        # Config goes in a /run drop-in, so /etc is not touched (and a missing
        # /etc/systemd/journald.conf is no problem).
        script = f"""
            set -e
            if [ -d /run/systemd ]; then mount -t tmpfs -o mode=0755,size=8m tmpfs /run/systemd
            else mount -t tmpfs -o mode=0755,size=8m tmpfs /run; mkdir -p /run/systemd /run/log; fi
            mkdir -p /run/systemd/journal /run/systemd/journald.conf.d
            cp {shlex.quote(str(conf))} /run/systemd/journald.conf.d/zzzz-egd-lab.conf
            mount --bind {shlex.quote(str(self.logroot))} /run/log
            mountpoint -q /sys/fs/cgroup || mount -t cgroup2 -o ro cgroup2 /sys/fs/cgroup
        """
        self.exec(["sh", "-c", script])
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC")
        }
        env.update(SYSTEMD_LOG_TARGET="console", SYSTEMD_LOG_LEVEL="info")
        self.stderr_path = self.dir / "journald.stderr"
        with open(self.stderr_path, "wb") as err:
            journald = self.journald = subprocess.Popen(
                [*self.enter_prefix(), JOURNALD],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
            )
        # The socket is visible from here through the process's root (/proc/PID/root
        # resolves paths in its mount namespace).
        self.socket_path = f"/proc/{journald.pid}/root/run/systemd/journal/socket"
        if (
            not poll(lambda: os.path.exists(self.socket_path) or journald.poll() is not None, 10)
            or journald.poll() is not None
        ):
            raise LabError(f"systemd-journald did not start:\n{tail(self.stderr_path)}")
        # Prove the whole path works (socket -> journald -> files -> journalctl -D).
        probe = secrets.token_hex(8)
        self.send({"MESSAGE": "egd lab journal probe", "EGD_LAB_PROBE": probe})
        if not self.wait(f"EGD_LAB_PROBE={probe}", timeout=10):
            raise LabError(f"journald probe entry never showed up:\n{tail(self.stderr_path)}")

    @staticmethod
    def _exe(proc: subprocess.Popen[bytes]) -> str | None:
        try:
            return os.readlink(f"/proc/{proc.pid}/exe")
        except OSError:
            return None

    @property
    def holder_pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    def enter_prefix(self, cwd: str = "/") -> list[str]:
        """Command prefix: join the private mount ns and the lab's host net ns."""
        return [
            "nsenter",
            f"--target={self.holder_pid}",
            "--mount",
            f"--net=/run/netns/{self.lab.host}",
            f"--wd={cwd}",
            "--",
        ]

    def exec(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.enter_prefix(), *cmd], check=check, input=input, timeout=timeout)

    def send(self, fields: Mapping[str, str]) -> None:
        """Send one native-protocol entry from the test process (simple values only)."""
        payload = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(payload, self.socket_path)

    def query(self, *matches: str, extra: Sequence[str] = ()) -> list[dict[str, Any]]:
        proc = run(
            [
                "journalctl",
                "-D",
                str(self.journal_dir),
                "-o",
                "json",
                "--all",
                "--no-pager",
                *extra,
                *matches,
            ],
            check=False,
        )
        # journalctl exits 1 with "-- No entries --" on stderr for an empty result; any
        # other failure is a broken observation and must not read as "nothing logged".
        if proc.returncode != 0 and not (
            proc.returncode == 1 and "No entries" in proc.stderr and not proc.stdout.strip()
        ):
            raise LabError(
                f"journalctl -D {self.journal_dir} failed ({proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}"
            )
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    def wait(self, *matches: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            found = self.query(*matches)
            return found if len(found) >= count else None

        return poll(enough, timeout, interval=0.1) or self.query(*matches)

    def mount_ns_inode(self) -> int:
        return os.stat(f"/proc/{self.holder_pid}/ns/mnt").st_ino

    def close(self) -> None:
        if self.journald is not None:
            _terminate(self.journald)
        if self.holder is not None:
            # Last process of the mount ns: its death unmounts the tmpfs and binds.
            if self.holder.poll() is None:
                self.holder.kill()
            self.holder.wait(10)


# --------------------------------------------------------------------------- lab

_open_labs: weakref.WeakSet[Lab] = weakref.WeakSet()


@atexit.register
def _close_leftover_labs() -> None:  # last resort if a test run is interrupted
    for lab in list(_open_labs):
        with contextlib.suppress(Exception):
            lab.close()


class Lab:
    """Use as a context manager, or call close() (idempotent)."""

    def __init__(self, *, agent_uid: int = AGENT_UID, keep_tmp: bool | None = None) -> None:
        tag = secrets.token_hex(3)
        self.inet = f"egd-{tag}-inet"
        self.host = f"egd-{tag}-host"
        self.agent_uid = agent_uid
        self.keep_tmp = bool(os.environ.get("EGD_LAB_KEEP")) if keep_tmp is None else keep_tmp
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"egd-lab-{tag}-"))  # mode 0700
        self.netns_dir = _ETC_NETNS / self.host
        self._namespaces: list[str] = []
        self._servers: dict[str, subprocess.Popen[bytes]] = {}
        self._daemons: list[Daemon] = []
        self._journal: PrivateJournal | None = None
        self._closed = False
        self._counter = 0
        self.stray_pids: list[int] = []
        self.dns = DnsControl(self.tmpdir / "dns.log", self.tmpdir / "records.json")
        self.rogue = DnsControl(self.tmpdir / "rogue.log", None)
        self.echo = EchoControl(self.tmpdir / "echo.log")
        _open_labs.add(self)
        try:
            self._setup_network()
            self._setup_resolv_conf()
            self._start_servers()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- setup

    def _setup_network(self) -> None:
        for ns in (self.inet, self.host):
            run(["ip", "netns", "add", ns])
            self._namespaces.append(ns)
            CREATED_NAMESPACES.append(ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # No DAD anywhere: v6 addresses (incl. link-local) are usable at once.
            for key in ("all", "default"):
                run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "sysctl",
                        "-q",
                        "-w",
                        f"net.ipv6.conf.{key}.accept_dad=0",
                    ]
                )
        run(
            [
                "ip",
                "-n",
                self.host,
                "link",
                "add",
                "name",
                IFNAME,
                "type",
                "veth",
                "peer",
                "name",
                IFNAME,
                "netns",
                self.inet,
            ]
        )
        for ns, addrs in (
            (self.inet, [f"{INET_V4}/24", f"{ROGUE_V4}/24", f"{INET_V6}/64", f"{ROGUE_V6}/64"]),
            (self.host, [f"{HOST_V4}/24", f"{HOST_V6}/64"]),
        ):
            for addr in addrs:
                extra = ["nodad"] if ":" in addr else []
                run(["ip", "-n", ns, "addr", "add", addr, "dev", IFNAME, *extra])
            run(["ip", "-n", ns, "link", "set", IFNAME, "up"])
        # AnyIP: every address of these ranges is local in inet.
        run(["ip", "-n", self.inet, "route", "add", "local", ANYIP_V4, "dev", "lo"])
        run(["ip", "-n", self.inet, "-6", "route", "add", "local", ANYIP_V6, "dev", "lo"])
        run(["ip", "-n", self.host, "route", "add", "default", "via", INET_V4])
        run(["ip", "-n", self.host, "-6", "route", "add", "default", "via", INET_V6])
        # Explicit routes too, so a test that removes the defaults keeps the fake internet.
        run(["ip", "-n", self.host, "route", "add", ANYIP_V4, "via", INET_V4])
        run(["ip", "-n", self.host, "-6", "route", "add", ANYIP_V6, "via", INET_V6])
        if not poll(
            lambda: "LOWER_UP" in run(["ip", "-n", self.host, "link", "show", IFNAME]).stdout, 5
        ):
            raise LabError("veth did not come up")

    def _setup_resolv_conf(self) -> None:
        # `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc/*, so the agent's
        # glibc resolver asks the rogue resolver unless egressd redirects it.
        _ETC_NETNS.mkdir(mode=0o755, exist_ok=True)
        self.netns_dir.mkdir(mode=0o755)
        resolv = self.netns_dir / "resolv.conf"
        resolv.write_text(
            f"nameserver {ROGUE_V4}\noptions timeout:2 attempts:1\n", encoding="utf-8"
        )
        resolv.chmod(0o644)

    def _start_servers(self) -> None:
        self.dns.set({})
        self._spawn_server(
            "dns",
            [
                "dns",
                "--listen",
                INET_V4,
                "--listen",
                INET_V6,
                "--records",
                str(self.dns.records_path),
                "--log",
                str(self.dns.log_path),
            ],
        )
        self._spawn_server(
            "rogue",
            [
                "dns",
                "--listen",
                ROGUE_V4,
                "--listen",
                ROGUE_V6,
                "--rogue-a",
                ROGUE_ANSWER,
                "--log",
                str(self.rogue.log_path),
            ],
        )
        self._spawn_server(
            "echo",
            [
                "echo",
                *[a for p in ECHO_TCP_PORTS for a in ("--tcp-port", str(p))],
                "--udp-port",
                str(ECHO_UDP_PORT),
                "--log",
                str(self.echo.log_path),
            ],
        )
        for name in ("dns", "rogue", "echo"):
            proc = self._servers[name]
            ready = self.tmpdir / f"{name}.ready"
            if (
                not poll(functools.partial(_ready_or_dead, ready, proc), 15)
                or proc.poll() is not None
            ):
                raise LabError(f"fake {name} server failed:\n{tail(self.tmpdir / f'{name}.err')}")

    def _spawn_server(self, name: str, args: list[str]) -> None:
        with open(self.tmpdir / f"{name}.err", "wb") as err:
            self._servers[name] = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.inet,
                    sys.executable,
                    str(FAKENET),
                    *args,
                    "--ready",
                    str(self.tmpdir / f"{name}.ready"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )

    # ---- helpers

    def ns(self, which: str) -> str:
        """'host'/'inet' -> real namespace name (real names pass through)."""
        return {"host": self.host, "inet": self.inet}.get(which, which)

    def host_etc(self, name: str, text: str) -> Path:
        """Give every process started in the host ns with `ip netns exec` (egressd, the
        agent, netns_exec) its own /etc/NAME: iproute2 bind-mounts each file of
        /etc/netns/<ns>/ over /etc/ in the new mount ns. The machine's file is untouched.
        Written in place, so a process already running sees the change too (a bind mount
        holds the inode). Processes started before the first call see the machine's file."""
        if "/" in name or name in ("", ".", ".."):
            raise LabError(f"not a file name in /etc: {name!r}")
        if not (Path("/etc") / name).is_file():
            # A bind mount needs a target: ip netns exec would only warn and go on.
            raise LabError(f"/etc/{name} does not exist here; ip netns exec cannot replace it")
        path = self.netns_dir / name
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        path.chmod(0o644)
        return path

    def host_users(
        self, users: Mapping[str, int], subids: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        """Name uids in the host ns (newuidmap and `unshare --map-auto` look the caller up by
        name): /etc/passwd and /etc/group are the machine's plus `NAME:x:UID:UID` lines.
        /etc/subuid and /etc/subgid hold only `subids` ({NAME: ["START:COUNT", ...]}), for
        uids and gids alike, so the lab's ranges are exactly the test's."""
        passwd = Path("/etc/passwd").read_text(encoding="utf-8")
        group = Path("/etc/group").read_text(encoding="utf-8")
        for name, uid in users.items():
            passwd += f"{name}:x:{uid}:{uid}:egressd lab:/nonexistent:/usr/sbin/nologin\n"
            group += f"{name}:x:{uid}:\n"
        sub = "".join(f"{name}:{r}\n" for name, ranges in (subids or {}).items() for r in ranges)
        self.host_etc("passwd", passwd)
        self.host_etc("group", group)
        self.host_etc("subuid", sub)
        self.host_etc("subgid", sub)

    def netns_exec(
        self,
        ns: str,
        cmd: Sequence[str] | str,
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (list, or string split with shlex) as root in 'host'/'inet'."""
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return run(
            ["ip", "netns", "exec", self.ns(ns), *argv], check=check, input=input, timeout=timeout
        )

    def agent(
        self,
        *args: object,
        uid: int | None = None,
        gid: int | None = None,
        timeout: float = 30,
        input: str | None = None,
    ) -> dict[str, Any]:
        """Run agent.py COMMAND ARGS as `uid` (default 64123) in the host ns; returns its JSON."""
        uid = self.agent_uid if uid is None else uid
        gid = uid if gid is None else gid
        cmd = [
            "ip",
            "netns",
            "exec",
            self.host,
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            AGENT_PYTHON,
            "-I",
            "-c",
            AGENT_SOURCE,
            *map(str, args),
        ]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/"}
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd="/",
            check=False,
        )
        lines = proc.stdout.strip().splitlines()
        try:
            result: dict[str, Any] = json.loads(lines[-1])
        except (IndexError, ValueError):
            raise LabError(
                f"agent {args!r} exited {proc.returncode} without JSON:\n"
                f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
            ) from None
        return result

    def start_process(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        journald: bool = False,
        name: str | None = None,
        cwd: Path | None = None,
    ) -> Daemon:
        """Start any root process in the host ns with NOTIFY_SOCKET set (see start_daemon)."""
        self._counter += 1
        name = name or f"proc{self._counter}"
        base = self.tmpdir / f"{name}-{self._counter}"
        notify = NotifyListener(self.tmpdir / f"notify-{self._counter}.sock")
        full_env = dict(os.environ)
        pp = full_env.get("PYTHONPATH")
        full_env.update(
            PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{pp}" if pp else str(REPO_ROOT),
            PYTHONUNBUFFERED="1",
            NOTIFY_SOCKET=str(notify.path),
            # egressd's state (the boot lockdown's uid list) stays in the lab, never in the
            # machine's /var/lib/egressd.
            EGRESSD_STATE_DIR=str(self.tmpdir / "state"),
        )
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = v
        workdir = cwd or self.tmpdir
        if journald:
            prefix = self.journal.enter_prefix(str(workdir))
        else:
            prefix = ["ip", "netns", "exec", self.host]
        argv = [*prefix, *cmd]
        try:
            with open(f"{base}.out", "wb") as out, open(f"{base}.err", "wb") as err:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=full_env,
                    cwd=workdir,
                )
        except BaseException:
            notify.close()
            raise
        daemon = Daemon(name, argv, proc, Path(f"{base}.out"), Path(f"{base}.err"), notify)
        self._daemons.append(daemon)
        return daemon

    def start_daemon(
        self,
        argv: Sequence[str],
        env: Mapping[str, str | None] | None = None,
        journald: bool = False,
    ) -> Daemon:
        """`<test python> -m egressd ARGV...` as root in the host ns (repo root on
        PYTHONPATH). journald=True: inside the private-journald mount ns instead."""
        return self.start_process(
            [sys.executable, "-m", "egressd", *argv], env=env, journald=journald, name="egressd"
        )

    @property
    def journal(self) -> PrivateJournal:
        """The lab's private journald, started on first use."""
        if self._journal is None:
            self._journal = PrivateJournal(self)
        return self._journal

    def journal_query(self, *matches: str) -> list[dict[str, Any]]:
        """journalctl -D <private journal> -o json MATCH... (e.g. "EGRESSD_QNAME=x.test")."""
        return self.journal.query(*matches)

    def journal_wait(
        self, *matches: str, count: int = 1, timeout: float = 10
    ) -> list[dict[str, Any]]:
        """Poll journal_query until at least `count` entries match; returns what it has."""
        return self.journal.wait(*matches, count=count, timeout=timeout)

    def journal_exec(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        """Run a root command inside the journald mount ns + host net ns."""
        return self.journal.exec(cmd, check=check, input=input, timeout=timeout)

    def processes(self) -> Iterator[subprocess.Popen[bytes]]:
        yield from self._servers.values()
        for d in self._daemons:
            yield d.proc
        if self._journal is not None:
            for p in (self._journal.journald, self._journal.holder):
                if p is not None:
                    yield p

    def diagnostics(self) -> str:
        """Human-readable state dump for failed tests."""
        parts = []
        for d in self._daemons:
            parts.append(
                f"--- {d.name} pid {d.pid} rc={d.returncode} stderr ---\n{d.stderr_text()[-6000:]}"
            )
        for name in self._servers:
            err = tail(self.tmpdir / f"{name}.err", 2000)
            if err:
                parts.append(f"--- fake {name} server stderr ---\n{err}")
        if not self._closed:
            for cmd in ("iptables-save", "ip6tables-save", "ipset list"):
                r = self.netns_exec("host", cmd, check=False)
                parts.append(f"--- host: {cmd} ---\n{r.stdout[-6000:]}{r.stderr[-1000:]}")
        return "\n".join(parts)

    # ---- teardown

    def _kill_strays(self) -> None:
        inodes = set()
        for ns in self._namespaces:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(f"/run/netns/{ns}")
                inodes.add((st.st_dev, st.st_ino))
        strays = [pid for pid in _all_pids() if _net_ns_of(pid) in inodes]
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if strays:
            self.stray_pids.extend(strays)
            warnings.warn(
                f"lab killed leftover processes in its namespaces: {strays}",
                LabWarning,
                stacklevel=3,
            )
            # Not our children (reparented), so poll until they are gone/zombies.
            poll(lambda: not any(_net_ns_of(p) in inodes for p in strays), 5)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:  # keep going: every step must get its chance
                errors.append(f"{what}: {exc!r}")

        for d in self._daemons:
            attempt(f"stop {d.name}", d._cleanup)
        if self._journal is not None:
            attempt("stop journald", self._journal.close)
        for name, proc in self._servers.items():
            attempt(f"stop {name}", functools.partial(_terminate, proc, grace=2))
        # Anything still inside our namespaces was started by something we started
        # (a daemon's orphaned child, say); it would keep the namespace alive after
        # `ip netns del`, so kill it by pid.
        attempt("kill leftover processes", self._kill_strays)
        for ns in reversed(self._namespaces):
            attempt(f"delete netns {ns}", functools.partial(run, ["ip", "netns", "del", ns]))
        attempt("remove netns etc dir", lambda: shutil.rmtree(self.netns_dir, ignore_errors=True))
        if not _ETC_NETNS_PREEXISTED:
            attempt("remove /etc/netns", lambda: _rmdir_if_empty(_ETC_NETNS))
        if not self.keep_tmp:
            attempt("remove tmpdir", lambda: shutil.rmtree(self.tmpdir, ignore_errors=True))
        _open_labs.discard(self)
        if errors:
            raise LabError("lab cleanup problems:\n" + "\n".join(errors))


class Probe:
    """agent.py `probe` in a thread: one agent process connecting to `ips` on port 80
    every `interval` seconds for `seconds` (a connect() per probe, not a Python start)."""

    def __init__(self, lab: Lab, seconds: float, ips: list[str], interval: float = 0.02) -> None:
        self.result: dict[str, Any] = {}
        self._thread = threading.Thread(
            target=lambda: self.result.update(
                lab.agent(
                    "probe", seconds, 80, *ips, f"--interval={interval}", timeout=seconds + 30
                )
            ),
            daemon=True,
        )
        self._thread.start()

    def join(self) -> dict[str, Any]:
        self._thread.join(60)
        assert self.result.get("ok"), self.result
        return self.result


def _ready_or_dead(ready: Path, proc: subprocess.Popen[bytes]) -> bool:
    return ready.exists() or proc.poll() is not None


def _all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _net_ns_of(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")  # fails for zombies and vanished pids
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def netns_list() -> list[str]:
    """Names from `ip netns list` (root namespace view)."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]
