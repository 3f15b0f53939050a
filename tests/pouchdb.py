"""pouchdb-server, the CouchDB-compatible server of the tests, the demo and the benchmarks.

One process per use, started in its own working directory with an admin configured (no admin
party) and the CouchDB secret CHT's credential vault needs (spec couchdb-test-server.md §5.2).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ADMIN_USER = "admin"
ADMIN_PASSWORD = "secret"
COUCH_SECRET = "test-couch-secret-0123456789"
HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}

ROOT = Path(__file__).resolve().parent.parent
POUCHDB_BIN = ROOT / "node_modules" / ".bin" / "pouchdb-server"


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if the process that started it dies (a killed test run
    would otherwise leave it running)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PouchServer:
    """One pouchdb-server process (see ../shared/spec/couchdb-test-server.md §5.2)."""

    def __init__(self, workdir: Path, *, in_memory: bool = True) -> None:
        self.in_memory = in_memory
        self.workdir = workdir
        self.log_path = workdir / "pouchdb.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.uuid = ""

    def start(self, port: int | None = None) -> None:
        """Start the server (on `port`, e.g. to restart it where clients expect it)."""
        node = shutil.which("node")
        if node is None or not POUCHDB_BIN.exists():
            raise RuntimeError("pouchdb-server is not installed: run scripts/bootstrap")
        for _ in range(5):
            self.uuid = uuid.uuid4().hex
            config = {
                "couchdb": {"uuid": self.uuid},
                "log": {"file": str(self.workdir / "pouchdb.log")},
                "admins": {ADMIN_USER: ADMIN_PASSWORD},
                "couch_httpd_auth": {"secret": COUCH_SECRET},
            }
            (self.workdir / "config.json").write_text(json.dumps(config))
            self.port = port or free_port()
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [
                        node,
                        str(POUCHDB_BIN),
                        "--port",
                        str(self.port),
                        *self._storage(),
                        "--no-color",
                    ],
                    cwd=self.workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,  # started before any thread
                )
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"pouchdb-server did not start:\n{self.tail()}")

    def _storage(self) -> list[str]:
        return ["--in-memory"] if self.in_memory else ["--dir", str(self.workdir / "data")]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False  # e.g. "port already in use" exits 0
            with contextlib.suppress(OSError, ValueError):
                request = urllib.request.Request(self.url + "/", headers=HEADERS)
                with urllib.request.urlopen(request, timeout=1) as resp:
                    if json.loads(resp.read()).get("uuid") == self.uuid:
                        return True
            time.sleep(0.05)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
