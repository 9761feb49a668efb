"""A Debian root file system booted under a real systemd, for test_systemd.py.

build(): build egressd's .deb on this machine (packaging/build-deb: the Debian tooling, and
PyPI for the vendored libraries), debootstrap a minbase bookworm root, and run the README's
set-up in it with chroot: packaging/install.sh --deb FILE --user agent --create-user
--no-start, which installs the package with apt-get (its dependencies from Debian's
mirror) and names the user in /etc/egressd/conf.d/50-install.toml. These are the only steps
that use the network; they start no egressd and touch no firewall (--no-start; no service
is started in a chroot). Only install.sh and the .deb are copied into the root, not the
checkout: what runs there is what the package installed.

Container: systemd-nspawn --boot of that root, joined to a lab network namespace, so the
container's systemd (PID 1 of its own PID namespace) starts the enabled egressd.service,
and every iptables/ipset change egressd makes lands in the lab's namespace.

Safety, for a shared machine whose PID 1 is not systemd:
- Every mount (debootstrap's, the chroot's /dev /proc /sys, nspawn's propagation dir) is
  made inside a private mount namespace (`unshare --mount`): it never shows in the
  machine's mount table and vanishes with its processes, even if the test is killed.
- nspawn runs with --register=no --keep-unit (no machined, no host systemd involved),
  --resolv-conf=off --timezone=off --link-journal=no (it changes nothing outside the
  root), and in its own cgroup (egd-<tag>, removed afterwards) when the host has no
  systemd, so the container's systemd only ever sees that subtree.
- Processes are ended by pid only: nspawn (SIGTERM: orderly poweroff of the container),
  then SIGKILL to it and the container's PID 1 after a timeout.
- Before the root is deleted, no mount may be left below it (else it is not deleted).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab import AGENT_SOURCE, REPO_ROOT, LabError, poll, tail

MIRROR = os.environ.get("EGD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# What the README's "fresh Debian 12" has that a minbase root lacks, and nothing more:
# install.sh must bring everything egressd needs itself.
INCLUDE = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "ca-certificates",
    "iproute2",
    "util-linux",
)
INSTALL_DIR = "/root/egressd-install"  # install.sh and the .deb, in the root
AGENT_USER = "agent"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NSPAWN_RUN = Path("/run/systemd/nspawn")  # nspawn's lock/propagation dir on the host side
BUILD_TIMEOUT = 900.0
# Environment passed through to the build (a proxy the host needs to reach the mirror).
PASS_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


class RootfsError(RuntimeError):
    pass


# --------------------------------------------------------------------------- processes


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def _children(pid: int) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _ppid(int(e)) == pid]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child we started and everything below it, each by pid."""
    pids = [proc.pid, *_descendants(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _run_logged(
    argv: Sequence[str], log: Path, *, timeout: float, what: str, env: dict[str, str] | None = None
) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {shlex.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            raise RootfsError(
                f"{what} took longer than {timeout:.0f}s; log {log}:\n{tail(log)}"
            ) from None
        except BaseException:
            _kill_tree(proc)
            raise
    if rc != 0:
        raise RootfsError(f"{what} failed (exit {rc}); log {log}:\n{tail(log)}")


# --------------------------------------------------------------------------- mounts


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` in this (the machine's) mount namespace."""
    base = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            mnt = _unescape(line.split()[4])
            if mnt == base or mnt.startswith(base + "/"):
                found.append(mnt)
    return found


def remove_tree(parent: Path) -> None:
    """Delete the build dir, but never across a mount point (a bind of /dev, say)."""
    if not parent.exists():
        return
    left = mounts_under(parent)
    if left:
        raise RootfsError(f"not deleting {parent}: mounts below it: {left}")
    shutil.rmtree(parent)


# --------------------------------------------------------------------------- build


def _private_mounts(script: str) -> list[str]:
    """argv: run a shell script in a new, private mount namespace (its mounts die with it)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-euc", script]


def _host_resolv_conf() -> str:
    try:
        return Path("/etc/resolv.conf").read_text(encoding="utf-8")
    except OSError:
        return ""


def build_deb(out: Path, log: Path, *, version_suffix: str = "") -> Path:
    """packaging/build-deb into `out` (on this machine: no service, no firewall); the .deb."""
    argv = [str(REPO_ROOT / "packaging/build-deb"), "--out", str(out)]
    if version_suffix:
        argv += ["--version-suffix", version_suffix]
    env = {k: v for k, v in os.environ.items() if k in PASS_ENV or k.startswith("PIP_")}
    env.update(PATH=ROOT_PATH, LANG="C.UTF-8", HOME=os.environ.get("HOME", "/root"))
    _run_logged(argv, log, timeout=BUILD_TIMEOUT, what="packaging/build-deb", env=env)
    debs = sorted(out.glob("egressd_*_all.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise RootfsError(f"packaging/build-deb wrote no .deb into {out}; log {log}")
    return debs[-1]


def copy_deb(root: Path, deb: Path) -> str:
    """Put `deb` into the root; its path there."""
    inside = root / INSTALL_DIR.lstrip("/")
    inside.mkdir(parents=True, exist_ok=True)
    shutil.copy2(deb, inside / deb.name)
    return f"{INSTALL_DIR}/{deb.name}"


def build(root: Path, log: Path) -> dict[str, float]:
    """Build the root (see the module docstring). Returns seconds per step."""
    times: dict[str, float] = {}
    t0 = time.monotonic()
    q = shlex.quote
    deb = build_deb(root.parent / "debs", log)
    times["build-deb"] = time.monotonic() - t0

    t0 = time.monotonic()
    debootstrap = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(INCLUDE)}",
        SUITE,
        str(root),
        MIRROR,
    ]
    try:
        _run_logged(
            _private_mounts(shlex.join(debootstrap)),
            log,
            timeout=BUILD_TIMEOUT,
            what=f"debootstrap {SUITE} from {MIRROR}",
        )
    except RootfsError as err:
        raise RootfsError(
            f"could not build the Debian root: is the mirror {MIRROR} "
            f"reachable? (EGD_DEBIAN_MIRROR overrides it)\n{err}"
        ) from None
    times["debootstrap"] = time.monotonic() - t0

    t1 = time.monotonic()
    deb_inside = copy_deb(root, deb)
    shutil.copy2(REPO_ROOT / "packaging/install.sh", root / INSTALL_DIR.lstrip("/") / "install.sh")
    etc = root / "etc"
    (etc / "resolv.conf").unlink(missing_ok=True)  # may be a dangling symlink
    (etc / "resolv.conf").write_text(_host_resolv_conf(), encoding="utf-8")
    env = [
        f"PATH={ROOT_PATH}",
        "LANG=C.UTF-8",
        "HOME=/root",
        "DEBIAN_FRONTEND=noninteractive",
        *(f"{k}={os.environ[k]}" for k in PASS_ENV if k in os.environ),
    ]
    inside = (
        f"{INSTALL_DIR}/install.sh --deb {q(deb_inside)} --user {AGENT_USER} "
        f"--create-user --no-start"
    )
    script = f"""
        mount --rbind /dev {q(str(root / "dev"))}
        mount -t proc proc {q(str(root / "proc"))}
        mount -t sysfs sysfs {q(str(root / "sys"))}
        exec env -i {shlex.join(env)} chroot {q(str(root))} /bin/sh -euc {q(inside)}
    """
    try:
        _run_logged(
            _private_mounts(script),
            log,
            timeout=BUILD_TIMEOUT,
            what="packaging/install.sh --no-start in the chroot",
            env={"PATH": ROOT_PATH, "LANG": "C.UTF-8"},
        )
    except RootfsError as err:
        raise RootfsError(
            f"the README's install step failed in a fresh Debian root (needs {MIRROR})\n{err}"
        ) from None
    times["install.sh"] = time.monotonic() - t1
    return times


def prepare_for_lab(root: Path, upstream: str, hostname: str) -> None:
    """Point the root's resolver (and so egressd's default upstream) at the lab's DNS."""
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text(f"nameserver {upstream}\noptions timeout:2 attempts:2\n", encoding="utf-8")
    (root / "etc/hostname").write_text(f"{hostname}\n", encoding="utf-8")


# --------------------------------------------------------------------------- container

_open: weakref.WeakSet[Container] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:  # last resort if a test run is interrupted
    for ct in list(_open):
        with contextlib.suppress(Exception):
            ct.close()


def _cgroup_dirs(tag: str) -> list[Path]:
    """egd-<tag> below our own cgroup in the v2 hierarchy and the v1 name=systemd one."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="utf-8") as fh:
        for line in fh:
            _, ctrl, path = line.rstrip("\n").split(":", 2)
            own[ctrl] = path
    dirs: list[Path] = []
    seen: set[str] = set()
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fstype, _source, superopts = right.split()[:3]
            mnt = _unescape(left.split()[4])
            if fstype == "cgroup2":
                key = ""
            elif fstype == "cgroup" and "name=systemd" in superopts.split(","):
                key = "name=systemd"
            else:
                continue
            if key in seen or key not in own:
                continue
            seen.add(key)
            dirs.append(Path(mnt) / own[key].lstrip("/") / f"egd-{tag}")
    return dirs


class Container:
    """One booted container. close() is idempotent and ends everything it started."""

    def __init__(
        self,
        root: Path,
        netns: str,
        log: Path,
        *,
        boot_timeout: float = 120,
        overlay: Path | None = None,
    ) -> None:
        """Boot `root`. With `overlay` (a directory), boot an overlayfs of `root` (read-only)
        and `overlay`/upper instead, so a test can change files for one boot (put them in
        `overlay`/upper first) without touching `root` or a container running from it; the
        mount lives in the container's private mount namespace only."""
        self.root = root
        self.overlay = overlay
        self.netns = netns
        self.log = log
        tag = secrets.token_hex(4)
        self.machine = f"egd-{tag}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int = 0
        self._pid1_start: int | None = None
        self._closed = False
        self._created_dirs: list[Path] = []
        # A host with systemd as PID 1 manages cgroups itself: leave them alone there.
        self._cgroups = [] if Path("/run/systemd/system").exists() else _cgroup_dirs(tag)
        _open.add(self)
        try:
            self._boot(boot_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    # ---- boot

    def _boot(self, timeout: float) -> None:
        for d in (NSPAWN_RUN.parent, NSPAWN_RUN):
            if not d.exists():
                d.mkdir(mode=0o755)
                self._created_dirs.append(d)
        for cg in self._cgroups:
            cg.mkdir()
        directory, mount_overlay = self.root, ""
        if self.overlay is not None:
            upper, work = self.overlay / "upper", self.overlay / "work"
            directory = self.overlay / "merged"
            for d in (upper, work, directory):
                d.mkdir(exist_ok=True)
            opts = f"lowerdir={self.root},upperdir={upper},workdir={work}"
            mount_overlay = (
                f"mount -t overlay -o {shlex.quote(opts)} egd-overlay "
                f"{shlex.quote(str(directory))} && "
            )
        nspawn = [
            "systemd-nspawn",
            f"--directory={directory}",
            "--boot",
            "--register=no",
            "--keep-unit",
            f"--machine={self.machine}",
            f"--network-namespace-path=/run/netns/{self.netns}",
            # egressd needs it for iptables/ipset; nspawn grants it on its own only with
            # --private-network.
            "--capability=CAP_NET_ADMIN",
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
            "--console=pipe",
        ]
        inner = (
            f"mount -t tmpfs -o mode=0755,size=4m egd-nspawn-run {NSPAWN_RUN} && "
            f"{mount_overlay}exec {shlex.join(nspawn)}"
        )
        outer = "".join(
            f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))} && " for cg in self._cgroups
        )
        outer += f"exec unshare --mount --propagation private sh -c {shlex.quote(inner)}"
        env = {"PATH": ROOT_PATH, "LANG": "C.UTF-8"}
        with open(self.log, "ab") as out:
            # sh, unshare and sh exec: self.proc.pid is systemd-nspawn's pid.
            self.proc = subprocess.Popen(
                ["sh", "-c", outer],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        proc = self.proc

        def init_pid() -> int | None:
            if proc.poll() is not None:
                raise RootfsError(f"systemd-nspawn exited {proc.returncode}:\n{tail(self.log)}")
            for child in _children(proc.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return child
            return None

        pid1 = poll(init_pid, 30)
        if not pid1:
            raise RootfsError(f"the container's systemd did not start:\n{tail(self.log)}")
        self.pid1 = pid1
        self._pid1_start = _start_time(pid1)

        def booted() -> str | None:
            r = self.exec(["systemctl", "is-system-running"], check=False, timeout=10)
            state = r.stdout.strip()
            return state if state in ("running", "degraded") else None

        if not poll(booted, timeout, interval=0.5):
            state = self.exec(["systemctl", "is-system-running"], check=False).stdout
            jobs = self.exec(["systemctl", "list-jobs", "--no-pager"], check=False).stdout
            raise RootfsError(
                f"the container did not finish booting in {timeout}s "
                f"(state {state.strip()!r}); jobs:\n{jobs}\n{tail(self.log)}"
            )

    # ---- running things inside

    def exec(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as root in all of the container's namespaces, clean environment."""
        argv = [
            "nsenter",
            f"--target={self.pid1}",
            "--all",
            "--",
            "env",
            "-i",
            f"PATH={ROOT_PATH}",
            "LANG=C.UTF-8",
            "HOME=/root",
            "SYSTEMD_PAGER=",
            "SYSTEMD_COLORS=0",
            *cmd,
        ]
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
        )
        if check and proc.returncode != 0:
            raise LabError(
                f"in the container ({proc.returncode}): {shlex.join(cmd)}\n"
                f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
            )
        return proc

    def agent(self, *args: object, user: str = AGENT_USER, timeout: float = 30) -> dict[str, Any]:
        """tests/integration/agent.py COMMAND ARGS as `user` inside the container (no
        capabilities at all for a non-root user); returns its JSON."""
        cmd: list[str] = []
        if user != "root":
            cmd = [
                "setpriv",
                f"--reuid={user}",
                f"--regid={user}",
                "--init-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ]
        cmd += ["/usr/bin/python3", "-I", "-c", AGENT_SOURCE, *map(str, args)]
        r = self.exec(cmd, check=False, timeout=timeout)
        try:
            result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise LabError(
                f"agent {args!r} as {user} exited {r.returncode} without JSON:\n"
                f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}"
            ) from None
        return result

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """systemctl show UNIT -p PROP... as a dict."""
        args = [a for p in props for a in ("-p", p)]
        out = self.exec(["systemctl", "show", unit, *args]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches: str, unit: str | None = "egressd") -> list[dict[str, Any]]:
        """journalctl -b [-u UNIT] -o json MATCH... (this boot, oldest first)."""
        sel = ["-u", unit] if unit else []
        r = self.exec(
            ["journalctl", "-b", *sel, "-o", "json", "--all", "--no-pager", *matches], check=False
        )
        return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]

    def journal_wait(
        self, *matches: str, count: int = 1, timeout: float = 10, unit: str | None = "egressd"
    ) -> list[dict[str, Any]]:
        found = poll(
            lambda: (lambda j: j if len(j) >= count else None)(self.journal(*matches, unit=unit)),
            timeout,
            interval=0.2,
        )
        return found or self.journal(*matches, unit=unit)

    def diagnostics(self) -> str:
        if self._closed or not self.pid1:
            return f"--- nspawn log ---\n{tail(self.log)}"
        parts = [f"--- nspawn log ---\n{tail(self.log)}"]
        for cmd in (
            ["systemctl", "status", "egressd", "--no-pager", "-l"],
            ["systemctl", "--failed", "--no-pager"],
            ["journalctl", "-b", "-u", "egressd", "--no-pager", "-n", "80"],
            ["iptables-save"],
            ["ipset", "list", "-t"],
        ):
            r = self.exec(cmd, check=False)
            parts.append(
                f"--- container: {shlex.join(cmd)} ---\n{r.stdout[-5000:]}{r.stderr[-1000:]}"
            )
        return "\n".join(parts)

    # ---- teardown

    def _pid1_alive(self) -> bool:
        if not self.pid1 or self._pid1_start is None:
            return False
        return _start_time(self.pid1) == self._pid1_start

    def close(self, poweroff_timeout: float = 30) -> None:
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # nspawn answers SIGTERM with an orderly poweroff (SIGRTMIN+3 to the container's
            # systemd) and exits when the container is down.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(poweroff_timeout)
            except subprocess.TimeoutExpired:
                errors.append(f"container did not power off in {poweroff_timeout}s; killed")
                for pid in (proc.pid, self.pid1):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait(10)
        # Killing PID 1 of the container's PID namespace ends everything in it.
        if self._pid1_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
            if not poll(lambda: not self._pid1_alive(), 10):
                errors.append(f"container PID 1 ({self.pid1}) survived SIGKILL")
        for cg in self._cgroups:
            if not cg.exists():
                continue
            subdirs = sorted(
                (p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            )
            for d in [*subdirs, cg]:
                # A cgroup is removable once its last process is reaped.
                if not poll(lambda d=d: _try_rmdir(d), 10):
                    errors.append(f"could not remove cgroup {d}")
        for d in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty (somebody else may use it now)
        _open.discard(self)
        if errors:
            raise RootfsError("container cleanup problems:\n" + "\n".join(errors))


def _try_rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
