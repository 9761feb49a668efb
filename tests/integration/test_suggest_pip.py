"""`egressd suggest` on a real journal (issue 8): the agent's `pip install` of a package
whose files live on a CDN name that is not listed fails; `suggest` turns the journal's
blocked-query record into an allowlist diff, `--write` appends it to a drop-in the config
lists, a reload applies it, and the same `pip install` works.

The package index is a fake one in the lab's internet namespace: a PEP 503 simple index at
pypi.lab.test whose file link points at files.cdn-lab.test (another address, same server),
serving a small pure-Python wheel built here. pip runs as the agent uid (64123) with the
system python and a copy of the venv's pip (the agent may not read the venv or the lab's
root-only temp dir).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pip
import pytest
from lab import AGENT_PYTHON, Lab, LabError, poll, run
from test_egressd import AGENT, start, write_config

pytestmark = pytest.mark.netns

INDEX = "pypi.lab.test"
CDN = "files.cdn-lab.test"
INDEX_IP = "203.0.113.80"
CDN_IP = "203.0.113.81"
HTTP_PORT = 8000
PKG = "labpkg"
WHEEL = f"{PKG}-1.0-py3-none-any.whl"
RELOADED = "31a9cbc6ae2445239609e229566cf0ad"  # events.Reloaded.MESSAGE_ID

# A static HTTP server (the index and the files) that logs each request's Host header,
# path and the address it was sent to as JSON lines, and says when it listens.
HTTP_SERVER = r"""
import functools, http.server, json, sys
root, log, ready, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out = open(log, "a", buffering=1)
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        pass
    def send_response(self, code, message=None):
        out.write(json.dumps({"host": self.headers.get("Host", "").split(":")[0],
                              "path": self.path, "dst": self.connection.getsockname()[0],
                              "code": code}) + "\n")
        super().send_response(code, message)
srv = http.server.ThreadingHTTPServer(("0.0.0.0", port),
                                      functools.partial(H, directory=root))
open(ready, "w").close()
srv.serve_forever()
"""


def build_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel: the module, METADATA, WHEEL and a RECORD with hashes."""
    dist = f"{PKG}-1.0.dist-info"
    files = {
        f"{PKG}/__init__.py": b'GREETING = "installed through the CDN"\n',
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PKG}\nVersion: 1.0\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: egressd-test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = ""
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{name},sha256={digest},{len(data)}\n"
    record += f"{dist}/RECORD,,\n"
    path = directory / WHEEL
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", record)
    return path


def build_index(root: Path) -> None:
    """PEP 503: /simple/labpkg/ links to the wheel on the CDN name, with its sha256."""
    (root / "packages").mkdir(parents=True)
    wheel = build_wheel(root / "packages")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    url = f"http://{CDN}:{HTTP_PORT}/packages/{WHEEL}#sha256={sha}"
    (root / "simple" / PKG).mkdir(parents=True)
    (root / "simple" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{PKG}/">{PKG}</a></body></html>\n'
    )
    (root / "simple" / PKG / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{url}">{WHEEL}</a></body></html>\n'
    )


@contextlib.contextmanager
def http_server(lab: Lab) -> Iterator[Path]:
    """The index and CDN server in the inet ns; yields its request log. Stopped by pid."""
    root = lab.tmpdir / "www"
    build_index(root)
    log = lab.tmpdir / "http.log"
    ready = lab.tmpdir / "http.ready"
    log.touch()
    err = open(lab.tmpdir / "http.err", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.inet,
            sys.executable,
            "-c",
            HTTP_SERVER,
            str(root),
            str(log),
            str(ready),
            str(HTTP_PORT),
        ],
        stdin=subprocess.DEVNULL,
        stdout=err,
        stderr=err,
    )
    try:
        if not poll(lambda: ready.exists() or proc.poll() is not None, 15) or proc.poll():
            raise LabError(f"http server did not start: {(lab.tmpdir / 'http.err').read_text()}")
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        err.close()


def requests(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture
def agent_dir() -> Iterator[Path]:
    """A directory the agent can read (a copy of pip) and write (the --target)."""
    top = Path(tempfile.mkdtemp(prefix="egd-suggest-"))
    try:
        top.chmod(0o755)
        shutil.copytree(
            Path(pip.__file__).parent, top / "pip", ignore=shutil.ignore_patterns("__pycache__")
        )
        (top / "target").mkdir()
        os.chown(top / "target", AGENT, AGENT)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def pip_install(lab: Lab, tools: Path) -> subprocess.CompletedProcess[str]:
    """The agent's `pip install labpkg` from the lab's index (plain HTTP, no retries)."""
    target = tools / "target"
    for child in target.iterdir():
        shutil.rmtree(child)
    cmd = [
        "ip",
        "netns",
        "exec",
        lab.host,
        "setpriv",
        f"--reuid={AGENT}",
        f"--regid={AGENT}",
        "--clear-groups",
        AGENT_PYTHON,
        "-I",
        str(tools / "pip"),
        "install",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        "--retries=0",
        "--timeout=5",
        f"--index-url=http://{INDEX}:{HTTP_PORT}/simple/",
        f"--trusted-host={INDEX}",
        f"--trusted-host={CDN}",
        f"--target={target}",
        PKG,
    ]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/"}
    return run(cmd, check=False, env=env, timeout=120)


def suggest(lab: Lab, *argv: str) -> subprocess.CompletedProcess[str]:
    """`egressd suggest ...` as root inside the lab's private journald mount ns, so plain
    journalctl reads the journal egressd wrote."""
    prog = [sys.executable, "-m", "egressd", "suggest"]
    return lab.journal_exec([*prog, *argv], check=False, timeout=60)


def test_suggest_turns_a_failing_pip_install_into_a_working_one(lab: Lab, agent_dir: Path) -> None:
    lab.dns.set({f"{INDEX}.": [["A", INDEX_IP, 300]], f"{CDN}.": [["A", CDN_IP, 300]]})
    config = write_config(lab, [INDEX], daemon=f'control = "{lab.tmpdir}/control"')
    dropin = lab.tmpdir / "suggested.txt"
    dropin.write_text("# egressd suggest --write goes here\n", encoding="utf-8")
    text = config.read_text(encoding="utf-8")
    config.write_text(
        text.replace('allowlists = ["egressd.toml.allow.txt"]',
                     'allowlists = ["egressd.toml.allow.txt", "suggested.txt"]'),
        encoding="utf-8",
    )  # fmt: skip
    assert "suggested.txt" in config.read_text()
    d = start(lab, config, journald=True)

    with http_server(lab) as http_log:
        # Negative: the index answers, the file download fails on the unlisted CDN name.
        failed = pip_install(lab, agent_dir)
        assert failed.returncode != 0, failed.stdout + failed.stderr
        print("--- pip install, before ---\n" + failed.stdout + failed.stderr)
        assert not (agent_dir / "target" / PKG).exists()
        got = requests(http_log)
        assert {(r["host"], r["path"]) for r in got} == {(INDEX, f"/simple/{PKG}/")}, got
        assert lab.journal_wait(f"EGRESSD_QNAME={CDN}", "EGRESSD_VERDICT=block")
        # The CDN name never reached the upstream DNS; the index name did (the twin).
        assert lab.dns.queries(qname=f"{CDN}.") == []
        assert lab.dns.queries(qname=f"{INDEX}.")

        shown = suggest(lab, "--config", str(config), "--since", "10m")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "\n# cdn-lab.test: 1 name, " in shown.stdout, shown.stdout
        assert f"\n+{CDN}  # " in shown.stdout and "profile agent" in shown.stdout
        assert INDEX not in shown.stdout  # allowed: never blocked, never suggested
        js = suggest(lab, "--config", str(config), "--since", "10m", "--json")
        assert json.loads(js.stdout)["lines"] == [CDN], js.stdout
        print("--- egressd suggest --json ---\n" + js.stdout)

        written = suggest(lab, "--config", str(config), "--since", "10m", "--write", str(dropin))
        assert written.returncode == 0, written.stdout + written.stderr
        assert f"appended 1 line(s) to {dropin}; run `egressd reload`" in written.stdout
        assert written.stderr == "", written.stderr  # the drop-in is one the config lists
        print("--- egressd suggest --write output ---\n" + written.stdout)
        print("--- the drop-in ---\n" + dropin.read_text())
        assert dropin.read_text().startswith("# egressd suggest --write goes here\n\n# added")
        # Suggesting never resolved the blocked name.
        assert lab.dns.queries(qname=f"{CDN}.") == []

        ready = sum("READY=1" in n for n in d.notifications())
        d.signal(signal.SIGHUP)
        assert lab.journal_wait(f"MESSAGE_ID={RELOADED}"), "no Reloaded record"
        assert poll(lambda: sum("READY=1" in n for n in d.notifications()) > ready, 15)

        # Positive: the same pip install now downloads the wheel from the CDN name.
        works = pip_install(lab, agent_dir)
        assert works.returncode == 0, works.stdout + works.stderr
        assert (agent_dir / "target" / PKG / "__init__.py").exists()
        assert (CDN, f"/packages/{WHEEL}", CDN_IP) in {
            (r["host"], r["path"], r["dst"]) for r in requests(http_log)
        }
        assert lab.dns.queries(qname=f"{CDN}.")  # resolved now that a line allows it

        # Nothing is left to suggest: the record is from before the reload.
        again = suggest(lab, "--config", str(config), "--since", "10m")
        assert again.returncode == 1, again.stdout + again.stderr
        assert f"{CDN}: already allowed for profile agent by {dropin}:" in again.stdout, (
            again.stdout
        )
        print("--- egressd suggest, after the reload ---\n" + again.stdout)
