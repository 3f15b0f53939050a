"""The RapidPro log follower over virtual hours: the real code, a virtual clock.

Issue 14 item 6 asks what status refresh costs on a workspace shared with other programmes
(a million foreign messages over the week): how many requests an hour, and whether every
tracked message is still refreshed at least hourly. That takes hours to see at the default
60 s interval, so this harness runs the daemon's own `MessageLog` (status, mirroring and
recovery; real CouchDB client on the benchmark's pouchdb-server, real RapidPro client, real
budget) against the sandbox, with one clock shared by the follower, the client-side budget and
the sandbox, moved 60 s per round. Nothing is simulated but time: every request is a real HTTP
request the sandbox answers from its million messages, and every figure comes from the run.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import aiohttp

from cht_rapidpro.chtconfig import ChtConfig
from cht_rapidpro.config import Settings
from cht_rapidpro.couch.client import BulkWriter, CouchClient
from cht_rapidpro.incoming import IncomingStore
from cht_rapidpro.messagelog import MessageLog, RoundReport
from cht_rapidpro.metrics import Metrics
from cht_rapidpro.rapidpro.client import RUNS, RapidProClient
from cht_rapidpro.rapidpro.throttle import MESSAGES, Budget
from cht_rapidpro.replicas import Presence
from cht_rapidpro.sandbox import Sandbox
from cht_rapidpro.sandbox.state import Contact, MessageRecord, build_timeline
from cht_rapidpro.tracking import OwnContent, TrackedIndex
from harness import CouchAdmin, iso


class VirtualClock:
    """Wall time and a monotonic time that move only when told (the sandbox's with them)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.start = sandbox.now()
        self.elapsed = 0.0

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.elapsed)

    def monotonic(self) -> float:
        return 1_000_000.0 + self.elapsed

    def advance(self, seconds: float) -> None:
        self.elapsed += seconds
        self.sandbox.advance(seconds)


@dataclass
class Workspace:
    """A RapidPro workspace's history: foreign traffic and our in-flight messages."""

    foreign: int  # messages of other programmes over `days`
    ours: int  # our messages in flight (status `wired`, no delivery reports)
    days: float  # how far back the history goes
    ours_within_days: float  # ours were sent over this many days...
    ours_ago_days: float = 0.0  # ...ending this many days ago
    delivered_share: float = 0.05  # of ours get a delivery report during the run
    seed: int = 14
    broadcasts: list[int] = field(default_factory=list)  # ours, in send order


def load_workspace(sandbox: Sandbox, spec: Workspace, run_hours: float) -> list[dict[str, Any]]:
    """Fill the sandbox with the history; returns CHT's documents for our messages."""
    rng = random.Random(spec.seed)
    now = sandbox.now()
    contacts = [
        Contact(n, str(uuid.UUID(int=rng.getrandbits(128))), None, [f"tel:+2547{n:08d}"], now)
        for n in range(5000)
    ]
    records: list[MessageRecord] = []
    start = now - timedelta(days=spec.days)
    span = spec.days * 86400
    for _ in range(spec.foreign):
        created = start + timedelta(seconds=rng.random() * span)
        contact = contacts[rng.randrange(len(contacts))]
        records.append(
            MessageRecord(
                sandbox.next_message_id(),
                str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                None,
                contact,
                contact.urns[0],
                "A message of another programme",
                [(created, "queued"), (created + timedelta(seconds=1), "delivered")],
                "out",
            )
        )
    docs = []
    ours_start = now - timedelta(days=spec.ours_ago_days + spec.ours_within_days)
    for n in range(spec.ours):
        sent = ours_start + timedelta(seconds=rng.random() * spec.ours_within_days * 86400)
        broadcast = sandbox.next_broadcast_id()
        spec.broadcasts.append(broadcast)
        contact = contacts[rng.randrange(len(contacts))]
        outcome = ["wired"]
        if rng.random() < spec.delivered_share:
            # A late delivery report, some time during the run.
            outcome = ["wired", "delivered"]
        timeline = build_timeline(sent + timedelta(seconds=1), ["wired"], step=1, backoff=300)
        if outcome[-1] == "delivered":
            timeline.append((now + timedelta(seconds=rng.random() * run_hours * 3600), "delivered"))
        records.append(
            MessageRecord(
                sandbox.next_message_id(),
                str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                broadcast,
                contact,
                contact.urns[0],
                f"Reminder {n}",
                timeline,
                "out",
            )
        )
        stamp = iso(sent.timestamp() * 1000)
        docs.append(
            {
                "_id": f"ours-{n:07d}",
                "type": "data_record",
                "kujua_message": True,
                "form": None,
                "reported_date": int(sent.timestamp() * 1000) - 1000,
                "tasks": [
                    {
                        "messages": [
                            {"uuid": f"m-{n}", "to": contact.urns[0][4:],
                             "message": f"Reminder {n}"}
                        ],
                        "state": "forwarded-by-gateway",
                        "state_details": "Wired",
                        "gateway_ref": broadcast,
                        "state_history": [
                            {"state": "pending", "timestamp": stamp},
                            {"state": "received-by-gateway", "state_details": "Queued",
                             "timestamp": stamp},
                            {"state": "forwarded-by-gateway", "state_details": "Wired",
                             "timestamp": stamp},
                        ],
                    }
                ],
            }
        )  # fmt: skip
    sandbox.add_messages(records)
    return docs


def add_live_traffic(sandbox: Sandbox, rng: random.Random, per_minute: float) -> int:
    """Foreign messages created during the last virtual minute (other programmes keep going)."""
    count = int(per_minute) + (1 if rng.random() < per_minute % 1 else 0)
    now = sandbox.now()
    made = []
    for _ in range(count):
        created = now - timedelta(seconds=rng.random() * 60)
        urn = f"tel:+2547{rng.randrange(5000):08d}"
        contact = sandbox.contact_for(urn)
        made.append(
            MessageRecord(
                sandbox.next_message_id(),
                str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                None,
                contact,
                urn,
                "A message of another programme",
                [(created, "queued"), (created + timedelta(seconds=1), "delivered")],
                "out",
            )
        )
    for message in sorted(made, key=lambda m: m.created_on):
        sandbox.store_message(message)
    return count


@dataclass
class Hour:
    requests: int = 0
    lookups: int = 0
    scans: int = 0
    rounds: int = 0
    max_round: int = 0
    cut: int = 0  # rounds the budget cut short
    updated: int = 0
    max_refresh_age_s: float = 0.0  # oldest refresh among tracked messages, worst round


@dataclass
class VirtualRun:
    hours: list[Hour]
    reports: list[RoundReport]
    tracked: int
    wall_s: float
    per_round: list[int]


async def run_virtual(
    couch_admin: CouchAdmin,
    sandbox_url: str,
    sandbox: Sandbox,
    clock: VirtualClock,
    *,
    hours: float,
    poll_s: float = 60.0,
    messages_per_hour: int = 2000,
    env: dict[str, str] | None = None,
    live_per_minute: float = 0.0,
    seed: int = 6,
) -> VirtualRun:
    """Run the follower round after round over `hours` virtual hours."""
    settings = Settings.from_env(
        {
            "COUCH_URL": couch_admin.couch_url,
            "CHT_RAPIDPRO_PORT": "1",  # not listened on: the follower alone runs
            "CHT_RAPIDPRO_INSTANCE": "bench-virtual",
            "CHT_RAPIDPRO_POLL_INTERVAL": str(poll_s),
            "CHT_RAPIDPRO_MESSAGES_PER_HOUR": str(messages_per_hour),
            **(env or {}),
        }
    )
    couch = CouchClient.connect(settings.couch, timeout_s=60)
    rng = random.Random(seed)
    started = time.perf_counter()
    try:
        cht = ChtConfig(couch, service=settings.service, refresh_s=3600)
        await cht.load_settings()
        await cht.refresh_credentials(force=True)
        writer = BulkWriter(couch)
        index = TrackedIndex()
        metrics = Metrics()
        budget = Budget(
            {MESSAGES: settings.messages_per_hour, RUNS: settings.messages_per_hour},
            clock=clock.monotonic,
        )
        async with aiohttp.ClientSession() as session:
            rapidpro = RapidProClient(session, budget, timeout_s=60, metrics=metrics)
            log = MessageLog(
                couch=couch,
                writer=writer,
                rapidpro=rapidpro,
                cht=cht,
                settings=settings,
                index=index,
                own=OwnContent(),
                store=IncomingStore(couch, writer, cht),
                presence=Presence(couch, settings.instance),
                metrics=metrics,
                clock=clock.now,
            )
            await log.prepare()
            # What the daemon's start-up (feed or sweep) puts in the index.
            now = clock.now().timestamp()
            async for page in couch.scan_docs():
                for doc in page:
                    index.update_doc(doc, now)
            tracked = len(index)
            reports: list[RoundReport] = []
            hour_list: list[Hour] = []
            per_round: list[int] = []
            rounds_per_hour = round(3600 / poll_s)
            for number in range(round(hours * rounds_per_hour)):
                if number % rounds_per_hour == 0:
                    hour_list.append(Hour())
                report = await log.run_once()
                reports.append(report)
                hour = hour_list[-1]
                hour.rounds += 1
                hour.requests += report.requests
                hour.lookups += report.lookups
                hour.scans += report.scans
                hour.updated += report.updated
                hour.cut += report.stopped == "budget"
                hour.max_round = max(hour.max_round, report.requests)
                per_round.append(report.requests)
                hour.max_refresh_age_s = max(
                    hour.max_refresh_age_s, index.oldest_refresh(clock.now().timestamp())
                )
                clock.advance(poll_s)
                if live_per_minute:
                    add_live_traffic(sandbox, rng, live_per_minute * poll_s / 60)
    finally:
        await couch.close()
    return VirtualRun(hour_list, reports, tracked, time.perf_counter() - started, per_round)


def summary(hours: Iterable[Hour]) -> str:
    return "; ".join(
        f"hour {n}: {h.requests} requests ({h.lookups} look-ups, {h.scans} scans, max "
        f"{h.max_round}/round, {h.cut} rounds cut by the budget), oldest refresh "
        f"{h.max_refresh_age_s / 60:.0f} min"
        for n, h in enumerate(hours, 1)
    )
