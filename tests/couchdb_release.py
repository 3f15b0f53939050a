"""Real Apache CouchDB 3 nodes for the tests, started from a built release.

Set `CHT_RAPIDPRO_TEST_COUCHDB_RELEASE=<release dir>` (a `make release` output such as
`rel/couchdb`; how to build one: ../shared/spec/couchdb-real.md) and the test fixtures start:

- a **single node** (`[couchdb] single_node = true`), the suite's server instead of
  pouchdb-server;
- a **3-node cluster** (n=3, q=2), only when a test asks for it, joined as the spec says (same
  cookie, uuid and secret; `PUT /_node/_local/_nodes/<name>`; `_users` and `_replicator`
  created once every node lists all three in `_membership`).

Each node has its own temporary directory (`vm.args`, `local.ini`, data, log), a free HTTP port
and an Erlang node name unique to this test session, so several sessions can run side by side
and share the machine's `epmd` (the first node starts it on 127.0.0.1:4369; it outlives the
nodes, as CouchDB's own start script leaves it). Nodes die with the test process
(PR_SET_PDEATHSIG) and their directories are removed when they are stopped for good; a
directory left behind by a killed test run is removed by the next run.

Every node has admin `admin`/`secret` (pouchdb.ADMIN_USER/ADMIN_PASSWORD) and the tests'
`[couch_httpd_auth] secret` (pouchdb.COUCH_SECRET, where CHT writes it; the vault key is
derived from it). CouchDB's account lockout is left at its defaults (`[chttpd_auth_lockout]`
mode enforce, 5 failed logins of one user from one address lock that user for 5 minutes), so
tests that provoke failed logins must do so with a user of their own, never `admin`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pouchdb import ADMIN_PASSWORD, ADMIN_USER, COUCH_SECRET, free_port

RELEASE_ENV = "CHT_RAPIDPRO_TEST_COUCHDB_RELEASE"
#: CouchDB's default `[chttpd_auth_lockout] threshold`: this many failed logins lock a user.
LOCKOUT_THRESHOLD = 5
#: The answer CouchDB 3.4 gives a locked user (HTTP 403), whatever the password.
LOCKOUT_REASON = "Account is temporarily locked due to multiple authentication failures"

_DIR_PREFIX = "cht-rapidpro-couchdb-"
_HOST = "127.0.0.1"
T = TypeVar("T")


class CouchReleaseError(RuntimeError):
    """A node did not start, stop or join as expected (the message has its log's tail)."""


def release_from_env() -> Path | None:
    """The release directory named by the environment, None if unset; checked for bin/couchdb."""
    value = os.environ.get(RELEASE_ENV, "").strip()
    if not value:
        return None
    release = Path(value).expanduser().resolve()
    if not (release / "bin" / "couchdb").is_file():
        raise CouchReleaseError(
            f"{RELEASE_ENV}={value}: no bin/couchdb there; it must name a CouchDB release "
            "directory (see ../shared/spec/couchdb-real.md)"
        )
    return release


# -- processes that die with the test process ------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn` that has the child SIGKILLed when its parent thread dies.

    The libc handle is looked up before the fork (no dlopen between fork and exec); a child
    whose parent died before prctl took effect exits at once.
    """

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:
                os._exit(1)

    return preexec


class _Spawner:
    """Starts processes from one long-lived thread.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process. A node
    started from a short-lived thread (`asyncio.to_thread`, an executor) would be killed when
    that thread exits; forking from this thread, which lives as long as the process, ties the
    nodes to the test process itself, whichever thread asks for the start.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[tuple[bool, Any]]]] = (
            queue.Queue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _serve(self) -> None:
        while True:
            job, reply = self._jobs.get()
            try:
                reply.put((True, job()))
            except BaseException as exc:
                reply.put((False, exc))

    def run(self, job: Callable[[], T]) -> T:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="couchdb-spawner", daemon=True
                )
                self._thread.start()
        reply: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._jobs.put((job, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        result: T = value
        return result


_SPAWNER = _Spawner()


# -- temporary directories ---------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (to tell it from a later process with the same id)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_mark() -> str:
    return f"{os.getpid()} {_process_start(os.getpid())}"


def make_session_dir() -> Path:
    """A fresh directory for this session's nodes; removes those of dead earlier sessions."""
    base = Path(tempfile.gettempdir())
    for stale in base.glob(_DIR_PREFIX + "*"):
        with contextlib.suppress(OSError, ValueError):
            pid_text, started = (stale / "owner").read_text().split()
            if _process_start(int(pid_text)) != started:
                shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX))
    (path / "owner").write_text(_owner_mark())
    return path


# -- HTTP ----------------------------------------------------------------------------------------


def _auth_header(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Accept": "application/json"}


def http(
    url: str,
    method: str = "GET",
    body: Any = None,
    *,
    user: str | None = None,
    password: str | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """One blocking JSON request (for fixtures); returns (status, decoded body or text)."""
    headers = _auth_header(user, password or "") if user else {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(probe: Callable[[], T | None], *, within: float, every: float = 0.1, what: str) -> T:
    """Poll `probe` until it returns something other than None (or fail after `within` s)."""
    deadline = time.monotonic() + within
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (OSError, ValueError) as exc:  # not listening yet, reset, bad JSON
            last_error, value = exc, None
        if value is not None:
            return value
        time.sleep(every)
    raise CouchReleaseError(f"timed out after {within:.0f} s waiting for {what}: {last_error}")


# -- one node ----------------------------------------------------------------------------------


class CouchNode:
    """One CouchDB node: its own directory, HTTP port and Erlang node name.

    `start()` can be called again after `stop()`: the node comes back with the same name, port
    and data (a restart), as a real node after a crash or a reboot does.
    """

    def __init__(
        self,
        release: Path,
        workdir: Path,
        short_name: str,
        *,
        cookie: str,
        uuid: str,
        cluster: bool,
        user: str = ADMIN_USER,
        password: str = ADMIN_PASSWORD,
        log_level: str = "warning",
    ) -> None:
        self.log_level = log_level  # "notice" logs every request (the benchmarks count them)
        self.release = release
        self.workdir = workdir
        self.name = f"{short_name}@{_HOST}"
        self.cookie = cookie
        self.uuid = uuid
        self.cluster = cluster
        self.user = user
        self.password = password
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "couchdb.log"

    @property
    def url(self) -> str:
        """Base URL, without credentials."""
        return f"http://{_HOST}:{self.port}"

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """An admin request to this node (blocking)."""
        return http(self.url + path, method, body, user=self.user, password=self.password)

    # -- files --------------------------------------------------------------------------------

    def _write_config(self) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (self.workdir / "vm.args").write_text(
            "\n".join(
                [
                    f"-name {self.name}",
                    f"-setcookie {self.cookie}",
                    "-kernel inet_dist_use_interface {127,0,0,1}",
                    "-kernel error_logger silent",
                    "-sasl sasl_error_logger false",
                    "-kernel prevent_overlapping_partitions false",
                    # No busy-waiting schedulers: several VMs share a small machine.
                    "+sbwt none",
                    "+sbwtdcpu none",
                    "+sbwtdio none",
                    "+Bd -noinput",
                    "",
                ]
            )
        )
        sections: dict[str, dict[str, str]] = {
            "couchdb": {
                "single_node": "false" if self.cluster else "true",
                "uuid": self.uuid,
                "database_dir": str(data),
                "view_index_dir": str(data),
            },
            "smoosh": {"state_dir": str(data)},
            "chttpd": {"port": str(self.port), "bind_address": _HOST},
            "admins": {self.user: self.password},
            "couch_httpd_auth": {"secret": COUCH_SECRET},
            "log": {"level": self.log_level},
        }
        if self.cluster:
            sections["cluster"] = {"n": "3", "q": "2"}
        ini = self.workdir / "local.ini"
        if ini.exists():
            # A restart: CouchDB rewrote the file (hashed the admin password); keep it.
            return
        ini.write_text(
            "".join(
                f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"
                for section, values in sections.items()
            )
        )

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, *, timeout: float = 60.0) -> None:
        """Start the node and wait until it answers as itself (a fresh port on first start)."""
        if self.alive():
            return
        attempts = 1 if self.port else 3  # a restart must keep its port
        for _ in range(attempts):
            if not self.port or attempts > 1:
                self.port = free_port()
            self._write_config()
            self._spawn()
            if self._wait_ready(timeout):
                return
            self.stop(graceful=False)
            if "eaddrinuse" not in self.tail().lower():
                break
            (self.workdir / "local.ini").unlink(missing_ok=True)  # the port is in it
        raise CouchReleaseError(f"CouchDB node {self.name} did not start:\n{self.tail()}")

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ERL_", "COUCHDB_"))}
        env.update(
            COUCHDB_ARGS_FILE=str(self.workdir / "vm.args"),
            COUCHDB_INI_FILES=f"{self.release}/etc/default.ini {self.workdir}/local.ini",
            ERL_EPMD_ADDRESS=_HOST,
        )
        argv = [str(self.release / "bin" / "couchdb")]
        parent = os.getpid()

        def popen() -> subprocess.Popen[bytes]:
            with self.log_path.open("ab") as log:
                return subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: one kill stops it all
                    preexec_fn=_pdeathsig_preexec(parent),
                )

        self.proc = _SPAWNER.run(popen)

    def _wait_ready(self, timeout: float) -> bool:
        """Ready when `_up` answers and `_node/_local` names this node (not another server)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            with contextlib.suppress(OSError, ValueError):
                status, body = http(self.url + "/_up", timeout=2)
                if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
                    status, body = self.request("GET", "/_node/_local")
                    if status == 200 and body.get("name") == self.name:
                        return True
            time.sleep(0.1)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, graceful: bool = False, timeout: float = 30.0) -> None:
        """Stop the node: SIGKILL to its process group (a crash), or SIGTERM and wait (a
        clean shutdown, killed after `timeout` seconds)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if graceful:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                graceful = False
        if not graceful:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        # Port programs (the JavaScript engine) and the child setup helper share the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def ensure_system_dbs(node: CouchNode, within: float = 30.0) -> None:
    """Make sure `_users` and `_replicator` exist (a single node creates them itself at start,
    racing with us: a PUT then fails with 412 or a 500 `conflict`, and a GET settles it)."""
    for db in ("_users", "_replicator"):

        def exists(db: str = db) -> bool | None:
            status, _ = node.request("GET", f"/{db}")
            if status == 200:
                return True
            if status == 404:
                node.request("PUT", f"/{db}")
            return None

        wait_for(exists, within=within, every=0.2, what=f"{db} on {node.name}")


class SingleNode:
    """A single CouchDB node (`single_node = true`), the suite's server."""

    def __init__(self, release: Path, workdir: Path, *, log_level: str = "warning") -> None:
        suffix = secrets.token_hex(4)
        self.node = CouchNode(
            release,
            workdir,
            f"single-{suffix}",
            cookie=secrets.token_hex(16),
            uuid=secrets.token_hex(16),
            cluster=False,
            log_level=log_level,
        )
        self.user = self.node.user
        self.password = self.node.password

    @property
    def url(self) -> str:
        return self.node.url

    def start(self) -> None:
        self.node.start()
        ensure_system_dbs(self.node)

    def alive(self) -> bool:
        return self.node.alive()

    def stop(self) -> None:
        self.node.stop(graceful=False)


# -- the cluster -------------------------------------------------------------------------------


class CouchCluster:
    """Three CouchDB nodes joined into one cluster (n=3, q=2), all on 127.0.0.1.

    Nodes are numbered 0, 1, 2 (`nodes[i]`, `urls[i]`, Erlang names `node<i>-<session>@…`).
    Any node serves any database. `stop_node(i)` kills a node (or stops it cleanly with
    `graceful=True`) and waits until the others see it gone; `start_node(i)` restarts it with
    the same name, port and data and waits until every node lists all three as connected.
    The blocking methods have `a…` twins for async tests (they keep the event loop, and so
    any in-process daemon, running meanwhile).
    """

    SIZE = 3

    def __init__(self, release: Path, workdir: Path, *, log_level: str = "warning") -> None:
        suffix = secrets.token_hex(4)
        cookie, uuid = secrets.token_hex(16), secrets.token_hex(16)
        self.nodes = [
            CouchNode(
                release,
                workdir / f"node{i}",
                f"node{i}-{suffix}",
                cookie=cookie,
                uuid=uuid,
                cluster=True,
                log_level=log_level,
            )
            for i in range(self.SIZE)
        ]
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
        self.user = ADMIN_USER
        self.password = ADMIN_PASSWORD

    @property
    def urls(self) -> list[str]:
        """Base URLs of the nodes, without credentials."""
        return [node.url for node in self.nodes]

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]

    # -- set-up -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the three nodes, join them and create the system databases."""
        _in_parallel([node.start for node in self.nodes])
        first = self.nodes[0]
        for node in self.nodes[1:]:
            status, body = first.request("PUT", f"/_node/_local/_nodes/{node.name}", {})
            if status not in (201, 202, 409):
                raise CouchReleaseError(f"adding {node.name}: {status} {body}")
        self.wait_joined()
        ensure_system_dbs(first)

    def membership(self, i: int) -> dict[str, list[str]]:
        """`GET /_membership` on node `i`: `all_nodes` (connected) and `cluster_nodes`."""
        status, body = self.nodes[i].request("GET", "/_membership")
        if status != 200:
            raise CouchReleaseError(f"_membership on {self.nodes[i].name}: {status} {body}")
        return {key: list(body.get(key) or []) for key in ("all_nodes", "cluster_nodes")}

    def _sees(self, i: int, expected: Sequence[str]) -> bool:
        seen = self.membership(i)
        wanted = set(expected)
        return (
            set(self.node_names) <= set(seen["cluster_nodes"])
            and set(seen["all_nodes"]) & set(self.node_names) == wanted
        )

    def wait_joined(self, within: float = 60.0) -> None:
        """Wait until every running node lists all three nodes as members and connected."""
        running = [i for i, node in enumerate(self.nodes) if node.alive()]
        names = [self.nodes[i].name for i in running]
        wait_for(
            lambda: True if all(self._sees(i, names) for i in running) else None,
            within=within,
            what=f"nodes {running} to see each other in _membership",
        )

    # -- faults -------------------------------------------------------------------------------

    def running(self, i: int) -> bool:
        return self.nodes[i].alive()

    def stop_node(self, i: int, *, graceful: bool = False) -> None:
        """Stop node `i`: kill -9 (default) or a clean shutdown. Returns once the other
        running nodes no longer list it as connected."""
        self.nodes[i].stop(graceful=graceful)
        self.wait_joined()

    def start_node(self, i: int) -> None:
        """(Re)start node `i` on its port and data; returns once every running node lists
        all running nodes, this one included, as connected."""
        self.nodes[i].start()
        self.wait_joined()

    def heal(self) -> None:
        """Restart any stopped node (after a test, so that the next one starts whole)."""
        stopped = [i for i in range(self.SIZE) if not self.running(i)]
        if stopped:
            _in_parallel([self.nodes[i].start for i in stopped])
            self.wait_joined()

    async def astop_node(self, i: int, *, graceful: bool = False) -> None:
        """`stop_node` without blocking the event loop."""
        await asyncio.to_thread(self.stop_node, i, graceful=graceful)

    async def astart_node(self, i: int) -> None:
        """`start_node` without blocking the event loop."""
        await asyncio.to_thread(self.start_node, i)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(graceful=False)

    def tails(self) -> str:
        return "\n".join(f"--- {node.name}\n{node.tail(20)}" for node in self.nodes)


def _in_parallel(jobs: Sequence[Callable[[], None]]) -> None:
    """Run blocking start-ups side by side (each waits for its node); re-raise the first error."""
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
