"""cht-rapidpro benchmarks: latency, throughput, polling cost, catch-up, memory, webhook.

Run through `bench/run` (which does the set-up first). One run starts one pouchdb-server
(in memory) and, per benchmark, a fresh database, a fresh in-process RapidPro sandbox (no
throttle) and the daemon as a child process (`python -m cht_rapidpro run`). It prints a table
and, for a full run, writes it with the machine's description and the details to
bench/RESULTS.md. Nothing is hard-coded: every figure comes from this run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import pstats
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from cht_rapidpro import logs
from cht_rapidpro.gateway import feed_selector
from cht_rapidpro.sandbox.state import MessageRecord, build_timeline
from harness import (
    ROOT,
    Backend,
    CouchAdmin,
    CouchBackend,
    CouchServer,
    CpuMeter,
    Daemon,
    DaemonGroup,
    PouchBackend,
    SandboxConfig,
    Workload,
    bulk_load,
    code_version,
    couch_requests,
    cpu_seconds,
    create_medic,
    drop_medic,
    machine_facts,
    percentile,
    serve_sandbox,
    wait_broadcasts,
    wait_for,
    wait_quiet,
)
from support import install_cht_views, message_doc
from virtual import VirtualClock, VirtualRun, Workspace, load_workspace, run_virtual, summary

RESULTS = ROOT / "bench" / "RESULTS.md"
NOTES_BEGIN, NOTES_END = "<!-- notes:begin -->", "<!-- notes:end -->"
BENCHMARKS = (
    "latency",
    "throughput",
    "polling",
    "catchup",
    "memory",
    "webhook",
    "throttle",
    "inflight",
    "shared",
    "log",
)
SENDABLE = ("pending", "forwarded-to-gateway")
INCOMING_KEY = "bench-incoming-key-0123456789"


@dataclass(frozen=True)
class Sizes:
    latency_messages: int = 200
    latency_warmup: int = 10
    latency_settle_s: float = 0.05
    throughput_messages: int = 5000
    ceiling_batch: int = 500
    poll_levels: tuple[int, ...] = (1000, 10_000)
    poll_rounds: int = 3
    poll_interval_s: float = 2.0
    catchup_docs: int = 100_000
    memory_small_docs: int = 1000
    webhook_requests: int = 3000
    webhook_clients: int = 100
    throttle_messages: int = 10_000
    throttle_limit: int = 3600  # TextIt: 3,600 requests an hour, broadcasts and lookups
    throttle_window_s: float = 36.0  # RapidPro's hour, 100 times faster
    inflight_levels: tuple[int, ...] = (1000, 200_000)
    shared_foreign: int = 1_000_000
    shared_ours: int = 1000
    shared_hours: float = 3.0
    log_foreign: int = 1_000_000
    log_hours: float = 1.0


FULL = Sizes()
QUICK = Sizes(
    latency_messages=50,
    latency_warmup=5,
    throughput_messages=1000,
    poll_levels=(200, 2000),
    poll_rounds=2,
    catchup_docs=20_000,
    webhook_requests=500,
    throttle_messages=2000,
    throttle_limit=600,
    throttle_window_s=12.0,
    inflight_levels=(1000, 20_000),
    shared_foreign=100_000,
    shared_hours=2.0,
    log_foreign=100_000,
    log_hours=0.5,
)


@dataclass
class Row:
    measure: str
    value: str
    target: str = "—"
    met: bool | None = None


@dataclass
class Result:
    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    background: str = ""
    code: str = ""


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    workdir: Path
    backend: Backend
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def server(self) -> CouchServer:
        return self.backend.server

    def daemon(self, name: str, couch: CouchAdmin, *, replicas: int = 1, **env: str) -> Any:
        """The daemon for a benchmark: one, or on a cluster one per node (a `DaemonGroup`),
        or `replicas` of them on one server."""
        extra = {f"CHT_RAPIDPRO_{key.upper()}": value for key, value in env.items()}
        extra.update(self.args.daemon_env)
        urls = self.backend.urls()
        if len(urls) == 1 and replicas > 1:
            urls = urls * replicas
        if len(urls) == 1:
            return Daemon(self.workdir, name, couch.couch_url, env=extra, profile=self.args.profile)
        return DaemonGroup(
            [
                Daemon(
                    self.workdir,
                    f"{name}-node{i}",
                    CouchServer(url).db_url(couch.db),
                    env={**extra, "CHT_RAPIDPRO_INSTANCE": f"bench-{name}-node{i}"},
                    profile=self.args.profile,
                )
                for i, url in enumerate(urls)
            ]
        )

    def meter(self, daemon: Any) -> CpuMeter:
        members = daemon.members if isinstance(daemon, DaemonGroup) else [daemon]
        pids: dict[str, int | None] = {
            ("daemon" if len(members) == 1 else f"daemon {i}"): member.pid
            for i, member in enumerate(members)
        }
        pids.update(self.backend.pids())
        pids["bench+sandbox"] = os.getpid()
        return CpuMeter(pids).start()

    def server_cpu(self) -> float:
        """CPU seconds the server's processes have used so far."""
        return sum(cpu_seconds(pid) for pid in self.backend.pids().values())

    def server_used(self, meter: CpuMeter) -> float:
        return sum(meter.used.get(name, 0.0) for name in self.backend.pids())


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')}  {text}", flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def rate(value: float, unit: str = "/s") -> str:
    return f"{value:,.0f}{unit}"


def mib(kb: int | None) -> str:
    return "?" if kb is None else f"{kb / 1024:.1f} MB"


def log_ms(events: list[dict[str, str]], key: str = "duration_ms") -> list[float]:
    values = []
    for event in events:
        with contextlib.suppress(KeyError, ValueError):
            values.append(float(event[key]))
    return values


def log_time(event: dict[str, str]) -> float:
    """A daemon log line's timestamp as epoch seconds."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def distribution(values: list[float], unit: str = "ms") -> str:
    if not values:
        return "none"
    return (
        f"n={len(values)} p50={percentile(values, 50):.1f} {unit} "
        f"p90={percentile(values, 90):.1f} {unit} p99={percentile(values, 99):.1f} {unit} "
        f"max={max(values):.1f} {unit}"
    )


async def daemon_metrics(daemon: Any) -> dict[str, float]:
    """The daemon's Prometheus counters (`/metrics`), by sample name with labels (summed over
    the daemons of a group)."""
    if isinstance(daemon, DaemonGroup):
        total: Counter[str] = Counter()
        for member in daemon.members:
            total.update(await daemon_metrics(member))
        return dict(total)
    found: dict[str, float] = {}
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{daemon.port}/metrics", timeout=aiohttp.ClientTimeout(total=10)
            ) as resp,
        ):
            for line in (await resp.text()).splitlines():
                if line.startswith("chtrp_") and " " in line:
                    name, _, value = line.rpartition(" ")
                    with contextlib.suppress(ValueError):
                        found[name] = float(value)
    return found


def interesting_metrics(found: dict[str, float]) -> str:
    keep = [
        f"{name.removeprefix('chtrp_')}={value:g}"
        for name, value in sorted(found.items())
        if value
        and not name.endswith(("_bucket", "_created"))
        and any(
            word in name
            for word in (
                "sent_total",
                "conflicts",
                "errors",
                "bad_doc",
                "adopted",
                "failed",
                "couch_write",
            )
        )
    ]
    return ", ".join(keep) or "none non-zero"


def couch_summary(requests: Counter[str], per: int, what: str) -> str:
    """The daemon's CouchDB requests, from the server's request log."""
    total = sum(requests.values())
    shown = ", ".join(f"`{kind}` {count:,}" for kind, count in requests.most_common())
    return (
        f"- The daemon's CouchDB requests on this db (the server's request log, less the "
        f"benchmark's own): {total:,} ({total / per:.1f} per {what}): {shown}."
    )


def sent_notes(sent: list[dict[str, str]], handling: list[float]) -> list[str]:
    return [
        f"- The daemon's `message_sent duration_ms` (waiting for one of its send slots, then "
        f"the POST): {distribution(log_ms(sent))}.",
        f"- The sandbox's own handling of a broadcast POST (arrival to answer): "
        f"{distribution([v * 1000 for v in handling])}.",
    ]


def daemon_notes(daemon: Daemon) -> list[str]:
    problems = daemon.problems()
    shown = ", ".join(f"{k} x{v}" for k, v in sorted(problems.items())) or "none"
    return [f"- Daemon warnings/errors in its log: {shown} (log: `{daemon.log_path}`)."]


def profile_summary(daemon: Daemon, limit: int = 25) -> list[str]:
    if daemon.profile_path is None or not daemon.profile_path.exists():
        return []
    import io

    out = io.StringIO()
    stats = pstats.Stats(str(daemon.profile_path), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    text = out.getvalue()
    start = text.find("   ncalls")
    body = text[start:] if start >= 0 else text
    return [
        "",
        f"cProfile of the daemon (top {limit} by own time; the profiler slows it down):",
        "",
        "```text",
        *body.rstrip().splitlines(),
        "```",
    ]


async def doc_states(couch: CouchAdmin, ids: list[str]) -> dict[str, str | None]:
    """The first task's state of each doc (one `_all_docs` request per 1,000 ids)."""
    states: dict[str, str | None] = {}
    for start in range(0, len(ids), 1000):
        body = await couch.request(
            "POST", f"/{couch.db}/_all_docs?include_docs=true", {"keys": ids[start : start + 1000]}
        )
        for row in body["rows"]:
            doc = row.get("doc") or {}
            tasks = doc.get("tasks") or [{}]
            states[row["key"]] = tasks[0].get("state")
    return states


class WriteWatch:
    """When every document had reached a revision generation, seen on `_changes` without
    documents (about 0.05 ms a row on CouchDB 3, and one row per document however often it
    was written): the benchmark learns when the daemon's last write-back landed without
    reading every document (an `_all_docs?include_docs` read of 5,000 costs CouchDB 3 about
    2.5 s, which would count as the daemon's time). It starts reading near the end (`follow`,
    once most messages are posted), so it takes little server time while the daemon works;
    the time it reports is when it saw the last one, an upper bound. `confirm_sent` then
    reads every state."""

    PAUSE_S = 0.05  # between requests, so that rows come in pages

    def __init__(self, couch: CouchAdmin, ids: list[str], generation: int) -> None:
        self._couch = couch
        self._waiting = set(ids)
        self._generation = generation
        self._since: Any = None
        self.requests = 0

    async def mark(self) -> None:
        """Remember the feed's position (before the documents are written)."""
        body = await self._couch.request(
            "GET", f"/{self._couch.db}/_changes?descending=true&limit=1"
        )
        self._since = body.get("last_seq")

    def follow(self, within: float) -> asyncio.Task[float | None]:
        """Start reading; the task ends with the time every document was seen at the
        generation (None: not within `within`)."""
        return asyncio.create_task(self._follow(within))

    async def _follow(self, within: float) -> float | None:
        deadline = time.monotonic() + within
        since = self._since
        while self._waiting and time.monotonic() < deadline:
            if self.requests:
                await asyncio.sleep(self.PAUSE_S)
            query = urlencode(
                {
                    "since": since if isinstance(since, str) else json.dumps(since),
                    "feed": "longpoll",
                    "timeout": 1000,
                    "style": "main_only",
                }
            )
            body = await self._couch.request("GET", f"/{self._couch.db}/_changes?{query}")
            self.requests += 1
            for row in body.get("results") or []:
                rev = str((row.get("changes") or [{}])[0].get("rev", "0-"))
                if int(rev.split("-", 1)[0]) >= self._generation:
                    self._waiting.discard(row.get("id"))
            since = body.get("last_seq", since)
        return None if self._waiting else time.perf_counter()


async def confirm_sent(couch: CouchAdmin, ids: list[str], within: float = 120.0) -> int:
    """Wait until every doc's task is past `forwarded-to-gateway`; returns the reads made."""
    remaining = list(ids)
    reads = 0
    deadline = time.monotonic() + within
    while remaining:
        reads += 1
        states = await doc_states(couch, remaining)
        remaining = [doc_id for doc_id in remaining if states.get(doc_id) in (*SENDABLE, None)]
        if remaining:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(remaining)} messages never left {SENDABLE}")
            await asyncio.sleep(0.05)
    return reads


# --- 1. latency ----------------------------------------------------------------------------------


async def bench_latency(ctx: Context) -> Result:
    sizes = ctx.sizes
    result = Result("latency", "Latency: pending written → broadcast POST at RapidPro")
    async with serve_sandbox(SandboxConfig()) as rapidpro:
        couch = await create_medic(ctx.server, "bench-latency", rapidpro.url)
        daemon = ctx.daemon("latency", couch)
        try:
            await daemon.start()
            meter = ctx.meter(daemon)
            workload = Workload(seed=1)
            latencies: list[float] = []
            puts: list[float] = []
            ids: list[str] = []
            for i in range(sizes.latency_warmup + sizes.latency_messages):
                text = f"Bench latency {i}: ANC visit due this week."
                doc = workload.pending(text)
                arrival = rapidpro.probe.expect(text)
                started = time.perf_counter()
                await couch.put(doc)
                written = time.perf_counter()
                at = await wait_for(arrival, daemon, 30, f"the broadcast of message {i}")
                if i >= sizes.latency_warmup:
                    latencies.append(at - started)
                    puts.append(written - started)
                    ids.append(doc["_id"])
                await asyncio.sleep(sizes.latency_settle_s)
            await confirm_sent(couch, ids)
            meter.stop()
            sent = daemon.events("message_sent")
            metrics = await daemon_metrics(daemon)
        finally:
            await daemon.stop()
            await drop_medic(couch)
        handling = rapidpro.probe.handling
    requests = await couch_requests(ctx.backend, couch)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    result.rows = [
        Row("p50, PUT → POST arrives", ms(p50), "≤ 50 ms", p50 <= 0.050),
        Row("p99", ms(p99), "≤ 500 ms", p99 <= 0.500),
    ]
    result.details = [
        f"- {len(latencies)} messages (after {sizes.latency_warmup} warm-up ones), each a new "
        "doc with one pending task written with one `PUT`, the next written "
        f"{sizes.latency_settle_s * 1000:.0f} ms after the previous one's broadcast arrived. "
        "Clock: `perf_counter` in the benchmark process, from just before the PUT to the moment "
        "the sandbox received the POST (an outer aiohttp middleware on the sandbox app).",
        f"- Latency: {distribution([v * 1000 for v in latencies])}; "
        f"mean {statistics.fmean(latencies) * 1000:.1f} ms.",
        f"- Of which the PUT itself (until CouchDB answered): {distribution([v * 1000 for v in puts])}.",  # noqa: E501
        *sent_notes(sent, handling),
        f"- All {len(ids)} confirmed `received-by-gateway` or later in CouchDB afterwards.",
        f"- {meter.summary()}.",
        f"- Daemon counters: {interesting_metrics(metrics)}.",
        couch_summary(requests, sizes.latency_warmup + sizes.latency_messages, "message"),
        *daemon_notes(daemon),
        *profile_summary(daemon),
    ]
    return result


# --- 2. throughput -------------------------------------------------------------------------------

#: Rounds of the throughput benchmark: each a fresh database, the daemon's burst, then one pass
#: of the server's ceiling on the same documents. The ratio reported is the median round's.
THROUGHPUT_ROUNDS = 3
#: Single-doc GETs after each ceiling pass (what a request costs the server, whatever it carries).
CEILING_GETS = 200


@dataclass
class ThroughputRound:
    """One round: the daemon's burst of `n` messages, then the server's ceiling on them."""

    number: int
    n: int
    insert_s: float  # the insert of the n pending documents, until answered
    first_post: float  # seconds from the insert's answer to the first broadcast POST
    last_post: float  # ... to the n-th
    daemon_s: float  # ... to all written back (the daemon's clock)
    watch_requests: int
    reads: int
    ceiling_s: float  # one pass of the ceiling
    ceiling_cpu: float  # the server's CPU seconds in it
    get_s: float  # a single-doc GET, each
    get_cpu: float
    meter: CpuMeter
    server_used: float  # the server's CPU seconds while the daemon worked
    sent: list[dict[str, str]]
    handling: list[float]
    metrics: dict[str, float]
    requests: Counter[str]
    notes: list[str]
    profile: list[str]

    @property
    def rate(self) -> float:
        return self.n / self.daemon_s

    @property
    def ceiling(self) -> float:
        return self.n / self.ceiling_s

    @property
    def ratio(self) -> float:
        return self.rate / self.ceiling


async def throughput_round(ctx: Context, number: int) -> ThroughputRound:
    n = ctx.sizes.throughput_messages
    batch = ctx.sizes.ceiling_batch
    async with serve_sandbox(SandboxConfig()) as rapidpro:
        couch = await create_medic(ctx.server, f"bench-throughput-{number}", rapidpro.url)
        daemon = ctx.daemon(f"throughput-{number}", couch)
        try:
            await daemon.start()
            workload = Workload(seed=2 + number)
            docs = [
                workload.pending(f"Bench throughput {i}: please come for a visit.")
                for i in range(n)
            ]
            ids = [doc["_id"] for doc in docs]
            # Generation 3: inserted, claimed, written back (a claim written again on a
            # cluster makes it later; then the reads below decide).
            watch = WriteWatch(couch, ids, generation=3)
            await watch.mark()
            meter = ctx.meter(daemon)
            started = time.perf_counter()
            rows = await couch.bulk(docs)
            written = time.perf_counter()
            if any("error" in row for row in rows):
                raise RuntimeError("the _bulk_docs of pending messages was refused in part")
            near_end = n - n // 10
            await wait_broadcasts(rapidpro, daemon, near_end)
            watching = watch.follow(within=900.0)
            last_post = await wait_broadcasts(rapidpro, daemon, n)
            first_post = rapidpro.probe.arrivals[0]
            seen = await watching
            meter.stop()
            reads = await confirm_sent(couch, ids)
            # The watch's time counts only if the first read found every doc written back;
            # otherwise the read that did.
            confirmed = seen if seen is not None and reads == 1 else time.perf_counter()
            sent = daemon.events("message_sent")
            metrics = await daemon_metrics(daemon)
        finally:
            await daemon.stop()
        try:
            # The server's own ceiling on the same docs, with the daemon stopped.
            ceiling_cpu = ctx.server_cpu()
            pass_started = time.perf_counter()
            for start in range(0, n, batch):
                chunk = ids[start : start + batch]
                body = await couch.request(
                    "POST", f"/{couch.db}/_all_docs?include_docs=true", {"keys": chunk}
                )
                updated = []
                for row in body["rows"]:
                    doc = row["doc"]
                    task = doc["tasks"][0]
                    task["state"] = "sent"
                    task["state_history"].append({"state": "sent", "timestamp": "now"})
                    updated.append(doc)
                answers = await couch.bulk(updated)
                if any("error" in row for row in answers):
                    raise RuntimeError("the ceiling's _bulk_docs was refused in part")
            ceiling_s = time.perf_counter() - pass_started
            ceiling_cpu = ctx.server_cpu() - ceiling_cpu
            # What one request costs the server, whatever it carries: single-doc GETs.
            gets = ids[: min(CEILING_GETS, n)]
            get_cpu, get_started = ctx.server_cpu(), time.perf_counter()
            for doc_id in gets:
                await couch.get(doc_id)
            get_s = (time.perf_counter() - get_started) / len(gets)
            get_cpu = (ctx.server_cpu() - get_cpu) / len(gets)
        finally:
            await drop_medic(couch)
        handling = rapidpro.probe.handling
    return ThroughputRound(
        number=number,
        n=n,
        insert_s=written - started,
        first_post=first_post - written,
        last_post=last_post - written,
        # The daemon can do nothing before the insert is committed; the ceiling's documents
        # exist before its clock starts: both clocks run from "the documents are there".
        daemon_s=confirmed - written,
        watch_requests=watch.requests,
        reads=reads,
        ceiling_s=ceiling_s,
        ceiling_cpu=ceiling_cpu,
        get_s=get_s,
        get_cpu=get_cpu,
        meter=meter,
        server_used=ctx.server_used(meter),
        sent=sent,
        handling=handling,
        metrics=metrics,
        requests=await couch_requests(ctx.backend, couch),
        notes=daemon_notes(daemon),
        profile=profile_summary(daemon),
    )


async def bench_throughput(ctx: Context) -> Result:
    n = ctx.sizes.throughput_messages
    batch = ctx.sizes.ceiling_batch
    result = Result("throughput", f"Throughput: {n:,} pending messages at once")
    # The machine's noise moves both sides by a third from run to run: each round pairs a
    # burst with a ceiling pass right after it, and the median round's pair counts.
    rounds = [await throughput_round(ctx, number) for number in range(1, THROUGHPUT_ROUNDS + 1)]
    mid = sorted(rounds, key=lambda r: r.ratio)[len(rounds) // 2]
    result.rows = [
        Row("daemon: messages/s until all received-by-gateway", rate(mid.rate)),
        Row(
            f"server: read+`_bulk_docs` update of the same docs ({batch}/batch)", rate(mid.ceiling)
        ),
        Row("ratio daemon / server ceiling", f"{mid.ratio:.2f}", "≥ 0.5", mid.ratio >= 0.5),
    ]
    total_s = mid.insert_s + mid.daemon_s
    result.details = [
        f"- {len(rounds)} rounds, each on a fresh database: {n:,} docs, each with one pending "
        "task, written with one `_bulk_docs` request; the daemon sends them all; then, with "
        "the daemon stopped, one pass of the server's ceiling on the same documents. Figures "
        "are the median round's (by ratio). Every round, daemon ÷ ceiling: "
        + "; ".join(
            f"{r.number}: {rate(r.rate)} ÷ {rate(r.ceiling)} = {r.ratio:.2f}" for r in rounds
        )
        + ".",
        f"- Median round ({mid.number}): the insert took {ms(mid.insert_s)} "
        f"({rate(n / mid.insert_s, ' docs/s')}). The daemon's clock starts when it is answered "
        "(before, the daemon cannot see any of them; the ceiling's documents, likewise, exist "
        "before its clock starts).",
        f"- First broadcast POST after {ms(mid.first_post)}; the {n:,}th after "
        f"{mid.last_post:.2f} s ({rate(n / mid.last_post)} as POSTs); all written back in "
        f"CouchDB (`received-by-gateway` or later) after {mid.daemon_s:.2f} s: seen on "
        f"`_changes` without documents, read from the {n - n // 10:,}th POST on "
        f"({mid.watch_requests} requests), then confirmed by reading every document's state "
        f"({mid.reads} read{'s' if mid.reads != 1 else ''}). Counted from before the insert "
        f"instead: {total_s:.2f} s, {rate(n / total_s)}.",
        f"- Server ceiling: read {batch} docs (`_all_docs?include_docs`, keys), change the task "
        f"state, write them back with `_bulk_docs`, one request after another: "
        f"{mid.ceiling_s:.2f} s for {n:,}. The daemon writes each document twice (claim, then "
        "write-back) and reads each revision back from the feed; its requests overlap where "
        "the ceiling's run one at a time.",
        f"- The server's CPU per unit of work: {mid.ceiling_cpu / n * 1000:.2f} ms per doc in "
        f"the ceiling (read + write, {batch} a request); {mid.get_cpu * 1000:.2f} ms per "
        f"single-doc `GET` ({min(CEILING_GETS, n)} GETs one after another, {ms(mid.get_s)} each); "
        f"{mid.server_used / n * 1000:.2f} ms per message while the daemon sent.",
        *sent_notes(mid.sent, mid.handling),
        f"- {mid.meter.summary()}.",
        f"- Daemon counters: {interesting_metrics(mid.metrics)}.",
        couch_summary(mid.requests, n, "message"),
        "- Default daemon settings except the budgets (off); poll interval 60 s (the default), "
        "so status polling hardly overlaps.",
        *mid.notes,
        *mid.profile,
    ]
    return result


# --- 3. polling cost ------------------------------------------------------------------------------


async def poll_rounds(
    daemon: Daemon, tracked: int, count: int, skip: int, within: float
) -> list[dict[str, str]]:
    """The first `count` `status_poll_completed` lines after line `skip` with all tracked."""
    deadline = time.monotonic() + within
    while True:
        rounds = daemon.events("status_poll_completed")[skip:]
        full = [r for r in rounds if r.get("tracked") == str(tracked)]
        if len(full) >= count:
            return full[:count]
        daemon.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {count} poll rounds with tracked={tracked} in {within} s")
        await asyncio.sleep(0.5)


async def bench_polling(ctx: Context) -> Result:
    sizes = ctx.sizes
    result = Result("polling", "Polling cost: RapidPro requests per poll round")
    # `wired` is never final: every message stays `forwarded-by-gateway` and tracked.
    config = SandboxConfig(default_outcome=("wired",), step_seconds=0.05)
    levels: list[tuple[int, list[dict[str, str]]]] = []
    async with serve_sandbox(config) as rapidpro:
        couch = await create_medic(ctx.server, "bench-polling", rapidpro.url)
        daemon = ctx.daemon("polling", couch, poll_interval=f"{sizes.poll_interval_s:g}")
        try:
            await daemon.start()
            meter = ctx.meter(daemon)
            workload = Workload(seed=3)
            sent = 0
            for level in sizes.poll_levels:
                docs = [
                    workload.pending(f"Bench polling {i}: reminder.") for i in range(sent, level)
                ]
                await bulk_load(couch, docs)
                await wait_broadcasts(rapidpro, daemon, level)
                sent = level
                skip = len(daemon.events("status_poll_completed"))
                rounds = await poll_rounds(daemon, level, sizes.poll_rounds, skip, 300)
                levels.append((level, rounds))
                counts = [r["requests"] for r in rounds]
                say(f"polling: {level:,} in flight, requests per round {counts}")
            meter.stop()
            all_rounds = daemon.events("status_poll_completed")
            gets = rapidpro.probe.message_gets
            get_handling = rapidpro.probe.message_get_handling
            metrics = await daemon_metrics(daemon)
        finally:
            await daemon.stop()
            await drop_medic(couch)
    requests = await couch_requests(ctx.backend, couch)
    logged = sum(int(r.get("requests") or 0) for r in all_rounds)
    for level, rounds in levels:
        per_round = [int(r["requests"]) for r in rounds]
        worst = max(per_round)
        per_1000 = worst / level * 1000
        result.rows.append(
            Row(
                f"{level:,} in flight: requests/round (CHT: {level:,})",
                f"{worst} ({per_1000:.1f} per 1,000)",
                "≤ 5 per 1,000",
                per_1000 <= 5,
            )
        )
        durations = log_ms(rounds)
        result.details.append(
            f"- {level:,} in flight: rounds "
            + "; ".join(
                f"requests={r['requests']} rows={r['rows']} matched={r['matched']} "
                f"updated={r['updated']} window_s={r['window_s']} duration_ms={r['duration_ms']}"
                for r in rounds
            )
            + f" (median round {statistics.median(durations):.0f} ms)."
        )
    result.details += [
        f"- Messages sent through the daemon to a sandbox whose messages go `queued` → `wired` "
        f"and stay there, so each stays tracked (`forwarded-by-gateway`). Poll interval "
        f"{sizes.poll_interval_s:g} s; figures are the `requests=` of the daemon's "
        "`status_poll_completed` lines, taken from the first rounds that tracked every message.",
        f"- Cross-check: the sandbox answered {gets} `GET /api/v2/messages.json` over the whole "
        f"benchmark; the daemon's log lines sum to {logged} over {len(all_rounds)} rounds.",
        "- The sandbox's own time per `GET messages.json` page (it finds the window's first "
        "row by bisection and walks from there, in the benchmark process): "
        f"{distribution([v * 1000 for v in get_handling])}; the rest of a round is the daemon "
        "(matching, and reading every matched document back from CouchDB, see the notes).",
        f"- {meter.summary()}.",
        f"- Daemon counters: {interesting_metrics(metrics)}.",
        couch_summary(requests, sizes.poll_levels[-1], "message"),
        *daemon_notes(daemon),
        *profile_summary(daemon),
    ]
    return result


# --- 4 and 5. catch-up and memory ----------------------------------------------------------------


async def read_feed(
    couch: CouchAdmin, expected: int, batch: int = 500, selector: dict[str, Any] | None = None
) -> tuple[int, float, int]:
    """Read the whole `_changes` feed as the daemon does (`CouchClient.changes`): longpoll pages
    of `batch` with `include_docs` and `style=main_only`, filtered by `selector` when given
    (then rows are the matching ones, and the read ends at the first short page). Returns
    (rows, seconds, requests)."""
    since: Any = None
    rows = requests = 0
    started = time.perf_counter()
    while True:
        params = {
            "limit": str(batch),
            "style": "main_only",
            "include_docs": "true",
            "feed": "longpoll",
            "heartbeat": "10000",
            "timeout": "60000",
        }
        if since is not None:
            params["since"] = since if isinstance(since, str) else str(since)
        if selector is not None:
            params["filter"] = "_selector"
        query = "&".join(f"{k}={v}" for k, v in params.items())
        if selector is None:
            body = await couch.request("GET", f"/{couch.db}/_changes?{query}")
        else:
            body = await couch.request(
                "POST", f"/{couch.db}/_changes?{query}", {"selector": selector}
            )
        requests += 1
        results = body.get("results") or []
        rows += len(results)
        since = body.get("last_seq")
        if len(results) < batch or (selector is None and rows >= expected):
            return rows, time.perf_counter() - started, requests


async def run_catchup(ctx: Context, name: str, total: int) -> dict[str, Any]:
    """Load `total` docs (1% pending), measure the server's feed read, then the daemon's
    catch-up from no checkpoint; returns the figures (and the daemon's peak RSS)."""
    pending = total // 100
    async with serve_sandbox(SandboxConfig()) as rapidpro:
        couch = await create_medic(ctx.server, f"bench-{name}", rapidpro.url)
        daemon = ctx.daemon(name, couch)
        try:
            workload = Workload(seed=4)
            docs = workload.catchup_docs(total)
            pending_ids = [d["_id"] for d in docs if d.get("kujua_message")]
            say(f"{name}: loading {total:,} docs")
            load_rate = await bulk_load(couch, docs)
            del docs
            info = await couch.request("GET", f"/{couch.db}")
            in_feed = int(info["doc_count"]) + int(info.get("doc_del_count") or 0)
            rows, plain_s, plain_requests = await read_feed(couch, in_feed)
            if rows != in_feed:
                raise RuntimeError(f"the feed read {rows} rows, the db holds {in_feed} docs")
            # On CouchDB the daemon asks with its selector (`gateway.feed_selector`): the
            # server's rate with the same parameters is the one to compare with.
            selector = None if isinstance(ctx.backend, PouchBackend) else feed_selector()
            matched, read_s, read_requests = (
                await read_feed(couch, in_feed, selector=selector)
                if selector is not None
                else (rows, plain_s, plain_requests)
            )
            say(f"{name}: server reads the feed at {rate(in_feed / read_s)}; starting the daemon")
            await daemon.start(wait_healthy=False)
            meter = ctx.meter(daemon)  # after the spawn: the new process has used ~0 CPU yet
            # No progress measure: the first broadcasts may come late if the feed is slow.
            last = await wait_for(
                rapidpro.probe.reach(pending), daemon, 900, f"{pending} broadcasts"
            )
            await confirm_sent(couch, pending_ids)
            memory = daemon.memory()
            meter.stop()
            connected = daemon.events("changes_feed_connected")
            sent = daemon.events("message_sent")
            metrics = await daemon_metrics(daemon)
        finally:
            await daemon.stop()
            await drop_medic(couch)
        handling = rapidpro.probe.handling
    requests = await couch_requests(ctx.backend, couch)
    elapsed = last - daemon.spawned_at
    feed_start = log_time(connected[0]) - daemon.spawned_wall if connected else float("nan")
    return {
        "total": total,
        "pending": pending,
        "in_feed": in_feed,
        "load_rate": load_rate,
        "server_rate": in_feed / read_s,
        "server_s": read_s,
        "server_requests": read_requests,
        "selector": selector is not None,
        "matched": matched,
        "plain_rate": in_feed / plain_s,
        "plain_s": plain_s,
        "plain_requests": plain_requests,
        "elapsed": elapsed,
        "daemon_rate": in_feed / elapsed,
        "feed_start": feed_start,
        "daemon_rate_after_start": in_feed / (elapsed - feed_start),
        "vmhwm": memory.get("VmHWM"),
        "vmrss": memory.get("VmRSS"),
        "meter": meter,
        "sent": sent,
        "handling": handling,
        "requests": requests,
        "metrics": metrics,
        "daemon": daemon,
    }


async def catchup_figures(ctx: Context) -> dict[str, Any]:
    """The big catch-up run, shared by the catch-up and memory benchmarks."""
    if "catchup" not in ctx.shared:
        ctx.shared["catchup"] = await run_catchup(ctx, "catchup", ctx.sizes.catchup_docs)
    figures: dict[str, Any] = ctx.shared["catchup"]
    return figures


async def bench_catchup(ctx: Context) -> Result:
    c = await catchup_figures(ctx)
    result = Result("catchup", f"Catch-up: {c['total']:,} docs, no checkpoint")
    close = c["daemon_rate"] >= 0.9 * c["server_rate"]
    result.rows = [
        Row(
            "daemon: changes/s until all pending sent",
            rate(c["daemon_rate"]),
            "≥ 5,000/s, or ≥ 90% of the server's read rate",
            c["daemon_rate"] >= 5000 or close,
        ),
        Row(
            "server: `_changes` read rate, same parameters",
            rate(c["server_rate"]),
        ),
        Row("ratio daemon / server", f"{c['daemon_rate'] / c['server_rate']:.2f}"),
    ]
    daemon: Daemon = c["daemon"]
    result.details = [
        f"- {c['total']:,} docs (+ the settings doc): a third contacts, the rest app-form "
        f"reports, 4% of all with a long-delivered auto-reply task, 1% ({c['pending']:,}, every "
        "100th doc, the last one included) a message with a pending task. Loaded with "
        f"`_bulk_docs` (2,000/request) at {rate(c['load_rate'], ' docs/s')} before the daemon "
        "starts.",
        f"- Server, every row: {c['in_feed']:,} rows read in {c['plain_s']:.2f} s "
        f"({rate(c['plain_rate'])}) with {c['plain_requests']} sequential requests "
        "(`limit=500&style=main_only&include_docs=true&feed=longpoll`), JSON decoded in "
        "Python.",
        *(
            [
                f"- Server, as the daemon asks on CouchDB (the same, `filter=_selector` with "
                f"`gateway.feed_selector()`: only documents with messages, deletions and its "
                f"own): the {c['in_feed']:,} changes in {c['server_s']:.2f} s "
                f"({rate(c['server_rate'])}), {c['matched']:,} rows sent, "
                f"{c['server_requests']} requests. This is the rate compared with."
            ]
            if c["selector"]
            else []
        ),
        f"- Daemon: started with no checkpoint; the {c['pending']:,}th broadcast arrived "
        f"{c['elapsed']:.2f} s after the process was spawned ({c['in_feed']:,} changes → "
        f"{rate(c['daemon_rate'])}). Its feed connected {c['feed_start']:.2f} s after the spawn "
        f"(Python start-up, settings, credentials, checkpoint); from there "
        f"{rate(c['daemon_rate_after_start'])}.",
        *sent_notes(c["sent"], c["handling"]),
        f"- {c['meter'].summary()}.",
        f"- Daemon counters: {interesting_metrics(c['metrics'])}.",
        couch_summary(c["requests"], c["in_feed"], "doc in the db"),
        *daemon_notes(daemon),
        *profile_summary(daemon),
    ]
    return result


async def bench_memory(ctx: Context) -> Result:
    small = await run_catchup(ctx, "memory-small", ctx.sizes.memory_small_docs)
    big = await catchup_figures(ctx)
    result = Result("memory", "Memory: the daemon's peak RSS (VmHWM)")
    limit_kb = 100 * 1024
    growth = (big["vmhwm"] or 0) - (small["vmhwm"] or 0)
    result.rows = [
        Row(
            f"{small['total']:,} docs",
            mib(small["vmhwm"]),
            "≤ 100 MB",
            (small["vmhwm"] or limit_kb + 1) <= limit_kb,
        ),
        Row(
            f"{big['total']:,} docs",
            f"{mib(big['vmhwm'])} ({growth / 1024:+.1f} MB)",
            "≤ 100 MB, flat (≤ +10 MB)",
            (big["vmhwm"] or limit_kb + 1) <= limit_kb and growth <= 10 * 1024,
        ),
    ]
    result.details = [
        "- VmHWM from `/proc/<pid>/status` of the daemon process, read once it had caught up "
        "with the whole feed and every pending message was confirmed written back (the same "
        "procedure as the catch-up benchmark, same document mix). VmRSS at that moment: "
        f"{mib(small['vmrss'])} and {mib(big['vmrss'])}.",
    ]
    return result


# --- 6. webhook ----------------------------------------------------------------------------------


async def bench_webhook(ctx: Context) -> Result:
    sizes = ctx.sizes
    n, clients = sizes.webhook_requests, sizes.webhook_clients
    result = Result("webhook", f"Webhook: {clients} concurrent clients, {n:,} incoming SMS")
    run_id = os.urandom(4).hex()
    async with serve_sandbox(SandboxConfig()) as rapidpro:
        couch = await create_medic(ctx.server, "bench-webhook", rapidpro.url)
        await couch.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
        daemon = ctx.daemon("webhook", couch)
        url = f"http://127.0.0.1:{daemon.port}/api/v2/sms/rapidpro/incoming-messages"
        headers = {"Authorization": f"Token {INCOMING_KEY}"}
        statuses: Counter[int] = Counter()
        errors: dict[int, str] = {}
        latencies: list[float] = []
        try:
            await daemon.start()
            connector = aiohttp.TCPConnector(limit=clients)
            async with aiohttp.ClientSession(connector=connector) as session:

                async def post(i: int) -> None:
                    body = {
                        "id": f"bench-{run_id}-{i}" if i >= 0 else f"probe-{run_id}",
                        "from": "+254700000001",
                        "content": "some text",
                    }
                    started = time.perf_counter()
                    try:
                        async with session.post(url, json=body, headers=headers) as resp:
                            text = await resp.text()
                            status = resp.status
                    except aiohttp.ClientError as exc:
                        status, text = 0, f"{type(exc).__name__}: {exc}"
                    latencies.append(time.perf_counter() - started)
                    statuses[status] += 1
                    if status != 200:
                        errors.setdefault(status, text[:200])

                await post(-1)  # probe (also warms the connection path)
                if statuses[200] == 1:
                    latencies.clear()
                    statuses.clear()
                    counter = itertools.count()
                    meter = ctx.meter(daemon)

                    async def client() -> None:
                        while (i := next(counter)) < n:
                            await post(i)

                    started = time.perf_counter()
                    await asyncio.gather(*(client() for _ in range(clients)))
                    elapsed = time.perf_counter() - started
                    meter.stop()
            stored = 0
            if statuses[200] == n:
                body = await couch.request(
                    "GET",
                    f'/{couch.db}/_all_docs?startkey="sms-rapidpro:bench-{run_id}-"'
                    f'&endkey="sms-rapidpro:bench-{run_id}-\ufff0"',
                )
                stored = len(body["rows"])
        finally:
            await daemon.stop()
            await drop_medic(couch)
    handled = daemon.events("webhook_handled")
    requests = await couch_requests(ctx.backend, couch)
    failed = sum(count for status, count in statuses.items() if status != 200)
    if failed or stored != n:
        shown = "; ".join(
            f"HTTP {s} x{c}" + (f" ({errors[s]})" if s in errors else "")
            for s, c in sorted(statuses.items())
        )
        if sum(statuses.values()) == 1:
            why = f"the probe request answered {shown}, so the load was not sent"
        elif failed:
            why = f"{failed:,} of {n:,} requests failed: {shown}"
        else:
            why = f"all {n:,} answered 200 but {stored:,} reports were found in CouchDB"
        result.rows = [
            Row("requests/s", "not measurable yet", "—", None),
            Row("p99", "not measurable yet", "—", None),
        ]
        result.details = [
            f"- The webhook does not work yet, so no figure is given: {why}.",
            "- Re-run with `bench/run --only webhook` once the webhook is finished.",
            *daemon_notes(daemon),
        ]
        return result
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    result.rows = [
        Row("requests/s", rate(n / elapsed)),
        Row("p99 (p50)", f"{ms(p99)} ({ms(p50)})"),
    ]
    result.details = [
        f"- {n:,} `POST /api/v2/sms/rapidpro/incoming-messages` with distinct ids from "
        f"{clients} concurrent clients (one aiohttp session, {clients} connections), "
        f"`Authorization: Token …` checked against the `rapidpro:incoming` vault credential; "
        f"all answered 200 and all {stored:,} reports are in CouchDB.",
        f"- Latency per request, as the clients saw it: "
        f"{distribution([v * 1000 for v in latencies])}.",
        f"- The daemon's own handling time (`webhook_handled ms`): "
        f"{distribution(log_ms(handled, 'ms'))}.",
        f"- {meter.summary()}.",
        couch_summary(requests, n, "request"),
        *daemon_notes(daemon),
        *profile_summary(daemon),
    ]
    return result


# --- 7. draining a backlog under RapidPro's throttle ----------------------------------------------


def window_counts(times: list[float], start: float, window: float) -> list[int]:
    """POSTs in each whole window of `window` seconds from `start`."""
    if not times:
        return []
    whole = int((max(times) - start) // window)
    return [sum(1 for t in times if start + k * window <= t < start + (k + 1) * window)
            for k in range(whole)]  # fmt: skip


async def bench_throttle(ctx: Context) -> Result:
    sizes = ctx.sizes
    n, limit, window = sizes.throttle_messages, sizes.throttle_limit, sizes.throttle_window_s
    replicas = 3
    result = Result(
        "throttle",
        f"Throttle: a backlog of {n:,} under TextIt's {limit:,} requests an hour "
        f"(the hour played in {window:g} s), {replicas} replicas",
    )
    config = SandboxConfig(
        rates={"v2": limit, "v2.messages": limit}, throttle_window=window, step_seconds=0.05
    )
    async with serve_sandbox(config) as rapidpro:
        couch = await create_medic(ctx.server, "bench-throttle", rapidpro.url)
        daemon = ctx.daemon(
            "throttle",
            couch,
            replicas=replicas,
            broadcasts_per_hour=str(limit),
            messages_per_hour=str(limit),
            throttle_window=f"{window:g}",
            poll_interval=f"{max(0.5, window / 60):g}",
        )
        try:
            await daemon.start()
            await asyncio.sleep(2.0)  # the replicas hear of each other (presence)
            workload = Workload(seed=7)
            # Oldest due first: each message's reported_date is a millisecond apart.
            docs = []
            base = int(time.time() * 1000) - n
            for i in range(n):
                doc = workload.pending(f"Bench throttle {i}: clinic day reminder.")
                doc["reported_date"] = base + i
                docs.append(doc)
            meter = ctx.meter(daemon)
            started = time.perf_counter()
            await bulk_load(couch, docs)
            await wait_broadcasts(rapidpro, daemon, n // 2, within=60 * window)
            late_text = "Bench throttle: written in the middle of the backlog."
            late = workload.pending(late_text)
            late_written = time.perf_counter()
            await couch.put(late)
            arrival = rapidpro.probe.expect(late_text)
            await wait_broadcasts(rapidpro, daemon, n + 1, within=60 * window)
            late_at = await arrival
            finished = time.perf_counter()
            await confirm_sent(couch, [d["_id"] for d in docs], within=120)
            meter.stop()
            polls = daemon.events("status_poll_completed")
            metrics = await daemon_metrics(daemon)
        finally:
            await daemon.stop()
            await drop_medic(couch)
        requests = list(rapidpro.sandbox.requests)
    refused = Counter(r.path.rsplit("/", 1)[-1] for r in requests if r.status == 429)
    posts = sorted(r.at.timestamp() for r in requests if r.method == "POST" and r.status == 201)
    sent_texts = [
        r.body.get("text") for r in sorted(requests, key=lambda r: r.at)
        if r.method == "POST" and r.status == 201 and isinstance(r.body, dict)
    ]  # fmt: skip
    numbers = [
        t.split()[2].rstrip(":") for t in sent_texts if t and t.startswith("Bench throttle ")
    ]
    order = [int(number) for number in numbers if number.isdigit()]
    inversions = sum(1 for a, b in itertools.pairwise(order) if b < a)
    counts = window_counts(posts, posts[0], window) if posts else []
    steady = counts[1:]  # the first window is the free burst of a full budget
    used = min(steady) / limit if steady else float("nan")
    mean_used = statistics.fmean(steady) / limit if steady else float("nan")
    updated = sum(int(p.get("updated") or 0) for p in polls)
    result.rows = [
        Row("429 answers (broadcasts, messages)", str(sum(refused.values())), "0",
            sum(refused.values()) == 0),
        Row("POSTs per window, after the first, / the limit (lowest)", f"{used:.3f}",
            "≥ 0.95", used >= 0.95),
        Row("messages out of due order", str(inversions), "—"),
        Row("wait of a message written mid-backlog", f"{late_at - late_written:.1f} s"),
    ]  # fmt: skip
    result.details = [
        f"- Sandbox: the current TextIt dialect, `v2` (broadcasts, lookups) and `v2.messages` "
        f"(status polling) each {limit:,} requests per {window:g} s, a sliding log as DRF "
        f"keeps it; the {replicas} daemons are told the same budget and window "
        "(`CHT_RAPIDPRO_BROADCASTS_PER_HOUR`, `_MESSAGES_PER_HOUR`, `_THROTTLE_WINDOW`) and share "
        "it through CouchDB.",
        f"- {n:,} pending messages written at once, due a millisecond apart; all {n + 1:,} sent "
        f"in {finished - started:.1f} s. POSTs per window of {window:g} s from the first: "
        f"{counts} (limit {limit:,}; mean after the first {mean_used:.3f} of it).",
        f"- Sending order: {inversions} of {len(order):,} broadcasts went out before an "
        "older-due one (replicas sending side by side interleave their shares).",
        f"- A message written when half the backlog was sent reached RapidPro "
        f"{late_at - late_written:.1f} s later (the rest of the backlog is older-due).",
        f"- Status polling meanwhile: {len(polls)} rounds, {updated:,} task states updated; "
        f"429s by endpoint: {dict(refused) or 'none'}.",
        f"- {meter.summary()}.",
        f"- Daemon counters: {interesting_metrics(metrics)}.",
        *daemon_notes(daemon),
    ]
    return result


# --- 8. memory per tracked message (issue 14 item 5) ------------------------------------------


def inflight_history(sandbox: Any, count: int, seed: int) -> list[dict[str, Any]]:
    """`count` messages of ours RapidPro shows `wired` forever (no delivery reports), sent in
    the last ten minutes, and CHT's documents for them (forwarded-by-gateway, gateway_ref)."""
    workload = Workload(seed=seed)
    now = sandbox.now()
    records, docs = [], []
    for _ in range(count):
        created = now - timedelta(seconds=workload.rng.random() * 600)
        urn = f"tel:{workload.phone()}"
        broadcast = sandbox.next_broadcast_id()
        records.append(
            MessageRecord(
                sandbox.next_message_id(),
                workload.uuid(),
                broadcast,
                sandbox.contact_for(urn),
                urn,
                "Your visit is due.",
                build_timeline(created, ["wired"], step=0.5, backoff=300),
            )
        )
        stamp = created.strftime("%Y-%m-%dT%H:%M:%S.") + f"{created.microsecond // 1000:03d}Z"
        task = {
            "messages": [{"uuid": workload.uuid(), "to": urn[4:], "message": "Your visit is due."}],
            "state": "forwarded-by-gateway",
            "state_details": "Wired",
            "gateway_ref": broadcast,
            "state_history": [
                {"state": "forwarded-to-gateway", "timestamp": stamp},
                {"state": "received-by-gateway", "state_details": "Queued", "timestamp": stamp},
                {"state": "forwarded-by-gateway", "state_details": "Wired", "timestamp": stamp},
            ],
        }
        docs.append(message_doc([task], doc_id=workload.uuid()))
    sandbox.add_messages(records)
    return docs


async def full_round(daemon: Daemon, tracked: int, within: float) -> dict[str, Any]:
    """Rounds from the first that tracked all `tracked` until every one was asked about at
    least once (each round asks only what is due): their lines, summed."""
    deadline = time.monotonic() + within
    while True:
        lines = daemon.events("status_poll_completed")
        full = [i for i, line in enumerate(lines) if line.get("tracked") == str(tracked)]
        if full:
            rounds = lines[full[0] :]
            asked = sum(int(line.get("refreshed") or 0) for line in rounds)
            if asked >= tracked and len(rounds) >= 3:
                return {
                    "rounds": len(rounds),
                    "requests": sum(int(line.get("requests") or 0) for line in rounds),
                    "rows": sum(int(line.get("rows") or 0) for line in rounds),
                    "asked": asked,
                    "duration_ms": max(float(line.get("duration_ms") or 0) for line in rounds),
                }
        daemon.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not ask about all {tracked} in {within} s")
        await asyncio.sleep(1)


async def inflight_level(ctx: Context, count: int, *, views: bool) -> dict[str, Any]:
    name = f"inflight-{count}-{'views' if views else 'memory'}"
    async with serve_sandbox(SandboxConfig(default_outcome=("wired",))) as rapidpro:
        couch = await create_medic(ctx.server, "bench-inflight", rapidpro.url)
        daemon = ctx.daemon(name, couch, poll_interval="5")
        try:
            if views:
                await install_cht_views(couch, client=False)
            docs = inflight_history(rapidpro.sandbox, count, seed=7)
            await bulk_load(couch, docs)
            await daemon.start()
            first = await full_round(daemon, count, 1200)
            after_first = daemon.memory()
            # Two more rounds: the figure must not creep up while the same messages are polled.
            seen = len(daemon.events("status_poll_completed"))
            while len(daemon.events("status_poll_completed")) < seen + 2:
                daemon.check_alive()
                await asyncio.sleep(1)
            later = daemon.memory()
            ready = daemon.events("message_log_ready")
        finally:
            await daemon.stop()
            await drop_medic(couch)
    return {
        "count": count,
        "views": views,
        "rss": later.get("VmRSS"),
        "rss_first": after_first.get("VmRSS"),
        "hwm": later.get("VmHWM"),
        "round": first,
        "lookup": ready[-1].get("lookup") if ready else "?",
        "daemon": daemon,
    }


async def bench_inflight(ctx: Context) -> Result:
    levels = ctx.sizes.inflight_levels
    result = Result("inflight", "Memory per tracked message: RSS with messages in flight")
    found = [await inflight_level(ctx, level, views=True) for level in levels]
    fallback = await inflight_level(ctx, levels[-1], views=False)
    limit_kb = 100 * 1024
    base = found[0]
    for item in found:
        growth = (item["rss"] or 0) - (base["rss"] or 0)
        flat = item is base or growth <= 10 * 1024
        result.rows.append(
            Row(
                f"{item['count']:,} in flight (CHT's views): RSS",
                f"{mib(item['rss'])}" + ("" if item is base else f" ({growth / 1024:+.1f} MB)"),
                "≤ 100 MB, flat (≤ +10 MB)",
                (item["rss"] or limit_kb + 1) <= limit_kb and flat,
            )
        )
    growth = (fallback["rss"] or 0) - (base["rss"] or 0)
    result.rows.append(
        Row(
            f"{fallback['count']:,} in flight, no CHT views (ids kept): RSS",
            f"{mib(fallback['rss'])} ({growth / 1024:+.1f} MB)",
            "≤ 100 MB",
            (fallback["rss"] or limit_kb + 1) <= limit_kb,
        )
    )
    result.details = [
        "- Each level: a fresh database holding that many CHT outgoing messages in "
        "`forwarded-by-gateway` with a `gateway_ref`, sent in the last ten minutes, and a "
        "sandbox whose messages for them stay `wired` (no delivery reports), so every one stays "
        "tracked; the daemon (a child process, poll interval 5 s, no budgets) starts without a "
        "checkpoint, reads them all from the feed, and polls. RSS (`VmRSS`) is read once every "
        "tracked message was asked about (rounds ask only what is due: every round while a "
        "message is a few minutes old, then a quarter of its age), and again two rounds later; "
        "`VmHWM` is the peak.",
        *[
            f"- {item['count']:,} in flight ({'CHT views' if item['views'] else 'no views'}, "
            f"lookup={item['lookup']}): RSS after the first full round {mib(item['rss_first'])}, "
            f"two rounds later {mib(item['rss'])}, peak {mib(item['hwm'])}; the "
            f"{item['round']['rounds']} rounds until every message was asked about "
            f"({item['round']['asked']:,} status refreshes): {item['round']['requests']:,} "
            f"requests, {item['round']['rows']:,} rows read, the longest round "
            f"{item['round']['duration_ms'] / 1000:.1f} s."
            for item in [*found, fallback]
        ],
        "- What is kept per tracked message: the index's parallel arrays (17 bytes: broadcast "
        "id, RapidPro's time, last refresh, state code, flags); without CHT's "
        "`medic-sms/messages_by_gateway_ref` view also the document id (16 bytes for a uuid). "
        "A round plans from arrays too (a restart finds everything due at once). Tasks are "
        "read from CouchDB only when a status changes.",
        *[line for item in [*found, fallback] for line in daemon_notes(item["daemon"])],
    ]
    return result


# --- 9. polling a shared workspace (issue 14 item 6), in virtual time ---------------------------


async def virtual_scenario(
    ctx: Context,
    spec: Workspace,
    hours: float,
    *,
    env: dict[str, str] | None = None,
    live_per_minute: float = 0.0,
) -> VirtualRun:
    async with serve_sandbox(SandboxConfig(real_time=False)) as rapidpro:
        couch = await create_medic(ctx.server, "bench-virtual", rapidpro.url)
        try:
            await install_cht_views(couch)
            docs = load_workspace(rapidpro.sandbox, spec, hours)
            if docs:
                await bulk_load(couch, docs)
            clock = VirtualClock(rapidpro.sandbox)
            return await run_virtual(
                couch,
                rapidpro.url,
                rapidpro.sandbox,
                clock,
                hours=hours,
                env=env,
                live_per_minute=live_per_minute,
            )
        finally:
            await drop_medic(couch)


def steady(run: VirtualRun) -> list[Any]:
    """The hours after the first (the first refreshes everything tracked once)."""
    return run.hours[1:] or run.hours


async def bench_shared(ctx: Context) -> Result:
    sizes = ctx.sizes
    result = Result(
        "shared", "Polling a shared workspace: RapidPro requests, virtual hours (issue 14.6)"
    )
    week = Workspace(
        foreign=sizes.shared_foreign, ours=sizes.shared_ours, days=7, ours_within_days=7
    )
    week_run = await virtual_scenario(ctx, week, sizes.shared_hours)
    issue = Workspace(foreign=50_000, ours=100, days=3, ours_within_days=0.05, ours_ago_days=2)
    issue_run = await virtual_scenario(ctx, issue, 1.0)
    alone = Workspace(foreign=0, ours=1000, days=1, ours_within_days=60 / 86400)
    alone_run = await virtual_scenario(ctx, alone, 0.25)
    hours = steady(week_run)
    per_hour = max(h.requests for h in hours)
    oldest = max(h.max_refresh_age_s for h in hours)
    issue_rounds = issue_run.per_round
    alone_rounds = [n for n in alone_run.per_round if n]
    result.rows = [
        Row(
            f"{week.ours:,} ours amid {week.foreign:,} foreign over the week: requests/hour "
            "(worst steady hour)",
            f"{per_hour:,}",
            "≤ 2,000 (the messages budget)",
            per_hour <= 2000,
        ),
        Row(
            "same: oldest status refresh of any tracked message (worst steady hour)",
            f"{oldest / 60:.0f} min",
            "≤ 60 min",
            oldest <= 3600,
        ),
        Row(
            "100 ours sent 2 days ago amid 50,000 foreign over 3 days: requests/round (was 148)",
            f"max {max(issue_rounds)}, {sum(issue_rounds) / len(issue_rounds):.1f} on average",
            "—",
        ),
        Row(
            "1,000 ours just sent, CHT the only traffic: requests per round that asked",
            f"{max(alone_rounds) if alone_rounds else 0}",
            "≤ 5 per 1,000",
            bool(alone_rounds) and max(alone_rounds) <= 5,
        ),
    ]
    result.details = [
        "- The daemon's own `MessageLog` (the real code: CouchDB on this pouchdb-server, the "
        "RapidPro client and its 2,000/h messages budget, the sandbox over HTTP) driven round "
        "after round with a virtual clock shared by the follower, the budget and the sandbox, "
        "60 s per round (the default interval); see `bench/virtual.py`. Ours: CHT documents in "
        "`forwarded-by-gateway` whose RapidPro messages stay `wired` (5% get a delivery report "
        "during the run); foreign: messages of other programmes, `delivered`.",
        f"- Week ({week.foreign:,} foreign, {week.ours:,} ours, both spread over 7 days, "
        f"{sizes.shared_hours:g} virtual hours; the first hour refreshes everything once, at "
        f"the budget's pace): {summary(week_run.hours)}. First rounds: "
        f"{week_run.per_round[:15]}. Wall time {week_run.wall_s:.0f} s.",
        f"- The issue's case (50,000 foreign over 3 days; 100 ours sent within 72 minutes, 2 "
        f"days ago; one virtual hour): {summary(issue_run.hours)}; requests per round: "
        f"{issue_run.per_round}.",
        f"- CHT alone (1,000 ours sent in the last minute, no foreign traffic, 15 virtual "
        f"minutes): requests per round {alone_run.per_round}.",
    ]
    return result


# --- 10. the log follower's extra cost: mirroring and recovery (issue 13) -----------------------


async def bench_log(ctx: Context) -> Result:
    sizes = ctx.sizes
    result = Result(
        "log", "Following RapidPro's log for mirroring and recovery: extra requests per round"
    )
    on = {
        "CHT_RAPIDPRO_MIRROR_OUTGOING": "true",
        "CHT_RAPIDPRO_INCOMING_FLOWS": "0b6a9f6e-2f4b-4c3e-8c9a-1d2e3f4a5b6c",
        "CHT_RAPIDPRO_LOG_GRACE": "60",
    }
    hours = sizes.log_hours
    cases = [
        ("quiet workspace, nothing tracked", Workspace(0, 0, 1, 1), 0.0),
        ("CHT alone, 1,000 ours just sent", Workspace(0, 1000, 1, 60 / 86400), 0.0),
        (
            f"{sizes.log_foreign:,} foreign over the week, 1,000 ours, 100 new foreign/min",
            Workspace(sizes.log_foreign, 1000, 7, 7),
            100.0,
        ),
    ]
    lines = []
    for name, spec, live in cases:
        off_run = await virtual_scenario(
            ctx, dataclasses.replace(spec, broadcasts=[]), hours, live_per_minute=live
        )
        on_run = await virtual_scenario(
            ctx, dataclasses.replace(spec, broadcasts=[]), hours, env=on, live_per_minute=live
        )
        off = sum(off_run.per_round) / len(off_run.per_round)
        with_log = sum(on_run.per_round) / len(on_run.per_round)
        mirrored = sum(r.mirrored for r in on_run.reports)
        result.rows.append(
            Row(
                f"{name}: requests/round, status only → + mirroring and recovery",
                f"{off:.2f} → {with_log:.2f} ({with_log - off:+.2f})",
            )
        )
        lines.append(
            f"- {name} ({hours:g} virtual hour(s)): status only {off_run.per_round[:20]}…; with "
            f"mirroring and recovery {on_run.per_round[:20]}…; {mirrored:,} messages mirrored "
            f"(every outgoing message this daemon did not send is mirrored: on a shared "
            f"workspace, the other programmes' too)."
        )
    result.details = [
        "- The same virtual-time harness as the shared-workspace benchmark; each case once "
        "with delivery status only and once with `CHT_RAPIDPRO_MIRROR_OUTGOING=true` and a "
        "recovery flow. Mirroring and recovery read every new row once (the forward scan: "
        "from the last position, less 30 s of overlap), merged with the scan of young tracked "
        "messages when there is one.",
        *lines,
    ]
    return result


# --- running and reporting ------------------------------------------------------------------------


def backend_benchmarks(backend: Backend) -> tuple[str, ...]:
    """What runs where: everything on one server; on a cluster, what replicas change (the
    throughput and latency of three daemons, one per node)."""
    return ("latency", "throughput") if backend.key == "cluster" else BENCHMARKS


RUNNERS: dict[str, Callable[[Context], Awaitable[Result]]] = {
    "latency": bench_latency,
    "throughput": bench_throughput,
    "polling": bench_polling,
    "catchup": bench_catchup,
    "memory": bench_memory,
    "webhook": bench_webhook,
    "throttle": bench_throttle,
    "inflight": bench_inflight,
    "shared": bench_shared,
    "log": bench_log,
}


def table(results: list[Result]) -> list[str]:
    lines = [
        "| # | benchmark | measure | result | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for number, res in enumerate(results, 1):
        if res.error:
            lines.append(f"| {number} | {res.key} | — | error: {res.error} | — | ✗ |")
            continue
        for row in res.rows:
            met = {True: "✓", False: "✗ missed", None: "—"}[row.met]
            lines.append(
                f"| {number} | {res.key} | {row.measure} | {row.value} | {row.target} | {met} |"
            )
    return lines


def existing_notes(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError:
        return []
    begin, end = text.find(NOTES_BEGIN), text.find(NOTES_END)
    if begin < 0 or end < begin:
        return []
    return text[begin + len(NOTES_BEGIN) : end].strip("\n").splitlines()


def report(
    results: list[Result],
    facts: dict[str, str],
    ctx: Context,
    elapsed: float,
    notes: list[str],
) -> str:
    sizes = ctx.sizes
    kind = "quick run (`--quick`, smaller sizes)" if ctx.args.quick else "full run"
    extra = ""
    if ctx.args.daemon_env:
        extra = " Daemon env overrides: " + ", ".join(
            f"`{k}={v}`" for k, v in ctx.args.daemon_env.items()
        )
    if ctx.args.profile:
        extra += " **The daemon ran under cProfile: figures are slower than real.**"
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `bench/run` ({kind}) on {facts['date']}, in {elapsed / 60:.1f} min.{extra}",
        "Every figure below comes from that run; re-run with `bench/run` (everything: about "
        "15 min on pouchdb-server, 46 min with a CouchDB release), "
        "`bench/run --quick`, or `bench/run --only NAME` (prints only; add `--output` to write).",
        "",
        "## Machine",
        "",
        f"- CPU: {facts['cpu']}",
        f"- RAM: {facts['ram']}",
        f"- OS: {facts['os']}",
        f"- Python: {facts['python']}",
        f"- Node: {facts['node']}, pouchdb-server {facts['pouchdb_server']}",
        *[f"- Server: {title}" for key, title in facts.items() if key.startswith("backend:")],
        f"- Code at the start: {facts['code']} (each benchmark names the code it ran)",
        "- Everything on this one machine: the server (pouchdb-server, or CouchDB's Erlang "
        "nodes), the daemon(s) (child processes) and the benchmark process, which also serves "
        "the RapidPro sandbox (no throttle) and drives the load. They share the cores, so CPU "
        "is reported per process below. Benchmarks marked `[couchdb]` ran on a real CouchDB "
        "single node, `[cluster]` on a real 3-node cluster with a daemon per node; unmarked "
        "ones on pouchdb-server.",
        "",
        "## Summary",
        "",
        *table(results),
        "",
        "## Details",
        "",
    ]
    for number, res in enumerate(results, 1):
        lines += [f"### {number}. {res.title}", ""]
        if res.error:
            lines += [f"Failed: `{res.error}` (code: {res.code}).", ""]
            continue
        lines += [
            *res.details,
            "",
            f"({res.seconds:.0f} s for this benchmark; code: {res.code}. {res.background})",
            "",
        ]
    lines += [
        "## Notes",
        "",
        "Hand-written from the daemon's logs, pouchdb-server's request log and profiles, and kept "
        "when this file is regenerated: check them against the figures above after a re-run.",
        "",
        NOTES_BEGIN,
        *(notes or ["(none yet)"]),
        NOTES_END,
        "",
        f"Sizes: `{sizes}`",
        "",
    ]
    return "\n".join(lines)


def write_report(
    path: Path, results: list[Result], facts: dict[str, str], ctx: Context, elapsed: float
) -> None:
    """(Re)write the results file, keeping its hand-written notes."""
    path.write_text(report(results, facts, ctx, elapsed, existing_notes(path)))


async def run(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM cancels the run like Ctrl-C does, so the daemon and pouchdb-server are stopped.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="cht-rapidpro-bench-"))
    facts = machine_facts()
    say(f"workdir (logs, profiles): {workdir}")
    backends: list[Backend] = []
    if "pouchdb" in args.servers:
        backends.append(PouchBackend(workdir))
    if args.couchdb_release is not None:
        if "couchdb" in args.servers:
            backends.append(CouchBackend(args.couchdb_release, cluster=False))
        if "cluster" in args.servers:
            backends.append(CouchBackend(args.couchdb_release, cluster=True))
    started = time.perf_counter()
    results: list[Result] = []
    if not backends:
        raise SystemExit("no server to run on: see --servers and --couchdb-release")
    ctx = Context(args, sizes, workdir, backends[0])
    for backend in backends:
        names = [n for n in (args.only or BENCHMARKS) if n in backend_benchmarks(backend)]
        if not names:
            continue
        backend.start()
        say(f"=== {backend.title} on {', '.join(backend.urls())}")
        ctx = Context(args, sizes, workdir, backend)
        facts[f"backend:{backend.key}"] = backend.title
        try:
            for name in names:
                if not backend.alive():
                    say("the server died; restarting it")
                    backend.stop(keep_logs_in=workdir)
                    backend.start()
                say(f"--- {name} ({backend.key})")
                background = ""
                if args.quiet_wait > 0:
                    waited, busy = await wait_quiet(args.quiet_wait)
                    background = (
                        f"Before it started, the machine's other processes used {busy:.2f} "
                        f"cores (after waiting {waited:.0f} s for less than 0.25)."
                    )
                    if busy >= 0.25:
                        say(f"the machine is busy ({busy:.2f} cores used by others); going on")
                code = code_version()
                began = time.perf_counter()
                try:
                    res = await RUNNERS[name](ctx)
                except Exception as exc:
                    traceback.print_exc()
                    res = Result(name, name, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
                res.seconds = time.perf_counter() - began
                res.background = background
                res.code = code
                if backend.key != "pouchdb":
                    res.key = f"{res.key} [{backend.key}]"
                res.title = f"{res.title} — {backend.title}"
                results.append(res)
                for line in table([res])[2:]:
                    say(line)
        finally:
            backend.stop(keep_logs_in=workdir)
    elapsed = time.perf_counter() - started
    print()
    print("\n".join(table(results)))
    output = args.output
    if output is None and not (args.only or args.quick or args.profile):
        output = RESULTS
    if output is not None:
        write_report(Path(output), results, facts, ctx, elapsed)
        say(f"wrote {output}")
    say(f"done in {elapsed / 60:.1f} min; logs in {workdir}")
    return 1 if any(r.error for r in results) else 0


def parse_env(values: list[str]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--daemon-env {item!r}: expected NAME=VALUE")
        env[key] = value
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a minute or two)")
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="write the results here (default: bench/RESULTS.md for a full run, "
        "nothing for --quick, --only or --profile)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the daemon under cProfile and add its top functions to the details",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="before each benchmark, wait up to this long for other processes to go quiet "
        "(a shared machine skews every figure); 0 to skip (default 60)",
    )
    parser.add_argument(
        "--couchdb-release",
        type=Path,
        default=os.environ.get("CHT_RAPIDPRO_TEST_COUCHDB_RELEASE") or None,
        metavar="DIR",
        help="also run every benchmark on Apache CouchDB 3 from this release directory (a "
        "single node), and latency and throughput on a 3-node cluster of it with a daemon per "
        "node (default: $CHT_RAPIDPRO_TEST_COUCHDB_RELEASE; how to build one: "
        "../shared/spec/couchdb-real.md)",
    )
    parser.add_argument(
        "--servers",
        default="pouchdb,couchdb,cluster",
        help="which servers to run on, of pouchdb, couchdb (single node), cluster "
        "(default: all that are available)",
    )
    parser.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the daemon, e.g. CHT_RAPIDPRO_SEND_CONCURRENCY=32",
    )
    args = parser.parse_args()
    args.daemon_env = parse_env(args.daemon_env)
    if args.only:
        args.only = [name for name in BENCHMARKS if name in args.only]
    logs.configure("warning", "console")  # the sandbox's request log would drown the output
    try:
        return asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
