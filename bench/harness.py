"""Benchmark plumbing: the RapidPro sandbox with an arrival hook, the daemon as a child process,
per-benchmark databases, CHT-shaped documents, CPU and memory readings, and machine facts.

Nothing here changes the daemon or the sandbox: the sandbox app is built with its own
`build_app` and served by a runner of ours, with one extra outer middleware that timestamps
each broadcast POST as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test server runner and document builders

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from cht_rapidpro.sandbox import DEFAULT_TOKEN, Sandbox, SandboxConfig, build_app  # noqa: E402
from couchdb_release import CouchCluster, SingleNode, make_session_dir  # noqa: E402
from pouchdb import PouchServer, free_port  # noqa: E402
from support import CouchAdmin, CouchServer, iso, message_doc, rapidpro_settings  # noqa: E402

__all__ = [
    "DEFAULT_TOKEN",
    "ROOT",
    "Backend",
    "BroadcastProbe",
    "CouchAdmin",
    "CouchBackend",
    "CouchServer",
    "CountingCouch",
    "CpuMeter",
    "Daemon",
    "DaemonGroup",
    "PouchBackend",
    "PouchServer",
    "SandboxConfig",
    "Workload",
    "cpu_seconds",
    "machine_facts",
    "percentile",
    "serve_sandbox",
    "wait_quiet",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEALTH_TIMEOUT_S = 60.0
#: Log events that mean the daemon will not finish the work it was given.
CRASHES = frozenset({"send_job_crashed", "worker_crashed", "gateway_fatal"})
#: A wait fails when its measure has not moved for this long.
STALL_S = 60.0


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation): an observed value, never an invented one."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil
    return ordered[int(rank) - 1]


# --- the sandbox, with an arrival hook ---------------------------------------------------------


class BroadcastProbe:
    """Timestamps every broadcast POST the sandbox accepts, taken when the request arrives.

    `arrivals` holds `time.perf_counter()` values in arrival order (only POSTs answered 201).
    Waiters are woken by the request itself, so nothing polls.
    """

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.by_text: dict[str, float] = {}
        self.refused: dict[int, int] = {}
        self.handling: list[float] = []  # seconds from arrival to the sandbox's answer
        self.message_gets = 0
        self.message_get_handling: list[float] = []  # the same, for GET messages.json
        self._text_waiters: dict[str, asyncio.Future[float]] = {}
        self._count_waiters: list[tuple[int, asyncio.Future[float]]] = []

    @property
    def count(self) -> int:
        return len(self.arrivals)

    def expect(self, text: str) -> asyncio.Future[float]:
        """A future resolved with the arrival time of the broadcast carrying `text`."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if text in self.by_text:
            future.set_result(self.by_text[text])
        else:
            self._text_waiters[text] = future
        return future

    def reach(self, count: int) -> asyncio.Future[float]:
        """A future resolved with the arrival time of the `count`-th accepted broadcast."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if self.count >= count:
            future.set_result(self.arrivals[count - 1])
        else:
            self._count_waiters.append((count, future))
        return future

    def _accepted(self, text: str | None, at: float) -> None:
        self.arrivals.append(at)
        if text is not None:
            self.by_text[text] = at
            waiter = self._text_waiters.pop(text, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(at)
        if self._count_waiters:
            keep = []
            for count, future in self._count_waiters:
                if self.count >= count:
                    if not future.done():
                        future.set_result(self.arrivals[count - 1])
                else:
                    keep.append((count, future))
            self._count_waiters = keep

    def middleware(self) -> Any:
        probe = self

        @web.middleware
        async def arrival(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path.endswith("/messages.json") and request.method == "GET":
                probe.message_gets += 1
                started = time.perf_counter()
                try:
                    return await handler(request)
                finally:
                    probe.message_get_handling.append(time.perf_counter() - started)
            if request.method != "POST" or not request.path.endswith("/broadcasts.json"):
                return await handler(request)
            at = time.perf_counter()
            text: str | None = None
            with contextlib.suppress(ValueError, AttributeError):
                text = json.loads(await request.read()).get("text")  # cached for the sandbox
            response = await handler(request)
            probe.handling.append(time.perf_counter() - at)
            if response.status == 201:
                probe._accepted(text, at)
            else:
                probe.refused[response.status] = probe.refused.get(response.status, 0) + 1
            return response

        return arrival


@dataclass(frozen=True, slots=True)
class RunningSandbox:
    url: str
    sandbox: Sandbox
    probe: BroadcastProbe


@contextlib.asynccontextmanager
async def serve_sandbox(config: SandboxConfig) -> AsyncIterator[RunningSandbox]:
    """The sandbox's own app (`build_app`) plus our outer middleware, on a free port."""
    sandbox = Sandbox(config)
    probe = BroadcastProbe()
    app = build_app(sandbox)
    app.middlewares.insert(0, probe.middleware())  # outermost: sees the request first
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield RunningSandbox(f"http://127.0.0.1:{port}", sandbox, probe)
    finally:
        await runner.cleanup()
        # aiohttp keeps every app it served in a module-level middleware cache (an lru_cache of
        # 1,024 entries), and with it the sandbox's workspace: up to millions of messages after
        # the log and shared benchmarks, which every later benchmark then paid for in garbage
        # collection. Forget the workspace here.
        sandbox.reset()


# --- CPU and memory of processes ----------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process and its threads (NaN if unknown)."""
    if pid is None:
        return float("nan")
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def proc_status(pid: int) -> dict[str, int]:
    """`VmHWM`, `VmRSS` (kB) etc. from /proc/<pid>/status."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                values[name] = int(rest.split()[0])
    return values


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


async def wait_quiet(max_wait: float, threshold: float = 0.25) -> tuple[float, float]:
    """Wait until the machine is quiet: all processes together use less than `threshold`
    cores over a 2 s sample (between benchmarks ours are idle, so that is everyone else).
    Gives up after `max_wait` s. Returns (seconds waited, cores busy in the last sample)."""
    started = time.monotonic()
    while True:
        before = machine_cpu()[0]
        await asyncio.sleep(2)
        busy = (machine_cpu()[0] - before) / 2
        waited = time.monotonic() - started
        if busy < threshold or waited >= max_wait:
            return waited, busy


class CpuMeter:
    """CPU seconds used by named processes between `start()` and `stop()`, and by every
    other process on the machine (other users of a shared machine show up there)."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self._machine = (0.0, 0.0)
        self.used: dict[str, float] = {}
        self.others = 0.0
        self.steal = 0.0
        self._wall = 0.0
        self.wall = 0.0

    def start(self) -> CpuMeter:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine = machine_cpu()
        self._wall = time.perf_counter()
        return self

    def stop(self) -> dict[str, float]:
        self.wall = time.perf_counter() - self._wall
        self.used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        busy, steal = machine_cpu()
        self.others = max(0.0, busy - self._machine[0] - sum(self.used.values()))
        self.steal = steal - self._machine[1]
        return self.used

    def summary(self) -> str:
        parts = [f"{name} {used:.1f} s" for name, used in self.used.items()]
        parts.append(f"other processes {self.others:.1f} s")
        total = sum(self.used.values()) + self.others
        cores = os.cpu_count() or 1
        text = (
            f"CPU over {self.wall:.1f} s wall: " + ", ".join(parts) + f" (total {total:.1f} s "
            f"of {self.wall * cores:.1f} s available on {cores} cores"
        )
        if self.steal >= 0.1:
            text += f"; {self.steal:.1f} s stolen by the hypervisor"
        return text + ")"


# --- the daemon as a child process --------------------------------------------------------------

_LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    line = re.sub(r"^<\d>", "", line.strip())
    fields: dict[str, str] = {}
    for key, value in _LOGFMT.findall(line):
        if value.startswith('"'):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        fields[key] = value
    return fields


class Daemon:
    """`python -m cht_rapidpro run` on one database, logging logfmt to a file."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        couch_url: str,
        *,
        env: dict[str, str] | None = None,
        profile: bool = False,
    ) -> None:
        self.name = name
        self.couch_url = couch_url
        self.port = free_port()
        self.log_path = workdir / f"daemon-{name}.log"
        self.profile_path = workdir / f"daemon-{name}.prof" if profile else None
        self.env = {
            "CHT_RAPIDPRO_INSTANCE": f"bench-{name}",
            "CHT_RAPIDPRO_LOG_FORMAT": "logfmt",
            "CHT_RAPIDPRO_LOG_LEVEL": "info",
            # No client-side budgets: the benchmark measures the daemon, not RapidPro's quota.
            "CHT_RAPIDPRO_BROADCASTS_PER_HOUR": "0",
            "CHT_RAPIDPRO_MESSAGES_PER_HOUR": "0",
            **(env or {}),
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.spawned_at = 0.0  # perf_counter
        self.spawned_wall = 0.0  # time.time()
        self.exit_code: int | None = None
        self._scanned = 0  # bytes of the log checked for crashes

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, *, wait_healthy: bool = True) -> None:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("CHT_RAPIDPRO_") and key not in ("COUCH_URL", "JOURNAL_STREAM")
        }
        env.update(self.env)
        env.update(COUCH_URL=self.couch_url, CHT_RAPIDPRO_PORT=str(self.port))
        command = [sys.executable]
        if self.profile_path is not None:
            command += ["-m", "cProfile", "-o", str(self.profile_path)]
        command += ["-m", "cht_rapidpro", "run"]
        with self.log_path.open("wb") as log:
            self.spawned_at = time.perf_counter()
            self.spawned_wall = time.time()
            self.proc = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        if wait_healthy:
            await self.wait_healthy()

    async def wait_healthy(self) -> float:
        """Seconds from spawn until /healthz answered 200."""
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                self.check_alive()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    url = f"http://127.0.0.1:{self.port}/healthz"
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return time.perf_counter() - self.spawned_at
                await asyncio.sleep(0.05)
        raise RuntimeError(f"daemon {self.name} did not become healthy; log: {self.log_path}")

    def check_alive(self) -> None:
        """Raise if the daemon exited, or logged a crash since the last check (a benchmark
        would otherwise wait for work that will never be done)."""
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(
                f"daemon {self.name} exited with code {self.proc.returncode}; "
                f"log: {self.log_path}\n{self.tail()}"
            )
        with contextlib.suppress(OSError), self.log_path.open("rb") as handle:
            handle.seek(self._scanned)
            chunk = handle.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._scanned += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                fields = parse_logfmt(line)
                if fields.get("level") == "critical" or fields.get("event") in CRASHES:
                    raise RuntimeError(
                        f"daemon {self.name} logged {fields.get('event')}: "
                        f"{str(fields.get('exception') or fields.get('error'))[-300:]}; "
                        f"log: {self.log_path}"
                    )

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def memory(self) -> dict[str, int]:
        return proc_status(self.pid) if self.pid else {}

    def events(self, *names: str) -> list[dict[str, str]]:
        """Parsed log lines, optionally only those whose `event` is one of `names`."""
        found = []
        with contextlib.suppress(OSError), self.log_path.open(errors="replace") as handle:
            for line in handle:
                if names and not any(f"event={n}" in line for n in names):
                    continue
                fields = parse_logfmt(line)
                if not names or fields.get("event") in names:
                    found.append(fields)
        return found

    def problems(self) -> dict[str, int]:
        """Counts of warning/error/critical events in the log, by event name."""
        counts: dict[str, int] = {}
        for fields in self.events():
            if fields.get("level") in ("warning", "error", "critical"):
                key = f"{fields.get('level')}:{fields.get('event')}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            self.exit_code = await self.proc.wait()
        return self.exit_code


class DaemonGroup:
    """Several daemons on one database, one per cluster node (each talks to its own node),
    looked at as one for the benchmarks: events merged, alive only if all are."""

    def __init__(self, members: list[Daemon]) -> None:
        self.members = members
        self.name = members[0].name
        self.log_path = members[0].log_path
        self.profile_path: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.members[0].pid

    @property
    def port(self) -> int:
        return self.members[0].port

    @property
    def spawned_at(self) -> float:
        return min(d.spawned_at for d in self.members)

    @property
    def spawned_wall(self) -> float:
        return min(d.spawned_wall for d in self.members)

    async def start(self, *, wait_healthy: bool = True) -> None:
        for daemon in self.members:
            await daemon.start(wait_healthy=wait_healthy)

    def check_alive(self) -> None:
        for daemon in self.members:
            daemon.check_alive()

    def tail(self, lines: int = 15) -> str:
        return "\n".join(d.tail(lines) for d in self.members)

    def memory(self) -> dict[str, int]:
        return self.members[0].memory()

    def events(self, *names: str) -> list[dict[str, str]]:
        merged = [event for d in self.members for event in d.events(*names)]
        return sorted(merged, key=lambda event: event.get("timestamp", ""))

    def problems(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for daemon in self.members:
            counts.update(daemon.problems())
        return dict(counts)

    async def stop(self) -> int | None:
        codes = [await daemon.stop() for daemon in self.members]
        return next((code for code in codes if code), codes[0] if codes else None)


async def wait_for(
    future: Awaitable[float],
    daemon: Daemon,
    within: float,
    what: str,
    progress: Callable[[], int] | None = None,
) -> float:
    """Await `future`; fail early if the daemon dies or crashes, after `within` seconds, or
    when `progress()` has not changed for `STALL_S`."""
    task = asyncio.ensure_future(future)
    deadline = time.monotonic() + within
    last, moved = (progress() if progress else 0), time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            daemon.check_alive()
            now = time.monotonic()
            if progress is not None and (current := progress()) != last:
                last, moved = current, now
            if now > deadline or now - moved > STALL_S:
                stalled = f" (stuck at {last} for {now - moved:.0f} s)" if progress else ""
                raise RuntimeError(f"timed out waiting for {what}{stalled}")
    finally:
        if not task.done():
            task.cancel()


async def wait_broadcasts(
    rapidpro: RunningSandbox, daemon: Daemon, count: int, within: float = 900.0
) -> float:
    """The arrival time of the `count`-th accepted broadcast (`wait_for`, the sandbox's count
    as progress)."""
    return await wait_for(
        rapidpro.probe.reach(count),
        daemon,
        within,
        f"{count} broadcasts",
        lambda: rapidpro.probe.count,
    )


# --- the servers the benchmarks run on -----------------------------------------------------------


class Backend:
    """A CouchDB-compatible server for the benchmarks: pouchdb-server, or real CouchDB 3 (one
    node, or three nodes joined as a cluster)."""

    key = ""
    title = ""

    @property
    def server(self) -> CouchServer:
        """The first node (what single-writer benchmarks talk to)."""
        return CouchServer(self.urls()[0])

    def urls(self) -> list[str]:
        raise NotImplementedError

    def pids(self) -> dict[str, int | None]:
        raise NotImplementedError

    def logs(self) -> list[Path]:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, keep_logs_in: Path | None = None) -> None:
        raise NotImplementedError


class PouchBackend(Backend):
    key = "pouchdb"

    def __init__(self, workdir: Path) -> None:
        self.pouch = PouchServer(workdir, in_memory=True)
        self.title = "pouchdb-server 4.2.0 (in memory)"

    def urls(self) -> list[str]:
        return [self.pouch.url]

    def pids(self) -> dict[str, int | None]:
        return {"pouchdb-server": self.pouch.proc.pid if self.pouch.proc else None}

    def logs(self) -> list[Path]:
        return [self.pouch.workdir / "pouchdb.log"]

    def alive(self) -> bool:
        return self.pouch.alive()

    def start(self) -> None:
        self.pouch.start()

    def stop(self, keep_logs_in: Path | None = None) -> None:
        self.pouch.stop()


class CouchBackend(Backend):
    """Apache CouchDB 3 from a release directory (../shared/spec/couchdb-real.md), logging every
    request (`[log] level = notice`) so that the daemon's requests can be counted."""

    def __init__(self, release: Path, *, cluster: bool) -> None:
        self.workdir = make_session_dir()
        self.cluster: CouchCluster | None = None
        self.single: SingleNode | None = None
        if cluster:
            self.cluster = CouchCluster(release, self.workdir / "cluster", log_level="notice")
            self.key = "cluster"
            self.title = "Apache CouchDB {version}, 3-node cluster (n=3, q=2), a daemon per node"
        else:
            self.single = SingleNode(release, self.workdir / "single", log_level="notice")
            self.key = "couchdb"
            self.title = "Apache CouchDB {version}, single node"

    def _nodes(self) -> list[Any]:
        return self.cluster.nodes if self.cluster else [self.single.node]  # type: ignore[union-attr]

    def urls(self) -> list[str]:
        return [node.url for node in self._nodes()]

    def pids(self) -> dict[str, int | None]:
        nodes = self._nodes()
        return {
            (f"couchdb node {i}" if len(nodes) > 1 else "couchdb"): (
                node.proc.pid if node.proc else None
            )
            for i, node in enumerate(nodes)
        }

    def logs(self) -> list[Path]:
        return [node.log_path for node in self._nodes()]

    def alive(self) -> bool:
        return all(node.alive() for node in self._nodes())

    def start(self) -> None:
        if self.cluster:
            self.cluster.start()
        else:
            self.single.start()  # type: ignore[union-attr]
        _, welcome = self._nodes()[0].request("GET", "/")
        self.title = self.title.format(version=welcome.get("version", "3"))

    def stop(self, keep_logs_in: Path | None = None) -> None:
        if self.cluster:
            self.cluster.stop()
        elif self.single:
            self.single.stop()
        import shutil

        if keep_logs_in is not None:
            for i, log in enumerate(self.logs()):
                with contextlib.suppress(OSError):
                    shutil.copy(log, keep_logs_in / f"{self.key}-node{i}.log")
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- databases and documents --------------------------------------------------------------------


def request_kind(method: str, path: str, db: str) -> str:
    """`GET doc`, `POST _bulk_docs`, ... for a request path on `db` (or its vault)."""
    path = path.split("?", 1)[0]
    if path.startswith(f"/{db}-vault"):
        return f"{method} vault"
    rest = path[len(db) + 1 :].lstrip("/")
    if not rest:
        kind = "db"
    elif rest.startswith(("_local", "_design")):
        kind = rest.split("%2F", 1)[0].split("/", 1)[0]
    elif rest.startswith("_"):
        kind = rest.split("/", 1)[0]
    else:
        kind = "doc"
    return f"{method} {kind}"


class CountingCouch(CouchAdmin):
    """`CouchAdmin` that counts its own requests, to tell them from the daemon's."""

    def __init__(self, server: CouchServer, db: str) -> None:
        super().__init__(server, db)
        self.counts: Counter[str] = Counter()

    async def request(
        self, method: str, path: str, body: Any = None, *, expect: Iterable[int] = (200, 201)
    ) -> Any:
        self.counts[request_kind(method, path, self.db)] += 1
        return await super().request(method, path, body, expect=expect)

    async def get(self, doc_id: str, db: str | None = None) -> dict[str, Any] | None:
        self.counts[request_kind("GET", self._doc_path(doc_id, db), self.db)] += 1
        return await super().get(doc_id, db)


_POUCH_REQUEST = re.compile(r"\] (?:\S+ - - )?([A-Z]+) (/\S*) (\d{3})")
#: CouchDB's `[notice]` request lines: `… <peer> admin GET /db/_changes?… 200 ok 4`.
_COUCH_REQUEST = re.compile(r" \S+ (GET|PUT|POST|DELETE|HEAD|COPY) (/\S*) (\d{3}) ")


async def couch_requests(backend: Backend, couch: CountingCouch) -> Counter[str]:
    """Requests to `couch.db` (and its vault) in the server's request log, less the
    benchmark's own: what the daemon asked of CouchDB. Call after the db was deleted."""
    marker = (f" /{couch.db} ", f" /{couch.db}/", f" /{couch.db}?", f" /{couch.db}-vault")
    pattern = _POUCH_REQUEST if isinstance(backend, PouchBackend) else _COUCH_REQUEST
    for _ in range(20):  # servers write their logs asynchronously
        seen: Counter[str] = Counter()
        for log in backend.logs():
            with contextlib.suppress(OSError):
                for line in log.read_text(errors="replace").splitlines():
                    if any(m in line for m in marker):
                        match = pattern.search(line)
                        if match:
                            seen[request_kind(match.group(1), match.group(2), couch.db)] += 1
        if seen["DELETE db"] >= couch.counts["DELETE db"]:
            break
        await asyncio.sleep(0.1)
    seen.subtract(couch.counts)
    return Counter({kind: count for kind, count in seen.items() if count > 0})


async def create_medic(server: CouchServer, db: str, rapidpro_url: str) -> CountingCouch:
    """A fresh medic-like db: app settings naming the sandbox and the outgoing credential."""
    couch = CountingCouch(server, db)
    # pouchdb-server (node) drops keep-alive connections idle for 5 s; aiohttp keeps them
    # 15 s and may reuse one the server is closing (a broken pipe). Stay below the server's.
    default = couch.session
    couch.session = aiohttp.ClientSession(
        headers=dict(default.headers), connector=aiohttp.TCPConnector(keepalive_timeout=2.0)
    )
    await default.close()
    await couch.delete_db()
    await couch.delete_db(f"{db}-vault")
    await couch.create_db()
    await couch.put_settings(**rapidpro_settings(rapidpro_url))
    await couch.put_vault_credential("rapidpro:outgoing", DEFAULT_TOKEN)
    return couch


async def drop_medic(couch: CouchAdmin) -> None:
    with contextlib.suppress(Exception):
        await couch.delete_db()
        await couch.delete_db(f"{couch.db}-vault")
    await couch.close()


@dataclass
class Workload:
    """Deterministic CHT-shaped documents (a seeded RNG, so every run writes the same mix)."""

    seed: int = 5
    phones: int = 100  # recipients are drawn from a pool, as CHWs get many messages
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def phone(self) -> str:
        return f"+2547{self.rng.randrange(self.phones):08d}"

    def pending(self, text: str) -> dict[str, Any]:
        """A web-app "send message" doc with one pending task and one message."""
        msg = {"uuid": self.uuid(), "to": self.phone(), "message": text}
        history = [{"state": "pending", "timestamp": iso()}]
        task = {"messages": [msg], "state": "pending", "state_history": history}
        return message_doc([task], doc_id=self.uuid())

    def contact(self, n: int) -> dict[str, Any]:
        """A CHT person with its place hierarchy (about 0.6 kB of JSON)."""
        return {
            "_id": self.uuid(),
            "type": "person",
            "name": f"Person {n}",
            "short_name": f"P{n}",
            "date_of_birth": f"{1960 + n % 50}-0{1 + n % 9}-1{n % 10}",
            "sex": "female" if n % 2 else "male",
            "phone": self.phone(),
            "role": "patient",
            "patient_id": str(10000 + n),
            "parent": {
                "_id": f"household-{n // 5}",
                "parent": {"_id": f"chw-area-{n // 200}", "parent": {"_id": "health-centre-1"}},
            },
            "reported_date": 1_700_000_000_000 + n * 1000,
            "meta": {"created_by": f"chw{n // 200}", "created_by_person_uuid": self.uuid()},
        }

    def report(self, n: int, *, delivered_task: bool = False) -> dict[str, Any]:
        """An app form report (about 1 kB); a few carry a long-delivered auto-reply."""
        doc: dict[str, Any] = {
            "_id": self.uuid(),
            "type": "data_record",
            "form": ("pregnancy_home_visit", "assessment", "delivery", "immunization")[n % 4],
            "content_type": "xml",
            "reported_date": 1_700_000_000_000 + n * 1000,
            "contact": {"_id": self.uuid(), "parent": {"_id": f"chw-area-{n // 200}"}},
            "from": self.phone(),
            "fields": {
                "patient_id": str(10000 + n),
                "patient_name": f"Person {n}",
                "visit_date": "2024-05-01",
                "inputs": {"source": "task", "contact": {"_id": self.uuid(), "name": "x"}},
                "danger_signs": {"fever": "no", "bleeding": "no", "headache": "yes"},
                "vitals": {"temperature": "37.1", "weight": "64", "muac": "24"},
                "meta": {"instanceID": f"uuid:{self.uuid()}"},
            },
            "hidden_fields": ["meta", "inputs"],
            "geolocation": {"latitude": -1.29, "longitude": 36.82, "accuracy": 20},
        }
        if delivered_task:
            doc["tasks"] = [
                {
                    "messages": [
                        {"uuid": self.uuid(), "to": self.phone(), "message": "Thank you."}
                    ],
                    "state": "delivered",
                    "gateway_ref": 1000 + n,
                    "state_history": [
                        {"state": "pending", "timestamp": "2024-05-01T10:00:00.000Z"},
                        {"state": "delivered", "timestamp": "2024-05-01T10:01:00.000Z"},
                    ],
                }
            ]
        return doc

    def catchup_docs(self, total: int) -> list[dict[str, Any]]:
        """`total` docs: 1% pending messages (every 100th, the last one included), 4% reports
        with an old delivered task, the rest contacts (a third) and reports without tasks."""
        docs = []
        for n in range(total):
            if n % 100 == 99:
                docs.append(self.pending(f"Catch-up message {n}: visit due, please come."))
            elif n % 25 == 7:
                docs.append(self.report(n, delivered_task=True))
            elif n % 3 == 0:
                docs.append(self.contact(n))
            else:
                docs.append(self.report(n))
        return docs


async def bulk_load(couch: CouchAdmin, docs: list[dict[str, Any]], batch: int = 2000) -> float:
    """Write `docs` with `_bulk_docs` in batches; returns docs/s. Fails on any refused row."""
    started = time.perf_counter()
    for start in range(0, len(docs), batch):
        rows = await couch.bulk(docs[start : start + batch])
        bad = [row for row in rows if "error" in row]
        if bad:
            raise RuntimeError(f"bulk load refused {len(bad)} docs, e.g. {bad[0]}")
    return len(docs) / (time.perf_counter() - started)


# --- the machine --------------------------------------------------------------------------------


def _command(*args: str) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"


def code_version() -> str:
    """The commit and what the working tree of daemon/ adds to it (read-only git calls;
    untracked files aside). Others may commit while a run goes on: taken per benchmark."""
    commit = _command("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    changes = _command("git", "-C", str(ROOT), "diff", "--shortstat", "HEAD", "--", "daemon")
    changes = "none" if changes == "?" else changes
    return f"commit {commit}, uncommitted changes in daemon/: {changes}"


def machine_facts() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mhz = re.findall(r"^cpu MHz\s*:\s*(.+)$", cpuinfo, re.M)
    processors = len(re.findall(r"^processor\s*:", cpuinfo, re.M))
    meminfo = Path("/proc/meminfo").read_text()
    total_kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))  # type: ignore[union-attr]
    pouch_pkg = ROOT / "node_modules" / "pouchdb-server" / "package.json"
    pouch_version = json.loads(pouch_pkg.read_text()).get("version", "?")
    import aiohttp as _aiohttp

    cpu = models[0] if models else platform.processor() or "?"
    if mhz:
        cpu += f" ({float(mhz[0]):.0f} MHz)"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": f"{cpu}, {processors} logical CPUs in /proc/cpuinfo (os.cpu_count {os.cpu_count()})",
        "ram": f"{total_kb / 1024 / 1024:.1f} GiB",
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": f"{platform.python_implementation()} {platform.python_version()} "
        f"(aiohttp {_aiohttp.__version__})",
        "node": _command("node", "--version"),
        "pouchdb_server": f"{pouch_version} (--in-memory)",
        "code": code_version(),
    }
