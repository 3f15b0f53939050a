"""The pure parts of the RapidPro log follower: the tracked index, the refresh planner and its
cost model, run pairing for recovery, and the mirrored document's shape."""

from __future__ import annotations

import math
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cht_rapidpro.cht.state import STATUS_MAP
from cht_rapidpro.mirror import minify, mirror_doc, mirror_id, sent_by
from cht_rapidpro.rapidpro.models import FlowRef, Message, Run
from cht_rapidpro.recovery import (
    MESSAGE_UUIDS_NEEDED,
    IncomingRow,
    identity,
    pair_runs,
    webhook_from,
)
from cht_rapidpro.refresh import (
    Density,
    Lookup,
    Margins,
    Scan,
    ScanProgress,
    refresh_interval,
)
from cht_rapidpro.refresh import plan as plan_arrays
from cht_rapidpro.tracking import (
    CODES,
    FINAL,
    FINAL_RETENTION_S,
    MIRROR_BASE,
    UNKNOWN,
    Due,
    DueSet,
    OwnContent,
    TrackedIndex,
    code_for,
    code_of_status,
    index_key,
)

NOW = 1_780_000_000.0  # an epoch second (2026)
T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)


# --- keys and codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "key"),
    [
        (1001, 1001),
        ("1001", 1001),
        (" 7 ", 7),
        ("rapidpro-msg:textit.com:4105426", MIRROR_BASE + 4105426),
        ("rapidpro-msg:4105426", MIRROR_BASE + 4105426),
        ("ATPid_123", None),
        ("rapidpro-msg:textit.com:x", None),
        (0, None),
        (-5, None),
        (True, None),
        (None, None),
        ("", None),
        ("١٢", None),  # digits, but not ASCII
    ],
    ids=[
        "int", "digit-string", "padded", "mirror-with-host", "mirror", "africas-talking",
        "mirror-bad-id", "zero", "negative", "bool", "none", "empty", "arabic-digits",
    ],
)  # fmt: skip
def test_index_key(ref: Any, key: int | None) -> None:
    assert index_key(ref) == key


def test_codes_cover_every_rapidpro_status() -> None:
    for status, (state, details) in STATUS_MAP.items():
        assert code_of_status(status) == CODES[(str(state), details)] < UNKNOWN
    assert code_of_status("bogus") is None and code_of_status(None) is None
    assert code_for("forwarded-to-gateway", {"claimed_by": "x"}) == UNKNOWN


# --- the tracked index ---------------------------------------------------------------------------


def in_flight_doc(doc_id: str, ref: Any, state: str = "forwarded-by-gateway", **task: Any) -> Any:
    details = {"forwarded-by-gateway": "Wired", "sent": "Sent"}.get(state, "Queued")
    return {
        "_id": doc_id,
        "reported_date": int((NOW - 60) * 1000),
        "tasks": [
            {
                "messages": [{"uuid": f"m-{doc_id}", "to": "+254700000001", "message": "hi"}],
                "state": state,
                "state_details": details,
                "gateway_ref": ref,
                **task,
            }
        ],
    }


def test_index_follows_documents_and_keeps_final_ones_for_recognition() -> None:
    index = TrackedIndex(keep_doc_ids=True)
    for n in (5, 3, 9):
        index.update_doc(in_flight_doc(f"d{n}", n), NOW)
    assert list(index.keys()) == [3, 5, 9] and len(index) == 3
    assert index.doc_id(5) == "d5"
    assert index.code(5) == CODES[("forwarded-by-gateway", "Wired")]
    done = in_flight_doc("d5", 5, state="delivered")
    index.update_doc(done, NOW + 10)
    assert len(index) == 2 and not index.tracked(5) and index.is_ours(5)
    assert index.code(5) == FINAL and index.doc_id(5) is None
    index.expire(NOW + 10 + FINAL_RETENTION_S + 1, sent_grace_s=1e9, max_tracking_s=1e9)
    assert not index.is_ours(5)
    assert index.has_ref("3") and not index.has_ref("rapidpro-msg:x:5")


def test_exact_time_from_rapidpro_is_kept_over_the_send_time() -> None:
    index = TrackedIndex(keep_doc_ids=False)
    index.update_doc(in_flight_doc("d1", 1), NOW)
    assert index.time_of(1) == (NOW - 60, False)
    index.seen(1, NOW - 50, NOW)
    index.update_doc(in_flight_doc("d1", 1, state="sent"), NOW + 5)  # the feed, later
    assert index.time_of(1) == (NOW - 50, True)
    assert not index.keeps_doc_ids and index.doc_id(1) is None


def test_document_ids_kept_without_chts_view() -> None:
    index = TrackedIndex(keep_doc_ids=True)
    ids = [
        "0b6a9f6e-2f4b-4c3e-8c9a-1d2e3f4a5b6c",
        "report:not-a-uuid",
        "0B6A9F6E-2F4B-4C3E-8C9A-1D2E3F4A5B6D",
    ]
    for n, doc_id in enumerate(ids, 1):
        index.update_doc(in_flight_doc(doc_id, n), NOW)
    assert [index.doc_id(n) for n in (1, 2, 3)] == ids  # upper case is kept as written
    index.remove_doc(ids[0], NOW)
    index.remove_doc(ids[1], NOW)
    assert [index.tracked(n) for n in (1, 2, 3)] == [False, False, True]
    for key in range(10, 3000):
        index.upsert(key, time=NOW, code=0, doc_id=str(uuid.UUID(int=key)))
    for key in range(10, 3000, 2):
        index.remove(key)
    index.compact()
    assert index.doc_id(11) == str(uuid.UUID(int=11)) and index.doc_id(3) == ids[2]


def test_expiry_of_sent_and_old_messages() -> None:
    index = TrackedIndex(keep_doc_ids=False)
    index.upsert(1, time=NOW - 100, code=CODES[("sent", "Sent")])
    index.upsert(2, time=NOW - 100, code=CODES[("forwarded-by-gateway", "Wired")])
    index.upsert(3, time=NOW - 1000, code=CODES[("forwarded-by-gateway", "Wired")])
    dropped = index.expire(NOW, sent_grace_s=50, max_tracking_s=500)
    assert dropped == 2 and list(index.keys()) == [2]
    assert index.is_ours(1) and index.is_ours(3)  # still recognised as ours


def test_due_follows_the_refresh_interval_and_orders_nothing() -> None:
    index = TrackedIndex(keep_doc_ids=False)
    wired = CODES[("forwarded-by-gateway", "Wired")]
    index.upsert(1, time=NOW - 10, code=wired, last=NOW - 10)  # young: every round
    index.upsert(2, time=NOW - 7200, code=wired, last=NOW - 1000)  # interval 1800 s
    index.upsert(3, time=NOW - 86400, code=wired, last=NOW - 3700)  # every 48 min: overdue
    due = index.due(NOW, lambda age: refresh_interval(age, poll_s=5))
    assert {d.key: round(d.overdue) for d in due.items()} == {1: 5, 3: 820}
    assert index.overdue(NOW, 3600) == 1 and index.oldest_refresh(NOW) == 3700


def test_compaction_keeps_everything_alive() -> None:
    index = TrackedIndex(keep_doc_ids=False)
    for key in range(1, 5001):
        index.upsert(key, time=NOW, code=0)
    for key in range(1, 5001, 2):
        index.remove(key)
    assert index.slots < 5000  # compacted as tombstones piled up
    assert list(index.keys()) == list(range(2, 5001, 2))
    index.compact()
    assert index.slots == 2500
    index.upsert(3, time=NOW, code=0)
    assert index.tracked(3) and len(index) == 2501


def test_index_memory_is_a_few_bytes_per_message() -> None:
    # Issue 14 item 5: 200,000 in flight must not take the daemon's memory up by hundreds of MB.
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    index = TrackedIndex(keep_doc_ids=False)
    for key in range(1000, 201_000):
        index.upsert(key, time=NOW - key % 3600, code=1)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(index) == 200_000
    assert grown / 200_000 < 40  # bytes per message (the arrays hold 17; growth slack)


# --- our own sends by content --------------------------------------------------------------------


def test_own_content_covers_claims_and_multi_message_tasks_only() -> None:
    own = OwnContent()
    claimed = {
        "_id": "a",
        "tasks": [
            {
                "state": "forwarded-to-gateway",
                "state_details": {"claimed_by": "cht-rapidpro", "instance": "i", "boot": "b"},
                "state_history": [
                    {
                        "state": "forwarded-to-gateway",
                        "state_details": {
                            "claimed_by": "cht-rapidpro",
                            "instance": "i",
                            "boot": "b",
                        },
                        "timestamp": "2026-05-01T08:00:00.000Z",
                    }
                ],
                "messages": [{"uuid": "u", "to": "0712345678", "message": "Visit today "}],
            }
        ],
    }
    settings = {"default_country_code": 254, "phone_validation": "full"}
    own.update_doc(claimed, settings)
    # A claimed message may go out in parts ("(1/2) Visit…"): any row to its number waits.
    assert own.matches("tel:+254712345678", "Visit today")
    assert own.matches("tel:+254712345678", "(1/2) Visit")
    assert not own.matches("tel:+254700000009", "Visit today")
    medic_gateway = {"_id": "b", "tasks": [dict(claimed["tasks"][0], state_details=None)]}
    own.update_doc(medic_gateway, settings)  # medic-gateway's forwarded-to-gateway: not ours
    assert len(own) == 1
    written_back = in_flight_doc("a", 1001)
    own.update_doc(written_back, settings)
    assert len(own) == 0
    several = in_flight_doc("c", 1002)
    several["tasks"][0]["messages"].append({"uuid": "v", "to": "+254700000002", "message": "yo "})
    own.update_doc(several, settings)
    assert own.matches("tel:+254700000002", "yo") and own.matches("tel:+254700000001", "hi")
    assert not own.matches("tel:+254700000002", "another text")
    own.remove_doc("c")
    assert len(own) == 0


def test_every_part_of_a_message_sent_in_parts_is_ours() -> None:
    index = TrackedIndex(keep_doc_ids=False)
    doc = in_flight_doc("p", 2001, gateway_refs=[2001, 2002, 2003])
    index.update_doc(doc, NOW)
    assert index.tracked(2001) and len(index) == 1
    assert index.is_ours(2002) and index.is_ours(2003) and not index.tracked(2003)


# --- the refresh planner and its cost model -------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "interval"),
    [(0, 60), (200, 60), (240, 60), (600, 150), (3600, 900), (4 * 3600, 2880), (7 * 86400, 2880)],
    ids=["new", "young", "4-min", "10-min", "1-hour", "4-hours", "7-days"],
)
def test_refresh_interval(age: float, interval: float) -> None:
    assert refresh_interval(age, poll_s=60) == interval


def test_density_records_and_estimates_per_bucket() -> None:
    density = Density(bucket_s=600)
    start = 600 * 1000
    density.record(start, start + 1200, {1000: 300, 1001: 600})
    assert density.rate(1000) == 0.5 and density.rate(1001) == 1.0
    assert density.estimate(start + 300, start + 900) == pytest.approx(150 + 300)
    assert density.estimate(start, start + 1800) is None  # the third bucket is unknown
    density.record(start + 100, start + 200, {1000: 1000})  # covers less: the old one stays
    assert density.rate(1000) == 0.5
    again = Density.from_json(density.to_json())
    assert again.rate(1001) == 1.0


def due(key: int, time: float, overdue: float = 0.0, exact: bool = True) -> Due:
    return Due(key, time, exact, overdue)


def plan(items: list[Due], density: Density, **options: Any) -> list[Any]:
    return plan_arrays(DueSet.of(items), density, **options)


def dense(density: Density, low: float, high: float, rate: float) -> None:
    """Teach `density` that the workspace created `rate` rows a second in [low, high]."""
    counts: dict[int, int] = {}
    for number in range(density.bucket(low), density.bucket(high) + 1):
        start = number * density.bucket_s
        span = min(high, start + density.bucket_s) - max(low, start)
        counts[number] = round(rate * span)
    density.record(low, high, counts)


MARGINS = Margins(exact_s=1.0, before_s=120.0, after_s=140.0)


def test_dense_traffic_is_scanned_once() -> None:
    # 1,000 of ours sent in a minute, CHT the workspace's only traffic: one open scan.
    density = Density()
    dense(density, NOW - 600, NOW, 1000 / 60)
    items = [due(k, NOW - 60 + k * 0.06) for k in range(1000)]
    [action] = plan(items, density, now=NOW, margins=MARGINS)
    assert isinstance(action, Scan) and action.high is None
    assert action.pages in (4, 5) and len(action.keys) == 1000


def test_sparse_traffic_is_looked_up() -> None:
    # Issue 14 item 6: 100 of ours over two days amid 50,000 foreign messages over 3 days
    # (116 foreign rows per 10 minutes: a page of them for each of ours).
    density = Density()
    dense(density, NOW - 3 * 86400, NOW, 50_000 / (3 * 86400))
    items = [due(k, NOW - 2 * 86400 + k * 1700, overdue=k) for k in range(100)]
    actions = plan(items, density, now=NOW, margins=MARGINS)
    assert all(isinstance(a, Lookup) for a in actions) and len(actions) == 100
    assert [a.priority for a in actions] == sorted((a.priority for a in actions), reverse=True)


def test_sent_together_two_days_ago_is_scanned_in_its_own_window() -> None:
    # The same 100, sent within 100 minutes: their 10 buckets cost 5 pages, not 100 look-ups
    # (and not the 148 pages of a scan from two days ago to now).
    density = Density()
    dense(density, NOW - 3 * 86400, NOW, 50_000 / (3 * 86400))
    items = [due(k, NOW - 2 * 86400 + k * 60) for k in range(100)]
    [scan] = plan(items, density, now=NOW, margins=MARGINS)
    assert isinstance(scan, Scan) and scan.high is not None and scan.pages == 5


def test_mixed_traffic_scans_dense_buckets_and_looks_up_sparse_ones() -> None:
    density = Density()
    dense(density, NOW - 86400, NOW, 2.0)  # 1,200 foreign rows per 10 minutes
    batch = [due(k, NOW - 3 * 3600 + k * 0.1) for k in range(1, 801)]  # a campaign of ours
    strays = [due(5000 + k, NOW - 20 * 3600 + k * 3600) for k in range(5)]
    actions = plan(batch + strays, density, now=NOW, margins=MARGINS)
    scans = [a for a in actions if isinstance(a, Scan)]
    lookups = [a for a in actions if isinstance(a, Lookup)]
    assert len(scans) == 1 and sorted(scans[0].keys) == [d.key for d in batch]
    assert scans[0].high is not None  # a closed window, hours ago
    assert sorted(a.key for a in lookups) == [d.key for d in strays]


def test_unknown_density_scans_only_a_crowd() -> None:
    density = Density()
    few = [due(k, NOW - 86400 + k) for k in range(3)]
    crowd = [due(100 + k, NOW - 2 * 86400 + k) for k in range(10)]
    actions = plan(few + crowd, density, now=NOW, margins=MARGINS)
    assert sorted(a.key for a in actions if isinstance(a, Lookup)) == [0, 1, 2]
    [scan] = [a for a in actions if isinstance(a, Scan)]
    assert scan.pages is None and len(scan.keys) == 10


def test_without_lookups_everything_is_scanned() -> None:
    density = Density()
    dense(density, NOW - 86400, NOW, 5.0)
    actions = plan([due(1, NOW - 3600)], density, now=NOW, margins=MARGINS, lookups_work=False)
    assert [type(a) for a in actions] == [Scan]


def test_adjacent_cheap_buckets_merge_into_one_scan() -> None:
    density = Density()
    dense(density, NOW - 7200, NOW, 0.05)  # 30 rows per bucket: one page holds several
    items = [due(k, NOW - 6000 + k * 600) for k in range(8) for _ in range(1)]
    items += [due(100 + k, NOW - 6000 + k * 600 + 1) for k in range(8)]
    actions = plan(items, density, now=NOW, margins=MARGINS)
    scans = [a for a in actions if isinstance(a, Scan)]
    assert len(scans) == 1 and len(scans[0].keys) == 16


def test_approximate_times_widen_the_window_by_the_clock_skew() -> None:
    assert MARGINS.window(NOW, False) == (NOW - 120, NOW + 140)
    assert MARGINS.window(NOW, True) == (NOW - 1, NOW + 1)


def test_look_ups_are_capped_by_what_the_round_can_afford() -> None:
    density = Density()
    dense(density, NOW - 7 * 86400, NOW, 2.0)
    items = [due(k, NOW - 86400 - k * 3000, overdue=k) for k in range(50)]
    actions = plan(items, density, now=NOW, margins=MARGINS, max_lookups=10)
    assert [a.key for a in actions] == list(range(49, 39, -1))  # the most overdue


def test_a_restart_with_200000_due_plans_without_an_object_each() -> None:
    index = TrackedIndex(keep_doc_ids=False)
    for key in range(1000, 201_000):
        index.upsert(key, time=NOW - 600 + key % 600, code=1, last=NOW - 700)
    tracemalloc.start()
    due = index.due(NOW, lambda age: refresh_interval(age, poll_s=5))
    actions = plan_arrays(due, Density(), now=NOW, margins=MARGINS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    [scan] = actions
    assert isinstance(scan, Scan) and len(scan.keys) == 200_000 and scan.high is None
    assert peak / 200_000 < 80  # bytes per due message at the peak (arrays: about 41)


def test_scan_progress_gives_up_when_look_ups_are_cheaper() -> None:
    density = Density()
    scan = Scan(low=NOW - 86400, high=NOW)
    scan.keys.extend([1, 2])
    scan.lows.extend([NOW - 50_000, NOW - 80_000])
    progress = ScanProgress(scan=scan, top=NOW)
    for page in range(3):  # 250 rows per 100 s: the day would take 864 pages
        progress.add_page((NOW - page * 100 - i * 0.4 for i in range(250)), density)
    assert progress.covered() == [] and progress.uncovered() == [1, 2]
    assert progress.left() == 2
    assert not progress.worth_going_on()
    assert progress.pages == 3 and progress.rows == 750


# --- recovery: run pairing and identities ---------------------------------------------------------


def incoming(
    mid: int, contact: str, at: float, handled: float | None = None, flow: str = "f"
) -> IncomingRow:
    """A message created at `at` and handled (its flow session ended) at `handled`."""
    done = T0 + timedelta(seconds=handled if handled is not None else at + 0.2)
    return IncomingRow(mid, contact, flow, T0 + timedelta(seconds=at), done)


def run(uuid: str, contact: str, at: float, flow: str = "f", started: bool = False) -> Run:
    """A run whose session ended (`modified_on`) at `at`."""
    moment = T0 + timedelta(seconds=at)
    return Run(
        1, uuid, flow, contact, "tel:+2547", started, moment - timedelta(seconds=0.1), moment
    )


PAIRING = [
    (
        "one-each",
        [incoming(1, "c", 0), incoming(2, "c", 10)],
        [run("r2", "c", 10.2), run("r1", "c", 0.2)],
        {1: "r1", 2: "r2"},
    ),
    (
        "burst-handled-in-order",  # both arrive, then each is handled in its own session
        [incoming(1, "c", 0, handled=5), incoming(2, "c", 1, handled=6)],
        [run("r1", "c", 5), run("r2", "c", 6)],
        {1: "r1", 2: "r2"},
    ),
    (
        "older-message-not-read",  # r0's message was created before what we read
        [incoming(1, "c", 10, handled=101)],
        [run("r0", "c", 100), run("r1", "c", 101)],
        {1: "r1"},
    ),
    (
        "run-of-a-message-not-read-yet",
        [incoming(1, "c", 10)],
        [run("r1", "c", 10.2), run("r2", "c", 200)],
        {1: "r1"},
    ),
    (
        "message-whose-run-is-not-listed",
        [incoming(1, "c", 10), incoming(2, "c", 60)],
        [run("r2", "c", 60.2)],
        {2: "r2"},
    ),
    (
        "flow-start-runs-ignored",
        [incoming(1, "c", 10)],
        [run("s", "c", 10.2, started=True), run("r1", "c", 10.3)],
        {1: "r1"},
    ),
    (
        "contacts-and-flows-apart",
        [incoming(1, "c", 0), incoming(2, "d", 0), incoming(3, "c", 0, flow="g")],
        [run("rd", "d", 0.2), run("rc", "c", 0.2), run("rg", "c", 0.2, flow="g")],
        {1: "rc", 2: "rd", 3: "rg"},
    ),
    (
        "identical-texts-one-number",
        [incoming(n, "c", n * 0.01, handled=1 + n) for n in range(1, 6)],
        [run(f"r{n}", "c", 1 + n + 0.001) for n in range(1, 6)],
        {n: f"r{n}" for n in range(1, 6)},
    ),
]


@pytest.mark.parametrize(
    ("messages", "runs", "expected"), [c[1:] for c in PAIRING], ids=[c[0] for c in PAIRING]
)
def test_pair_runs(messages: list[IncomingRow], runs: list[Run], expected: dict[int, str]) -> None:
    paired = pair_runs(messages, runs)
    assert {mid: r.uuid for mid, r in paired.items()} == expected


def row(**fields: Any) -> Message:
    values: dict[str, Any] = {
        "id": 7,
        "broadcast": None,
        "urn": "tel:+254712345678",
        "direction": "in",
        "status": "handled",
        "created_on": T0,
        "uuid": "mmmm",
        "text": "VISIT 1",
    }
    values.update(fields)
    return Message(**values)


IDENTITIES = [
    ("run-paired", "run", row(), run("rrrr", "c", 1), 0, ("rrrr", "mmmm"), "rrrr", None),
    ("run-unpaired-waits", "run", row(), None, 10, ("mmmm",), None, None),
    ("run-unpaired-long", "run", row(), None, 4000, ("mmmm",), "mmmm", None),
    ("run-v9-unpaired-long", "run", row(uuid=None), None, 4000, ("rapidpro-msg-7",),
     "rapidpro-msg-7", None),
    ("message", "message", row(), run("rrrr", "c", 1), 0, ("rrrr", "mmmm"), "mmmm", None),
    ("message-v9", "message", row(uuid=None), run("rrrr", "c", 1), 0, ("rrrr",), None,
     MESSAGE_UUIDS_NEEDED),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "message", "paired", "waited", "candidates", "store_as", "problem"),
    [c[1:] for c in IDENTITIES],
    ids=[c[0] for c in IDENTITIES],
)
def test_identity(
    mode: str,
    message: Message,
    paired: Run | None,
    waited: float,
    candidates: tuple[str, ...],
    store_as: str | None,
    problem: str | None,
) -> None:
    found = identity(message, paired, mode=mode, waited_s=waited, pair_wait_s=3600)
    assert (found.candidates, found.store_as, found.problem) == (candidates, store_as, problem)


@pytest.mark.parametrize(
    ("urn", "sender"),
    [("tel:+254712345678", "+254712345678"), ("tel:0712345678", "tel:0712345678"),
     ("whatsapp:254712345678", None), (None, None)],
    ids=["e164", "local-as-the-flow-sends-it", "whatsapp", "none"],
)  # fmt: skip
def test_webhook_from_is_what_chts_flow_sends(urn: str | None, sender: str | None) -> None:
    assert webhook_from(urn) == sender


# --- the mirrored document -----------------------------------------------------------------------


def test_mirror_doc_is_a_web_app_outgoing_message() -> None:
    reminder = Message(
        id=4105426,
        broadcast=None,
        urn="tel:+254712345678",
        direction="out",
        status="wired",
        created_on=T0,
        uuid="0199bb98-3637-778d-9dfc-0ab85c950d7c",
        text="Your ANC visit is tomorrow",
        flow=FlowRef("f-uuid", "ANC reminders"),
    )
    contact = minify(
        {"_id": "p1", "name": "Jane", "phone": "+254712345678",
         "parent": {"_id": "hh", "name": "x", "parent": {"_id": "area"}}}
    )  # fmt: skip
    doc = mirror_doc(reminder, host="textit.com", contact=contact, now=T0)
    assert doc is not None
    assert doc["_id"] == mirror_id("textit.com", 4105426) == "rapidpro-msg:textit.com:4105426"
    assert doc["type"] == "data_record" and doc["form"] is None and doc["kujua_message"] is True
    assert doc["sent_by"] == "RapidPro (flow: ANC reminders)"
    assert doc["reported_date"] == int(T0.timestamp() * 1000)
    [task] = doc["tasks"]
    assert task["messages"] == [
        {
            "uuid": "0199bb98-3637-778d-9dfc-0ab85c950d7c",
            "to": "+254712345678",
            "message": "Your ANC visit is tomorrow",
            "contact": {"_id": "p1", "parent": {"_id": "hh", "parent": {"_id": "area"}}},
        }
    ]
    assert task["state"] == "forwarded-by-gateway" and task["state_details"] == "Wired"
    assert (
        task["gateway_ref"] == doc["_id"]
        and index_key(task["gateway_ref"]) == MIRROR_BASE + 4105426
    )
    assert task["state_history"] == [
        {
            "state": "forwarded-by-gateway",
            "state_details": "Wired",
            "timestamp": "2026-05-01T08:00:00.000Z",
        }
    ]
    assert "+254" not in str(doc["rapidpro"])


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"text": ""}, None),
        ({"urn": None}, None),
        ({"flow": None}, "RapidPro"),
        ({"urn": "whatsapp:254712345678"}, "RapidPro"),
    ],
    ids=["no-text", "no-urn", "broadcast", "whatsapp"],
)
def test_mirror_doc_edges(fields: dict[str, Any], expected: str | None) -> None:
    message = Message(
        **{
            "id": 1,
            "broadcast": 2001,
            "urn": "tel:+254712345678",
            "direction": "out",
            "status": "queued",
            "created_on": T0,
            "uuid": None,
            "text": "hello",
            **fields,
        }
    )
    doc = mirror_doc(message, host="h", contact=None, now=T0)
    if expected is None:
        assert doc is None
    else:
        assert doc is not None and sent_by(message) == expected == doc["sent_by"]
        assert doc["tasks"][0]["messages"][0]["uuid"]  # v9 rows have none: made up, stable
        assert doc == mirror_doc(message, host="h", contact=None, now=T0)


def test_a_status_code_is_one_byte() -> None:
    assert max(CODES.values()) < UNKNOWN < FINAL < 256
    assert not math.isnan(NOW)
